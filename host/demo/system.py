"""A whole payment system on loopback: payment server with a PSAM pool, merchant server, bank
and load servers, and fresh card images, for ``svcard demo``, the tests and the benchmarks."""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from svcard.card.image import save_new_image
from svcard.card.personalise import image_from_profile
from svcard.fixtures import fixture_path
from svcard.host.bank_server import BankConfig, BankServer
from svcard.host.client import ClientTerminal, add_terminal, remove_terminal
from svcard.host.load_server import BankAccount, LoadConfig, LoadServer
from svcard.host.merchant_server import MerchantConfig, MerchantServer
from svcard.host.payment_server import MerchantAccount, PaymentConfig, PaymentServer
from svcard.host.serving import ServerThread, free_port
from svcard.host.specs import open_reader
from svcard.protocols import messages as M
from svcard.reader import Reader

if TYPE_CHECKING:
    from svcard.host.audit import AuditReport
    from svcard.host.clearing import ClearingReport

DEMO_MERCHANT_ID = bytes.fromhex("4D45524348303031")  # "MERCH001"


def psam_images(folder: Path, count: int, terminal_id: bytes | None = None,
                first_serial: int = 1) -> list[Path]:
    """``count`` PSAM images of one pool: the same terminal id, distinct serials."""
    overrides = {"terminal_id": terminal_id.hex()} if terminal_id else {}
    base = image_from_profile(fixture_path("psam-demo.toml"), **overrides)
    paths = []
    for i in range(count):
        image = copy.deepcopy(base)
        image["app"]["psam_serial"] = f"{first_serial + i:020d}"
        path = folder / f"psam{i + 1}.json"
        save_new_image(path, image, overwrite=True)
        paths.append(path)
    return paths


def card_image(folder: Path, name: str = "card.json", ep: int = 10_000,
               serial: int | None = None) -> Path:
    """A demo purse card; ``serial`` gives it its own application serial (and so its own
    diversified keys); by default it is derived from ``name``."""
    if serial is None:
        serial = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")
    image = image_from_profile(fixture_path("iep-demo.toml"), app_serial=f"{serial:020d}")
    image["app"]["ep"]["balance"] = ep
    path = folder / name
    save_new_image(path, image, overwrite=True)
    return path


@dataclass
class Stack:
    folder: Path
    payment: ServerThread
    merchant: ServerThread
    payment_server: PaymentServer
    merchant_server: MerchantServer
    shared_key: bytes = field(repr=False)
    client_terminal: ClientTerminal | None = None

    def checkout_url(self, sku: str = "ticket", variant: str = "fig6") -> str:
        """A checkout URL asking ``variant``; FIG. 7 names the stack's registered client
        terminal, whose key this process holds (see svcard.host.client.add_terminal)."""
        url = f"{self.merchant.url}/v1/checkout/{sku}?variant={variant}"
        if variant == "fig7" and self.client_terminal is not None:
            url += f"&terminal={self.client_terminal.terminal_id.hex().upper()}"
        return url

    def restart_merchant(self) -> None:
        """Stop the merchant server and start a new one on the same port and database."""
        config = self.merchant_server.config
        self.merchant.stop()
        self.merchant_server.close()
        self.merchant_server = MerchantServer(config)
        self.merchant = ServerThread(self.merchant_server.app(),
                                     port=self.merchant.port).start()

    def restart_payment(self) -> None:
        """Stop the payment server and start a new one on the same port, database and PSAMs.
        Its PSAMs are powered off on the way, so held FIG. 5 sessions are lost as in a crash;
        what the database holds is all the new server knows."""
        old = self.payment_server
        readers = [m.reader for m in old.pool.members]
        self.payment.stop()
        self.payment_server = PaymentServer(old.config, readers)
        self.payment = ServerThread(self.payment_server.app(), port=self.payment.port).start()

    def close(self) -> None:
        self.merchant.stop()
        self.merchant_server.close()
        self.payment.stop()
        if self.client_terminal is not None:
            remove_terminal(self.client_terminal)


