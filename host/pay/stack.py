"""The payment server with a PSAM pool and a merchant server on loopback, for ``svcard demo``, the
tests and the benchmarks."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...card.image import save_new_image
from ...card.personalise import image_from_profile
from ...fixtures import fixture_path
from ...protocols import messages as M
from ...reader import Reader
from ..kit.serving import ServerThread, free_port
from ..terminal.reader_specs import open_reader
from .client_terminal import ClientTerminal, add_terminal, remove_terminal
from .merchant.server import MerchantConfig, MerchantServer
from .server.app import MerchantAccount, PaymentConfig, PaymentServer

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


@dataclass
class MerchantSite:
    """A merchant's commerce server added to a running payment server
    (:meth:`Stack.add_merchant`)."""

    merchant_id: bytes
    shared_key: bytes = field(repr=False)
    server: MerchantServer
    thread: ServerThread

    @property
    def url(self) -> str:
        return self.thread.url

    def close(self) -> None:
        self.thread.stop()
        self.server.close()


@dataclass
class Stack:
    folder: Path
    payment: ServerThread
    merchant: ServerThread
    payment_server: PaymentServer
    merchant_server: MerchantServer
    shared_key: bytes = field(repr=False)
    client_terminal: ClientTerminal | None = None
    merchants: list[MerchantSite] = field(default_factory=list)   # added by add_merchant

    def checkout_url(self, sku: str = "ticket", variant: str = "fig6") -> str:
        """A checkout URL asking ``variant``; FIG. 7 names the stack's registered client
        terminal, whose key this process holds (see
        :func:`svcard.host.pay.client_terminal.add_terminal`)."""
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

    def add_merchant(self, merchant_id: bytes, *, variants: frozenset[str] | None = None,
                     terminal_id: bytes | None = None, **options: Any) -> MerchantSite:
        """Another merchant of this payment server (an acquirer's shared POS, seed FIG. 4B):
        its own shared key, commerce server, port and database; ``terminal_id``: the PSAM
        terminal its payments are made on (default: the pool's)."""
        key = os.urandom(32)
        names = variants or frozenset(M.VARIANTS)
        self.payment_server.config.merchants[merchant_id] = MerchantAccount(
            merchant_id, key, frozenset(M.VARIANTS[n] for n in names), terminal_id)
        port = free_port()
        db = self.folder / f"merchant-{merchant_id.hex()}.db"
        options = {"db_url": f"sqlite:///{db}", "max_open_per_client": 10_000,
                   "default_variant": "fig6" if "fig6" in names else sorted(names - {"fig7"})[0],
                   **options}
        server = MerchantServer(MerchantConfig(
            merchant_id, key, self.payment.url,
            terminal_id or self.payment_server.pool.terminal_id,
            public_url=f"http://127.0.0.1:{port}", variants=names, **options))
        try:
            site = MerchantSite(merchant_id, key, server,
                                ServerThread(server.app(), port=port).start())
        except Exception:
            server.close()
            raise
        self.merchants.append(site)
        return site

    def close(self) -> None:
        for site in self.merchants:
            site.close()
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
