"""A bank and a load server (with a software HSM) on loopback, for ``svcard demo``, the tests and
the benchmarks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...card.image import save_new_image
from ...card.personalise import image_from_profile
from ...fixtures import fixture_path
from ...reader import Reader
from ..kit.serving import ServerThread
from ..terminal.reader_specs import open_reader
from .bank.server import BankConfig, BankServer
from .server.app import BankAccount, LoadConfig, LoadServer

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
                     shared_key: bytes | None = None,
                     bank_options: dict[str, Any] | None = None) -> LoadStack:
    """``bank_options``: more :class:`BankConfig` fields, e.g. ``currency_code=999,
    currency_exponent=0`` for a loyalty programme's server in the bank's role (its member
    accounts hold points; docs/points.md)."""
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
        db_url=bank_db or f"sqlite:///{folder / 'bank.db'}", **(bank_options or {})))
    bank = ServerThread(bank_server.app())
    bank_server.config.public_url = bank.url
    bank.start()
    return LoadStack(folder, bank, load, bank_server, load_server, shared_key)
