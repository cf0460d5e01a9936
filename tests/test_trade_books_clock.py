"""The mediating agent's clock clears the sessions due together (``Closer.tick``): each
clearing is still ONE step of its own, but their steps share the writer's group commit, so
60 expired sessions cost a few commits (fsyncs), not 60; each session is cleared exactly once
and the agent's books close (every posting sums to zero, the rounding account holds what its
conversions left). The sessions and both sides' records are made as in
benchmarks/bench_trade.py's clearing part."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from pathlib import Path
from types import ModuleType

from sqlalchemy import event, func, insert, select, update

from svcard.host.trade import db as D
from svcard.host.trade import records
from svcard.host.trade import signing as S
from svcard.host.trade.config import AcquirerConfig, MerchantPeer
from svcard.host.trade.server.acquirer import Acquirer
from svcard.host.trade.server.closer import store_record
from svcard.host.trade.stack import demo_table

ROOT = Path(__file__).resolve().parent.parent


def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_trade",
                                                  ROOT / "benchmarks" / "bench_trade.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_clock_clears_due_sessions_once_sharing_commits(tmp_path: Path) -> None:
    n = 60
    now = int(time.time() * 1000)
    table = demo_table(now)
    merchant_key, merchant_public = S.new_key()
    made = [bench().one_session(i, merchant_key, table, now) for i in range(1, n + 1)]
    acquirer = Acquirer(AcquirerConfig(
        "acq1", S.new_key()[0], f"sqlite:///{tmp_path / 'acq1.db'}", {"am1": S.new_key()[1]},
        {"shop": MerchantPeer("shop", "", merchant_public, "JPY")}, table, grace_ms=1))
    try:
        with acquirer.engine.begin() as conn:
            conn.execute(insert(D.acq_sessions), [{**row, "expires": now - 1}
                                                  for row, _, _ in made])
            conn.execute(insert(D.acq_postings), [
                {"session": row["session"], "event": "deposit", "account": account,
                 "currency": amount.code, "minor": amount.minor, "at": now}
                for row, postings, _ in made for account, amount in postings])
        for row, _, out in made:
            for side, body, signature in out:
                assert store_record(acquirer.engine, row["session"], side, "x", body,
                                    signature, "", now) == "new"
        commits = [0]
        event.listen(acquirer.engine, "commit",
                     lambda _conn: commits.__setitem__(0, commits[0] + 1))
        done = asyncio.run(acquirer.closer.tick())
        assert done["cleared"] == n
        assert commits[0] <= n // 4, f"{commits[0]} commits for {n} clearings"
        assert asyncio.run(acquirer.closer.tick())["cleared"] == 0      # nothing twice
        with acquirer.engine.connect() as conn:
            cleared = conn.execute(select(func.count()).select_from(D.acq_clearings)
                                   .where(D.acq_clearings.c.outcome == "agreed")).scalar_one()
            postings = conn.execute(select(func.count()).select_from(D.acq_postings)
                                    .where(D.acq_postings.c.event == "clearing")).scalar_one()
            still = conn.execute(select(func.count()).select_from(D.acq_sessions).where(
                D.acq_sessions.c.state == D.OPEN)).scalar_one()
        assert (cleared, still) == (n, 0) and postings == 7 * n
        assert records.books([acquirer.engine], [], []).problems == []
        with acquirer.engine.begin() as conn:   # a rounding posting changed: found
            conn.execute(update(D.acq_postings).where(
                D.acq_postings.c.account == "rounding", D.acq_postings.c.event == "clearing",
                D.acq_postings.c.session == "am1.7").values(minor=D.acq_postings.c.minor + 1))
        problems = records.books([acquirer.engine], [], []).problems
        assert any("account rounding JPY" in p for p in problems), problems
    finally:
        acquirer.close()
