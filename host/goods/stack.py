"""The goods system on loopback, for the tests, the demo and the benchmarks: the five servers
(each its own app and database, fresh keys), demo cards holding a goods key, and bank accounts.

:func:`write_system` writes the same system as files (``goods.toml``, one key file per party,
the issuer file with ``[goods_key]``) for ``svcard serve goods-PARTY`` processes.

==========================================================================================
TEST KEYS ONLY: :data:`GOODS_MASTER` is published here; never use it for real goods.
==========================================================================================
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ...card.image import save_new_image
from ...card.personalise import image_from_profile
from ...fixtures import fixture_path
from ..kit.serving import ServerThread, free_port
from ..terminal.reader_specs import open_reader
from . import wire as W
from .config import ROLES, GoodsSystem, Item, PartyConfig, Peer
from .device import Device
from .server.auth import AuthServer
from .server.bank import BankServer, add_account
from .server.common import PartyServer
from .server.fulfil import FulfilServer, key_service, write_goods_key
from .server.merchant import MerchantServer
from .server.payment import PaymentServer

GOODS_MASTER = "5B1E0D94A4C2377F8E21C6B0FD3390A7"   # TEST KEY ONLY
GOODS_KEY_FILE = "goods-key.toml"   # the fulfilment server's: the goods key only
MERCHANT_ISSUER = bytes.fromhex("2000000000000002")
DEMO_ITEMS = (Item("ticket", "ticket", 1250, "Museum e-ticket", value=1250),
              Item("coupon", "coupon", 100, "Coffee coupon", value=200),
              Item("airtime", "voucher", 5000, "Prepaid airtime 50.00", value=5000),
              Item("rides10", "transit", 2000, "Ten rides", rides=10))
IDS = {"merchant": "merchant1", "payment": "pay1", "auth": "auth1", "bank": "bank1",
       "fulfil": "fulfil1"}
SERVERS: dict[str, type[PartyServer]] = {
    "merchant": MerchantServer, "payment": PaymentServer, "auth": AuthServer,
    "bank": BankServer, "fulfil": FulfilServer}


def write_issuer(folder: Path) -> Path:
    """The demo issuer file with a ``[goods_key]`` (TEST KEY; for the demo cards), and
    ``goods-key.toml`` beside it: the goods key only, the fulfilment server's file."""
    path = folder / "goods-issuer.toml"
    path.write_text(fixture_path("demo-issuer.toml").read_text()
                    + f'\n[goods_key]\nindex = 1\nversion = 1\nalgorithm = 0\n'
                      f'master_key = "{GOODS_MASTER}"\n')
    write_goods_key(folder / GOODS_KEY_FILE, path)
    return path


def psam_images(folder: Path, count: int) -> list[Path]:
    """``count`` demo PSAM images of one terminal id (the goods payment server's, for goods
    the purse pays), distinct serials."""
    folder.mkdir(parents=True, exist_ok=True)
    base = image_from_profile(fixture_path("psam-demo.toml"))
    paths = []
    for i in range(count):
        image = copy.deepcopy(base)
        image["app"]["psam_serial"] = f"{90_001 + i:020d}"
        path = folder / f"goods-psam{i + 1}.json"
        save_new_image(path, image, overwrite=True)
        paths.append(path)
    return paths


def make_card(folder: Path, serial: int, ep: int = 0) -> Path:
    """A demo purse card image with application serial ``serial`` and the goods key."""
    folder.mkdir(parents=True, exist_ok=True)
    issuer = folder / "goods-issuer.toml"
    if not issuer.exists():
        write_issuer(folder)
    text = fixture_path("iep-demo.toml").read_text().replace(
        'issuer = "demo-issuer.toml"', f'issuer = "{issuer.name}"')
    profile = folder / f"goods-card-{serial}.toml"
    profile.write_text(text)
    image = image_from_profile(profile, app_serial=f"{serial:020d}")
    image["app"]["ep"]["balance"] = ep
    path = folder / f"goods-card-{serial}.json"
    save_new_image(path, image, overwrite=True)
    return path


