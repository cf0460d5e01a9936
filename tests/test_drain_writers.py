"""Every SQLite-backed server commits the steps its writer still holds when it stops (issue 16):
the bank, the merchant server, the SP, the four trade servers and the wallet's financial system,
web server and gateway. Before, only the payment and load servers drained their writer; the others
ended their lifespan at once, and a process exiting then lost the group in flight (the writer
thread is a daemon). The five goods servers too. And the writer calls and thread hand-offs a
load costs at the bank and the load server (issue 16: loads' CPU)."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Engine, create_engine, text

from svcard.host.kit.db import step
from svcard.host.kit.serving import ServerThread, free_port


def _slow_write(engine: Engine, started: threading.Event) -> None:
    started.set()
    time.sleep(0.8)   # still running when the server is told to stop
    with step(engine) as conn:
        conn.execute(text("INSERT INTO drain_probe VALUES (1)"))


def _committed(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM drain_probe")).scalar_one())
    finally:
        engine.dispose()


def _bank(tmp: Path, url: str) -> tuple[Any, Engine]:
    from svcard.host.load.bank.server import BankConfig, BankServer
    server = BankServer(BankConfig(bytes(8), bytes(32), "http://127.0.0.1:9/v1/load",
                                   bytes(6), db_url=url))
    return server, server.db.engine


def _merchant(tmp: Path, url: str) -> tuple[Any, Engine]:
    from svcard.host.pay.merchant.server import MerchantConfig, MerchantServer
    server = MerchantServer(MerchantConfig(merchant_id=bytes(8), shared_key=bytes(16),
                                           payment_url="http://x", terminal_id=bytes(6),
                                           db_url=url))
    return server, server.db.engine


def _sp(tmp: Path, url: str) -> tuple[Any, Engine]:
    from svcard.host.sp.server.app import SpServer
    from svcard.host.sp.stack import demo_config
    server = SpServer(demo_config(tmp, "http://127.0.0.1:9", db_url=url), cast(Any, object()))
    return server, server.engine


def _trade(role: str) -> Callable[[Path, str], tuple[Any, Engine]]:
    def make(tmp: Path, url: str) -> tuple[Any, Engine]:
        from svcard.host.trade import signing as S
        from svcard.host.trade.config import (
            AccountManagerConfig,
            AcquirerConfig,
            MerchantAccountConfig,
            MerchantConfig,
            Peer,
        )
        from svcard.host.trade.server.account import AccountManager
        from svcard.host.trade.server.acquirer import Acquirer
        from svcard.host.trade.server.merchant import MerchantAgent
        from svcard.host.trade.server.merchant_account import MerchantAccount
        from svcard.host.trade.stack import demo_table
        key = S.new_key()[0]
        peer = S.public_of(S.new_key()[0])
        server: Any
        if role == "account":
            server = AccountManager(AccountManagerConfig(
                "am1", key, url, {}, table=demo_table(issuer="bank-c"),
                billing=tmp / "billing-am1"))
        elif role == "acquirer":
            server = Acquirer(AcquirerConfig("acq1", key, url, {}, {}, demo_table()))
        elif role == "merchant":
            server = MerchantAgent(MerchantConfig("shop", key, url, Peer("acq1", "", peer),
                                                  "JPY"))
        else:
            server = MerchantAccount(MerchantAccountConfig("mam1", key, url, {"acq1": peer},
                                                           tmp / "billing-mam1"))
        return server, server.engine
    return make


def _fin(tmp: Path, url: str) -> tuple[Any, Engine]:
    from svcard.host.wallet.config import FinConfig
    from svcard.host.wallet.fin.app import FinServer
    server = FinServer(FinConfig(secrets.token_bytes(32), {"gateway": bytes(32)}, db_url=url,
                                 mail_dir=tmp / "mail"))
    return server, server.engine


def _web(tmp: Path, url: str) -> tuple[Any, Engine]:
    from svcard.host.wallet.config import WebConfig
    from svcard.host.wallet.web.app import WebServer
    server = WebServer(WebConfig("http://127.0.0.1:9", bytes(32), db_url=url))
    return server, server.engine


def _gateway(tmp: Path, url: str) -> tuple[Any, Engine]:
    from svcard.host.wallet.config import GatewayConfig
    from svcard.host.wallet.gateway.app import GatewayServer
    server = GatewayServer(GatewayConfig(secrets.token_bytes(32), {"web": bytes(32)}, {}, {},
                                         "http://127.0.0.1:9", bytes(32), db_url=url))
    return server, server.engine


def _goods(role: str) -> Callable[[Path, str], tuple[Any, Engine]]:
    def make(tmp: Path, url: str) -> tuple[Any, Engine]:
        from svcard.host.goods.config import goods_config
        from svcard.host.goods.stack import SERVERS as GOODS
        from svcard.host.goods.stack import write_system
        server = GOODS[role](goods_config(write_system(tmp), role, url))
        return server, server.engine
    return make


SERVERS = {"bank": _bank, "merchant": _merchant, "sp": _sp,
           "trade-account": _trade("account"), "trade-acquirer": _trade("acquirer"),
           "trade-merchant": _trade("merchant"), "trade-merchant-account": _trade("mam"),
           "wallet-fin": _fin, "wallet-web": _web, "wallet-gateway": _gateway,
           **{f"goods-{role}": _goods(role) for role in ("merchant", "payment", "auth", "bank",
                                                           "fulfil")}}


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_a_step_held_by_the_writer_is_committed_when_the_server_stops(
        tmp_path: Path, name: str) -> None:
    url = f"sqlite:///{tmp_path / 'server.db'}"
    server, engine = SERVERS[name](tmp_path, url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE drain_probe (x INTEGER)"))
        thread = ServerThread(server.app(), port=free_port()).start()
        started = threading.Event()
        future = server.sql.executor.submit(_slow_write, engine, started)
        assert started.wait(10)
        thread.stop()
        assert future.done() and future.exception() is None, name
        assert _committed(url) == 1, name
    finally:
        close = getattr(server, "close", None)
        if close is not None:
            close()
        engine.dispose()


# --- how many writer calls a load start costs (issue 16: loads' CPU) --------------------------

def test_a_load_start_with_a_remembered_secret_is_one_writer_call(tmp_path: Path) -> None:
    """The bank read the secret's hash, the account's failure count and the request id's
    earlier load in three calls before its debit (4 in all); now the debit is in the same call
    as the reads. A retry with the same request id is still the same load, a wrong secret is
    still refused, and a secret changed in the database is no longer taken from memory."""
    import httpx

    from svcard.host.load.bank.server import BankConfig, BankServer
    url = f"sqlite:///{tmp_path / 'bank.db'}"
    server = BankServer(BankConfig(bytes(8), bytes(32), "http://127.0.0.1:9/v1/load",
                                   bytes(6), db_url=url))
    server.db.create_account("alice", "Alice", 156, 10_000, "pw")

    def start(request_id: str, secret: str = "pw") -> httpx.Response:
        return http.post(f"{thread.url}/v1/load/start", json={
            "account": "alice", "secret": secret, "amount": 1, "request_id": request_id,
            "card": {"serial": "00" * 9 + "01", "balance": 0, "limit": 100_000,
                     "currency_code": 156}})

    thread = ServerThread(server.app(), port=free_port()).start()
    try:
        with httpx.Client(timeout=30) as http:
            assert start("first-load").status_code == 200   # scrypt; the secret remembered
            writer = server.sql.executor
            before = writer.steps
            second = start("second-load")
            assert second.status_code == 200
            assert writer.steps - before == 1
            again = start("second-load")
            assert again.status_code == 200 and again.json()["txn_id"] == second.json()["txn_id"]
            assert start("third-load", "wrong").status_code == 403
            assert start("fourth-load").status_code == 200      # its failure count restarted
            with server.db.engine.begin() as conn:   # the account's secret changed
                conn.execute(text("UPDATE accounts SET secret_hash = 'x' WHERE account_id = "
                                  "'alice'"))
            assert start("fifth-load").status_code == 403
        assert server.db.account("alice")["balance"] == 10_000 - 3   # type: ignore[index]
    finally:
        thread.stop()
        server.db.engine.dispose()


def test_a_virtual_load_hsm_runs_on_the_event_loop_and_a_real_one_in_its_thread(
        tmp_path: Path) -> None:
    """A virtual HSM's command went to the HSM's thread and back (two thread hand-offs per
    command, ~0.4 ms of the load server's CPU per load); now it runs where it is awaited.
    Any other reader still runs in the HSM's own thread."""
    import asyncio

    from svcard.host.load.server.hsm_pool import HsmPool
    from svcard.host.load.stack import hsm_image
    from svcard.host.terminal.reader_specs import open_reader
    from svcard.reader import Reader

    class Wrapped(Reader):   # not a VirtualReader: stands for a PC/SC one
        def __init__(self, inner: Reader) -> None:
            self.inner = inner

        def connect(self) -> bytes:
            return self.inner.connect()

        def transmit(self, apdu: bytes) -> bytes:
            return self.inner.transmit(apdu)

        def disconnect(self) -> None:
            self.inner.disconnect()

    async def threads(pool: HsmPool) -> tuple[int, int]:
        await pool.start()
        try:
            member = await pool.acquire(5)
            try:
                return threading.get_ident(), await pool.run(
                    member, lambda reader: threading.get_ident())
            finally:
                pool.release(member)
        finally:
            pool.close()

    here, ran = asyncio.run(threads(HsmPool([open_reader(f"virtual:{hsm_image(tmp_path)}")])))
    assert ran == here
    (tmp_path / "b").mkdir()
    here, ran = asyncio.run(threads(HsmPool([Wrapped(open_reader(
        f"virtual:{hsm_image(tmp_path / 'b')}"))])))
    assert ran != here
