"""The mediating trusted agent SIGKILLed in the middle of a close, as real processes from
their TOML files (``svcard serve trade-*``): once after it cleared a session but before the
merchant account manager had its clearing information, once before the customer's record
reached it. After a restart each session clears exactly once: one withdrawal record, one
deposit record, one set of clearing postings, and the books close."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from test_trade_serve import Party

from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade import records
from svcard.host.trade.money import Amount
from svcard.host.trade.server.account import add_customer


@pytest.fixture
def parties(tmp_path: Path) -> Iterator[dict[str, Party]]:
    am = Party(tmp_path, "am1", "account-manager")
    acq = Party(tmp_path, "acq1", "acquirer")
    shop = Party(tmp_path, "shop", "merchant")
    mam = Party(tmp_path, "mam1", "merchant-account")
    am.write(f'billing = "{tmp_path / "billing-am1"}"\n[[operator]]\nid = "op1"\n'
             f'acquirer = "acq1"\nurl = "{acq.url}"\npublic_key = "{acq.public.hex()}"\n')
    acq.write(f'grace_seconds = 60\n[[account_manager]]\nid = "am1"\n'
              f'public_key = "{am.public.hex()}"\nurl = "{am.url}"\n'
              f'[[merchant]]\nid = "shop"\nurl = "{shop.url}"\n'
              f'public_key = "{shop.public.hex()}"\ncurrency = "KWD"\n'
              f'[merchant_account]\nid = "mam1"\nurl = "{mam.url}"\n'
              f'public_key = "{mam.public.hex()}"\n'
              '[table]\nissuer = "bank-m"\nbase = "EUR"\nissued = 2020-01-01T00:00:00Z\n'
              'expires = 2099-01-01T00:00:00Z\nrates = { KWD = "0.3312", JPY = "158.2345" }\n')
    shop.write(f'currency = "KWD"\n[acquirer]\nid = "acq1"\nurl = "{acq.url}"\n'
               f'public_key = "{acq.public.hex()}"\n')
    mam.write(f'billing = "{tmp_path / "billing-mam1"}"\n[acquirer]\nid = "acq1"\n'
              f'public_key = "{acq.public.hex()}"\n')
    found = {"am1": am, "acq1": acq, "shop": shop, "mam1": mam}
    yield found
    for p in found.values():
        p.kill()


def wait_for(path: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never came"
        time.sleep(0.05)


def count(engine: object, table: object, **where: str) -> int:
    with engine.connect() as conn:   # type: ignore[attr-defined]
        q = select(func.count()).select_from(table)   # type: ignore[arg-type]
        for k, v in where.items():
            q = q.where(table.c[k] == v)   # type: ignore[attr-defined]
        return int(conn.execute(q).scalar_one())


def test_the_mediating_agent_killed_mid_close_clears_once(parties: dict[str, Party],
                                                          tmp_path: Path) -> None:
    am, acq, shop, mam = (parties[k] for k in ("am1", "acq1", "shop", "mam1"))
    for p in (am, acq, shop):      # the merchant account manager is down at first
        p.start()
    am_engine = D.am_engine(am.db)
    keys = {}
    for who in ("alice", "bob"):
        private, public = C.S.new_key()
        add_customer(am_engine, who, public, "EUR", 50_00)
        keys[who] = private
    with httpx.Client(timeout=30) as http:
        def session(who: str) -> C.Session:
            s = C.open_session(http, am.url, "am1", am.public, who, keys[who], "shop",
                               shop.url, "op1", Amount(10_00, "EUR"), unit=10)
            for item in ("tea", "cake", "tea"):
                C.buy(http, s, item, 2)
            return s

        # 1. cleared, the customer's AM told, the merchant AM not yet: SIGKILL
        a, b = session("alice"), session("bob")
        assert C.close(http, a)["clearing"]["outcome"] == "agreed"
        wait_for(tmp_path / "billing-am1" / "withdrawals" / f"{a.session}.json")
        acq.kill()
        # 2. the acquirer down when the customer's record comes: the close fails, in doubt
        with pytest.raises(C.TradeError, match="502"):
            C.close(http, b)
        mam.start()
        acq.start()
        wait_for(tmp_path / "billing-mam1" / "deposits" / f"{a.session}.json")
        got = C.close(http, b)          # the same record again, now taken
        assert got["clearing"]["outcome"] == "agreed" and got["clearing"]["paid"] == 60
        wait_for(tmp_path / "billing-mam1" / "deposits" / f"{b.session}.json")
        wait_for(tmp_path / "billing-am1" / "withdrawals" / f"{b.session}.json")
    acq_engine, mam_engine = D.acq_engine(acq.db), D.mam_engine(mam.db)
    deadline = time.monotonic() + 30
    while count(acq_engine, D.acq_clearings, am_done=1, mam_done=1) < 2:   # receipts
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for s in (a, b):
        assert count(am_engine, D.am_withdrawals, session=s.session) == 1
        assert count(mam_engine, D.mam_deposits, session=s.session) == 1
        assert count(acq_engine, D.acq_postings, session=s.session, event="clearing") == 7
    b_ = records.books([acq_engine], [am_engine], [mam_engine])
    assert b_.problems == [] and b_.deposits == {"KWD": 120}
    for e in (am_engine, acq_engine, mam_engine):
        e.dispose()