@dataclass
class GoodsStack:
    folder: Path
    system: GoodsSystem
    keys: dict[str, bytes] = field(repr=False)
    servers: dict[str, PartyServer]
    threads: dict[str, ServerThread]
    configs: dict[str, PartyConfig]
    clock: Callable[[], float]
    psams: list[Path] = field(default_factory=list)

    def url(self, role: str) -> str:
        return self.threads[role].url

    @property
    def fulfil(self) -> FulfilServer:
        server = self.servers["fulfil"]
        assert isinstance(server, FulfilServer)
        return server

    def engine(self, role: str) -> Any:
        return self.servers[role].engine

    def device(self, key: bytes | None = None, http: httpx.Client | None = None) -> Device:
        d = Device(self.url("auth"), IDS["auth"], self.system.peer("auth").public_key,
                   key or W.new_key())
        if http is not None:
            d.http = http
        d.register()
        return d

    def account(self, account: str, card_serial: int | str, pin: str = "123456",
                balance: int = 100_000) -> None:
        serial = card_serial if isinstance(card_serial, str) else f"{card_serial:020d}"
        add_account(self.engine("bank"), account, serial, pin, balance,
                    self.system.currency_code, int(self.clock() * 1000))

    def order(self, http: httpx.Client, sku: str, device: Device | str) -> httpx.Response:
        dev = device if isinstance(device, str) else device.id
        return http.post(f"{self.url('merchant')}/v1/orders",
                         json={"sku": sku, "device": dev, "customer_ref": "test"})

    def restart(self, role: str) -> None:
        port = self.threads[role].port
        self.threads[role].stop()
        self.servers[role].close()
        self.servers[role] = _server(role, self.configs[role], self.clock, self.folder,
                                     self.psams)
        self.threads[role] = ServerThread(self.servers[role].app(), port=port).start()

    def close(self) -> None:
        for role in ROLES:
            self.threads[role].stop()
            self.servers[role].close()


def _server(role: str, config: PartyConfig, clock: Callable[[], float],
            folder: Path, psams: list[Path] | None = None) -> PartyServer:
    if role == "fulfil":
        return FulfilServer(config, clock=clock, keys=key_service(folder / GOODS_KEY_FILE))
    if role == "payment" and psams:
        return PaymentServer(config, clock=clock,
                             psams=[open_reader(f"virtual:{p}") for p in psams])
    return SERVERS[role](config, clock=clock)


def demo_system(keys: dict[str, bytes], ports: dict[str, int], **options: Any) -> GoodsSystem:
    parties = {r: Peer(IDS[r], f"http://127.0.0.1:{ports[r]}", W.public_of(keys[r]))
               for r in ROLES}
    return GoodsSystem(parties, {i.sku: i for i in DEMO_ITEMS}, MERCHANT_ISSUER,
                       W.seal_public_of(keys["bank"]), **options)


def start_goods(folder: Path, *, clock: Callable[[], float] = time.time,
                db_urls: dict[str, str] | None = None, psams: int = 1,
                **options: Any) -> GoodsStack:
    """The five servers on loopback, databases in ``folder`` unless ``db_urls`` says
    otherwise, the payment server with ``psams`` demo PSAMs (for goods the purse pays; 0:
    none); ``options`` go to :class:`GoodsSystem` (``pickup_seconds``, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_issuer(folder)
    psam_paths = psam_images(folder, psams)
    keys = {r: W.new_key() for r in ROLES}
    ports = {r: free_port() for r in ROLES}
    system = demo_system(keys, ports, **options)
    urls = db_urls or {}
    configs = {r: PartyConfig(r, system, keys[r],
                              urls.get(r, f"sqlite:///{folder / ('goods-' + r + '.db')}"))
               for r in ROLES}
    servers: dict[str, PartyServer] = {}
    threads: dict[str, ServerThread] = {}
    try:
        for r in ROLES:
            servers[r] = _server(r, configs[r], clock, folder, psam_paths)
            threads[r] = ServerThread(servers[r].app(), port=ports[r]).start()
    except BaseException:
        for t in threads.values():
            t.stop()
        for s in servers.values():
            s.close()
        raise
    return GoodsStack(folder, system, keys, servers, threads, configs, clock, psam_paths)


def write_system(folder: Path, ports: dict[str, int] | None = None) -> Path:
    """The demo system as files in ``folder``: ``goods.toml``, ``ROLE.key`` (mode 0600) and
    ``goods-issuer.toml``; the path of ``goods.toml``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_issuer(folder)
    ports = ports or {r: free_port() for r in ROLES}
    keys = {r: W.new_key() for r in ROLES}
    lines = ["currency_code = 156", "pickup_seconds = 604800", ""]
    for r in ROLES:
        W.write_private_key(folder / f"{r}.key", keys[r])
        lines += [f"[parties.{r}]", f'id = "{IDS[r]}"', f'url = "http://127.0.0.1:{ports[r]}"',
                  f'public_key = "{W.public_of(keys[r]).hex()}"',
                  f'private_key_file = "{r}.key"', f'db = "sqlite:///{folder / (r + ".db")}"']
        if r == "merchant":
            lines.append(f'issuer_id = "{MERCHANT_ISSUER.hex().upper()}"')
        if r == "bank":
            lines.append(f'seal_key = "{W.seal_public_of(keys[r]).hex()}"')
        if r == "fulfil":
            lines.append(f'goods_key = "{GOODS_KEY_FILE}"')
        lines.append("")
    for i in DEMO_ITEMS:
        lines += ["[[item]]", f'sku = "{i.sku}"', f'name = "{i.name}"', f'kind = "{i.kind}"',
                  f"price = {i.price}", f"value = {i.value}", f"rides = {i.rides}",
                  f"valid_days = {i.valid_days}", ""]
    path = folder / "goods.toml"
    path.write_text("\n".join(lines))
    return path