def start_stack(folder: Path, *, psams: int = 2, db_url: str | None = None,
                psam_readers: list[Reader] | None = None, acquire_timeout: float = 2.0,
                hold_timeout: float = 10.0, variants: frozenset[int] | None = None,
                payment_port: int | None = None, merchant_id: bytes = DEMO_MERCHANT_ID,
                terminal_id: bytes | None = None, first_psam_serial: int = 1,
                merchant_db: str | None = None, merchant_options: dict[str, Any] | None = None,
                **payment_kwargs: Any) -> Stack:
    """The payment server and a merchant. The merchant enables every variant and registers a
    fresh client terminal for FIG. 7 (its key is added to this process's terminals); every
    client is on loopback, so the per-address bound of open orders is the overall one unless
    ``merchant_options`` says otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    shared_key = os.urandom(32)
    readers = psam_readers if psam_readers is not None else [
        open_reader(f"virtual:{p}")
        for p in psam_images(folder, psams, terminal_id, first_psam_serial)]
    account = MerchantAccount(merchant_id, shared_key,
                              variants or frozenset(M.VARIANTS.values()))
    config = PaymentConfig({merchant_id: account},
                           db_url=db_url or f"sqlite:///{folder / 'payments.db'}",
                           acquire_timeout=acquire_timeout, hold_timeout=hold_timeout,
                           **payment_kwargs)
    payment_server = PaymentServer(config, readers)
    payment = ServerThread(payment_server.app(), port=payment_port).start()
    client_terminal = ClientTerminal.generate()
    options: dict[str, Any] = {
        "variants": frozenset(M.VARIANTS),
        "client_terminals": {client_terminal.terminal_id: client_terminal.public_key},
        "db_url": merchant_db or f"sqlite:///{folder / 'merchant.db'}",
        "max_open_per_client": 10_000, **(merchant_options or {})}
    merchant_port = free_port()
    try:
        merchant_server = MerchantServer(MerchantConfig(
            merchant_id, shared_key, payment.url, payment_server.pool.terminal_id,
            public_url=f"http://127.0.0.1:{merchant_port}", **options))
        merchant = ServerThread(merchant_server.app(), port=merchant_port).start()
    except Exception:
        payment.stop()
        raise
    add_terminal(client_terminal)
    return Stack(folder, payment, merchant, payment_server, merchant_server, shared_key,
                 client_terminal)


DEMO_BANK_ID = bytes.fromhex("42414E4B30303031")  # "BANK0001"
DEMO_LOAD_TERMINAL = bytes.fromhex("000000000009")


def hsm_image(folder: Path, name: str = "hsm.json") -> Path:
    path = folder / name
    save_new_image(path, image_from_profile(fixture_path("hsm-demo.toml")), overwrite=True)
    return path


@dataclass
class LoadStack:
    """A bank server and a load server (with a software HSM) on loopback."""

    folder: Path
    bank: ServerThread
    load: ServerThread
    bank_server: BankServer
    load_server: LoadServer
    shared_key: bytes = field(repr=False)

    @property
    def bank_url(self) -> str:
        return f"{self.bank.url}/v1/load"

    def account(self, account_id: str, funds: int, secret: str = "demo-secret") -> str:
        self.bank_server.db.create_account(account_id, account_id.title(),
                                           self.bank_server.config.currency_code, funds, secret)
        return secret

    def restart_load(self) -> None:
        """Stop the load server and start a new one on the same port, database and HSMs."""
        old = self.load_server
        readers = [m.reader for m in old.hsms.members]
        self.load.stop()
        self.load_server = LoadServer(old.config, readers)
        self.load = ServerThread(self.load_server.app(), port=self.load.port).start()

    def close(self) -> None:
        self.bank.stop()
        self.load.stop()


def start_load_stack(folder: Path, *, bank_db: str | None = None, load_db: str | None = None,
                     hsm_readers: list[Reader] | None = None, load_port: int | None = None,
                     shared_key: bytes | None = None) -> LoadStack:
    folder.mkdir(parents=True, exist_ok=True)
    shared_key = shared_key or os.urandom(32)
    readers = hsm_readers if hsm_readers is not None else [
        open_reader(f"virtual:{hsm_image(folder)}")]
    load_server = LoadServer(LoadConfig(
        {DEMO_BANK_ID: BankAccount(DEMO_BANK_ID, shared_key)}, DEMO_LOAD_TERMINAL,
        db_url=load_db or f"sqlite:///{folder / 'loads.db'}"), readers)
    load = ServerThread(load_server.app(), port=load_port).start()
    bank_server = BankServer(BankConfig(
        DEMO_BANK_ID, shared_key, load.url, DEMO_LOAD_TERMINAL,
        db_url=bank_db or f"sqlite:///{folder / 'bank.db'}"))
    bank = ServerThread(bank_server.app())
    bank_server.config.public_url = bank.url
    bank.start()
    return LoadStack(folder, bank, load, bank_server, load_server, shared_key)


@dataclass
class System:
    """Everything on loopback: bank, load server, payment server, merchant, and a clearing
    database; for ``svcard demo``, the money tests and the simulation."""

    folder: Path
    pay: Stack
    load: LoadStack
    admin_token: str = field(repr=False)
    clearing_db: str = ""

    def __post_init__(self) -> None:
        self.clearing_db = self.clearing_db or f"sqlite:///{self.folder / 'clearing.db'}"

    @property
    def batch_dir(self) -> Path:
        return self.folder / "concentration"

    def close_batches(self) -> list[str]:
        response = httpx.post(f"{self.pay.payment.url}/v1/batches/close", timeout=60,
                              headers={"Authorization": f"Bearer {self.admin_token}"})
        response.raise_for_status()
        return list(response.json()["batches"])

    def run_clearing(self) -> ClearingReport:
        from svcard.host import clearing as CL
        from svcard.host.server_config import clearing_config

        config = clearing_config(fixture_path("clearing-demo.toml"))
        return CL.run_clearing(config, self.batch_dir, CL.make_engine(self.clearing_db),
                               self.folder / "settlement",
                               load_db_urls=(str(self.load.load_server.config.db_url),))

    def audit(self, cards: list[Path], opening: int = 0, **options: Any) -> AuditReport:
        """The audit of this system with ``cards``; ``options`` go to
        :func:`svcard.host.audit.audit` (max_age_ms, now, open_batches)."""
        from svcard.host.audit import audit, card_balances

        readers = [open_reader(f"virtual:{c}") for c in cards]
        try:
            for r in readers:
                r.connect()
            balances = card_balances(readers)
        finally:
            for r in readers:
                r.disconnect()
        return audit(balances, payment_dbs=(self.pay.payment_server.config.db_url,),
                     load_dbs=(self.load.load_server.config.db_url,),
                     bank_dbs=(self.load.bank_server.config.db_url,),
                     clearing_db=self.clearing_db, opening=opening, **options)

    def close(self) -> None:
        self.pay.close()
        self.load.close()


def start_system(folder: Path, *, psams: int = 2, bank_db: str | None = None,
                 load_db: str | None = None, clearing_db: str = "",
                 **payment_kwargs: Any) -> System:
    token = os.urandom(16).hex()
    pay = start_stack(folder / "pay", psams=psams, admin_token=token,
                      concentration_dir=str(folder / "concentration"), **payment_kwargs)
    try:
        load = start_load_stack(folder / "load", bank_db=bank_db, load_db=load_db)
    except Exception:
        pay.close()
        raise
    return System(folder, pay, load, token, clearing_db)
