"""A whole payment system on loopback: payment server with a PSAM pool, merchant server, bank
and load servers, the service provider (seed 001) with its purse pool on request, and fresh card
images, for ``svcard demo``, the tests and the benchmarks."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from ...card.image import save_new_image
from ...card.personalise import image_from_profile
from ...fixtures import fixture_path
from ..kit.serving import ServerThread
from ..load.stack import LoadStack, start_load_stack
from ..pay.stack import Stack, start_stack
from ..sp.purses.pool import PursePoolConfig
from ..sp.stack import SpStack, demo_config, purse_images
from ..sp.stack import start_sp as start_sp_stack
from ..terminal.reader_specs import open_reader

if TYPE_CHECKING:
    from ..settle.audit import AuditReport
    from ..settle.clearing import ClearingReport


def card_image(folder: Path, name: str = "card.json", ep: int = 10_000,
               serial: int | None = None, profile: str = "iep-demo.toml") -> Path:
    """A demo purse card (from the fixture ``profile``; iep-miles-demo.toml adds a loyalty
    programme); ``serial`` gives it its own application serial (and so its own diversified
    keys); by default it is derived from ``name``."""
    if serial is None:
        serial = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")
    image = image_from_profile(fixture_path(profile), app_serial=f"{serial:020d}")
    image["app"]["ep"]["balance"] = ep
    path = folder / name
    save_new_image(path, image, overwrite=True)
    return path


@dataclass
class System:
    """Everything on loopback: bank, load server, payment server, merchant, and a clearing
    database; for ``svcard demo``, the money tests and the simulation."""

    folder: Path
    pay: Stack
    load: LoadStack
    admin_token: str = field(repr=False)
    clearing_db: str = ""
    sp: SpStack | None = None
    sp_purses: list[Path] = field(default_factory=list)

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
        from ..settle import clearing as CL
        from ..settle.config import clearing_config
        from ..settle.db import make_engine as make_clearing_engine

        config = clearing_config(fixture_path("clearing-demo.toml"))
        return CL.run_clearing(config, self.batch_dir, make_clearing_engine(self.clearing_db),
                               self.folder / "settlement",
                               load_db_urls=(str(self.load.load_server.config.db_url),))

    def audit(self, cards: list[Path], opening: int = 0, **options: Any) -> AuditReport:
        """The audit of this system with ``cards``; ``options`` go to
        :func:`svcard.host.settle.audit.audit` (max_age_ms, now, open_batches)."""
        from ..settle.audit import audit, card_balances

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

    def start_sp(self, *, purses: int = 2, ep: int = 0, account: str = "sp",
                 funds: int = 100_000, secret: str = "sp-demo-secret",
                 topup_threshold: int = 1_000, topup_amount: int = 5_000,
                 first_serial: int = 9_000_001, **config: Any) -> SpStack:
        """The SP server (seed 001) selling this system's merchant's items, paying with a pool
        of ``purses`` demo purse cards (``ep`` each) that top up from ``account`` at this
        system's bank (opened here with ``funds``) through the load flow; ``config`` goes to
        :func:`svcard.host.sp.stack.demo_config` (billing, wholesale, fee...). Closed with the
        system; its purse images are :attr:`sp_purses` (for the audit's card balances)."""
        if self.sp is not None:
            raise RuntimeError("this system runs an SP already")
        folder = self.folder / "sp"
        self.load.account(account, funds, secret)
        images = purse_images(folder / "purses", purses, ep=ep, first_serial=first_serial)
        pool = PursePoolConfig(readers=[f"virtual:{p}" for p in images],
                               bank_url=self.load.bank_url, account=account, secret=secret,
                               currency_code=self.load.bank_server.config.currency_code,
                               topup_threshold=topup_threshold, topup_amount=topup_amount)
        self.sp = start_sp_stack(demo_config(folder, self.pay.merchant.url, purses=pool,
                                             **config))
        self.sp_purses = images
        return self.sp

    def close_sp(self) -> None:
        """Stop the SP server (its purse images stay, in :attr:`sp_purses`)."""
        if self.sp is not None:
            self.sp.close()
            self.sp = None

    def close(self) -> None:
        self.close_sp()
        ask_to_stop(servers(self.pay, self.load))
        self.pay.close()
        self.load.close()


def servers(pay: Stack, load: LoadStack) -> list[ServerThread]:
    """The server threads of a payment stack (with its added merchants) and a load stack."""
    return [pay.payment, pay.merchant, *(m.thread for m in pay.merchants), load.bank, load.load]


def ask_to_stop(threads: Iterable[ServerThread]) -> None:
    """Tell every server to stop before waiting for any: each one's stop waits for its loop's
    next turn (about 0.1 s), so the waits overlap instead of adding up."""
    for thread in threads:
        thread.server.should_exit = True


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
