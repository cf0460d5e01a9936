#!/usr/bin/env python3
"""Trading sessions (seed 004): purchases per second inside one session, verified by the
merchant agent, on one core.

    python benchmarks/bench_trade.py            # the figures
    python benchmarks/bench_trade.py --smoke    # a short run for CI (figures not meaningful)
    python benchmarks/bench_trade.py --clearing-sessions 10000   # the clearing part's size

A purchase reveals the next PayWord link; the merchant checks it by hashing it once down to the
link it holds (``Verifier.take``): no signature per purchase. Goal: >= 10,000 purchases/s. Also
shown: the same with the customer's signed order (``sign(order)^c``) verified on every
purchase (one Ed25519 verification each), the customer's cost to make a purchase (its link and
its signed order), the one-off commitment check at session start, the latency of a session's
set-up through the three servers on loopback and of one purchase over HTTP.

Clearing (FIG. 3): the mediating agent's own code (``server/closer.py``) on its SQLite
database (WAL, synchronous FULL), without HTTP: N sessions (10,000; 200 with --smoke), each
with a few purchases, both sides' records taken (``store_record``, 2 N records), then every
session compared and cleared (``Closer.close``: the evidence check, the postings, the signed
clearing information, ONE step each). Shown: records taken/s, sessions cleared/s and
records/s, database commits (one fsync each) per session, and the agent's CPU per session.
Steps arrive concurrently (as from many HTTP requests), so the server's group commit shares
one fsync among many steps; the same clearing one step at a time is shown for comparison.
The books are checked afterwards (``records.books``: every posting sums to zero, the
rounding account holds the conversions' leftovers).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import event, insert, update

from svcard.host.trade import closing as K
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade import records
from svcard.host.trade import signing as S
from svcard.host.trade.config import AcquirerConfig, MerchantPeer
from svcard.host.trade.money import Amount, conversion_postings, convert
from svcard.host.trade.payword import Commitment, Verifier, Wallet, order_payload
from svcard.host.trade.server.acquirer import Acquirer, rate_text
from svcard.host.trade.server.closer import store_record
from svcard.host.trade.stack import demo_table, start_trade

GOAL = 10_000
NOW = 1_800_000_000_000


def session(length: int) -> tuple[Wallet, bytes, Verifier, float]:
    private, public = S.new_key()
    wallet = Wallet.new(length)
    c = Commitment("am1.1", "shop", wallet.root, length, 1, "EUR", NOW + 3_600_000)
    body = c.body()
    sig = S.sign(private, S.COMMITMENT, body)
    t = time.perf_counter()
    verifier = Verifier.open(body, sig, public, "am1.1", "shop", NOW)
    return wallet, private, verifier, time.perf_counter() - t


def one_session(i: int, merchant_key: bytes, table: Any, now: int
                ) -> tuple[dict[str, Any], list[tuple[str, Amount]], list[tuple[str, str, str]]]:
    """Session ``am1.i`` as the mediating agent holds it (its row and its conversion's
    postings) and both sides' signed records of 3 purchases (side, body, signature)."""
    session = f"am1.{i}"
    key, public = S.new_key()
    rate = table.rate("EUR", "JPY", now)
    conv = convert(Amount(10_00 + i % 500, "EUR"), "JPY", rate)
    length = 20
    wallet = Wallet.new(length)
    c = Commitment(session, "shop", wallet.root, length, 1, "JPY", now + 3_600_000)
    commitment = c.body()
    entries, last = [], ("", "", "", "")
    for units in (1, 2, 3):
        index, link = wallet.pay(units)
        order = S.canonical(order_payload(session, index, "song", units))
        signature = S.sign(key, S.ORDER, order)
        entries.append(K.entry(index, "song", units, signature))
        last = (str(index), link.hex(), order.decode(), signature)
    evidence = {"index": int(last[0]), "link": last[1], "commitment": commitment.decode(),
                "commitment_signature": S.sign(key, S.COMMITMENT, commitment),
                "order": last[2], "order_signature": last[3]}
    out = []
    for side, party, secret, ev, signer in (
            ("merchant", "shop", merchant_key, evidence, merchant_key),
            ("customer", f"p{i}", wallet.seed, None, key)):
        rec = K.make_record(session, side, party, "terminated", "JPY", 1, entries,
                            K.record_key(secret, session, side), now // 1000, ev)
        body = S.canonical(rec)
        out.append((side, body.decode(), S.sign(signer, S.RECORD, body)))
    row = {"session": session, "account_manager": "am1", "txn": secrets.token_hex(16),
           "digest": "0" * 64, "merchant": "shop", "pseudonym": f"p{i}",
           "session_key": public.hex(), "deposit_customer": conv.source.minor,
           "currency_customer": "EUR", "deposit_merchant": conv.target.minor,
           "currency_merchant": "JPY", "rate": rate_text(rate),
           "rounding": conv.rounding.minor, "table_issuer": table.issuer, "state": D.OPEN,
           "reason": "", "expires": now + 3_600_000, "created": now, "updated": now}
    return row, conversion_postings(conv, "am1", f"deposit:{session}"), out


async def clear_all(acquirer: Acquirer, sessions: list[str], in_flight: int) -> None:
    gate = asyncio.Semaphore(in_flight)

    async def one(session: str) -> None:
        async with gate:
            row = await acquirer.sql(_row, acquirer, session)
            got = await acquirer.closer.close(row, "terminated", pull=False)
            if got is None or got["outcome"] != "agreed":
                raise SystemExit(f"{session} did not clear as agreed: {got}")

    await asyncio.gather(*(one(s) for s in sessions))


def _row(acquirer: Acquirer, session: str) -> dict[str, Any]:
    from svcard.host.kit.db import first_row

    row = first_row(acquirer.engine, D.acq_sessions, session=session)
    assert row is not None
    return row


async def take_all(acquirer: Acquirer, recs: list[tuple[str, str, str, str]], now: int,
                   in_flight: int) -> None:
    gate = asyncio.Semaphore(in_flight)

    async def one(session: str, side: str, body: str, signature: str) -> None:
        async with gate:
            got = await acquirer.sql(store_record, acquirer.engine, session, side,
                                     "shop" if side == "merchant" else "am1", body, signature,
                                     "", now)
            assert got == "new", got

    await asyncio.gather(*(one(*r) for r in recs))


def clearing(n: int, serial: int, in_flight: int) -> None:
    """The clearing figures (see the module text)."""
    now = int(time.time() * 1000)
    table = demo_table(now)
    merchant_key, merchant_public = S.new_key()
    t = time.perf_counter()
    by_clock = max(20, n // 5)
    made = [one_session(i, merchant_key, table, now)
            for i in range(1, n + serial + by_clock + 1)]
    prepare = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as folder:
        config = AcquirerConfig("acq1", S.new_key()[0], f"sqlite:///{folder}/acq1.db",
                                {"am1": S.new_key()[1]},
                                {"shop": MerchantPeer("shop", "", merchant_public, "JPY")},
                                table)
        acquirer = Acquirer(config)
        try:
            with acquirer.engine.begin() as conn:      # the sessions as initiation left them
                conn.execute(insert(D.acq_sessions), [row for row, _, _ in made])
                conn.execute(insert(D.acq_postings), [
                    {"session": row["session"], "event": "deposit", "account": account,
                     "currency": amount.code, "minor": amount.minor, "at": now}
                    for row, postings, _ in made for account, amount in postings])
            commits = [0]
            event.listen(acquirer.engine, "commit", lambda _conn: commits.__setitem__(
                0, commits[0] + 1))
            recs = [(row["session"], side, body, sig) for row, _, out in made
                    for side, body, sig in out]
            t, cpu = time.perf_counter(), time.process_time()
            asyncio.run(take_all(acquirer, recs, now, in_flight))
            take_s, take_cpu = time.perf_counter() - t, time.process_time() - cpu
            take_commits = commits[0]
            sessions = [row["session"] for row, _, _ in made]
            commits[0] = 0
            t, cpu = time.perf_counter(), time.process_time()
            asyncio.run(clear_all(acquirer, sessions[:n], in_flight))
            clear_s, clear_cpu = time.perf_counter() - t, time.process_time() - cpu
            clear_commits = commits[0]
            t = time.perf_counter()
            asyncio.run(clear_all(acquirer, sessions[n:n + serial], 1))
            serial_s = time.perf_counter() - t
            clock = sessions[n + serial:]          # past their expiry: the clock clears them
            with acquirer.engine.begin() as conn:
                conn.execute(update(D.acq_sessions).where(D.acq_sessions.c.session.in_(
                    clock)).values(expires=now - 1))
            acquirer.config.grace_ms = 1
            commits[0] = 0
            t, cleared = time.perf_counter(), 0
            while got := asyncio.run(acquirer.closer.tick())["cleared"]:
                cleared += got
            clock_s, clock_commits = time.perf_counter() - t, commits[0]
            if cleared != len(clock):
                raise SystemExit(f"the clock cleared {cleared} of {len(clock)}")
            b = records.books([acquirer.engine], [], [])
            if b.problems:
                raise SystemExit(f"the books do not close: {b.problems[:3]}")
        finally:
            acquirer.close()
    print(f"clearing, {n:,} sessions of 3 purchases (SQLite, synchronous FULL; sessions "
          f"and records made in {prepare:.1f} s, not counted):")
    print(f"  records taken (store_record, {in_flight} in flight): "
          f"{len(recs) / take_s:9,.0f} records/s, {take_commits / len(recs):.3f} commits "
          f"per record, CPU {take_cpu / len(recs) * 1e6:.0f} us per record")
    print(f"  compared and cleared ({in_flight} in flight):          "
          f"{n / clear_s:9,.0f} sessions/s = {2 * n / clear_s:,.0f} records/s; "
          f"{clear_commits / n:.3f} commits (fsyncs) per session; agent CPU "
          f"{clear_cpu / n * 1000:.2f} ms per session")
    print(f"  the same one step at a time ({serial} sessions):        "
          f"{serial / serial_s:9,.0f} sessions/s (one commit, one fsync, each)")
    print(f"  cleared by the clock (expired, Closer.tick; {len(clock)} sessions):     "
          f"{len(clock) / clock_s:9,.0f} sessions/s; {clock_commits / len(clock):.3f} "
          "commits per session")
    print(f"  books: every currency's postings sum to 0, rounding accounted "
          f"({', '.join(f'{k} {sum(v.values())}' for k, v in b.acquirer.items())})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a short run for CI")
    ap.add_argument("--purchases", type=int, default=None)
    ap.add_argument("--clearing-sessions", type=int, default=None,
                    help="sessions cleared in the clearing part (10,000; 200 with --smoke)")
    ap.add_argument("--in-flight", type=int, default=256,
                    help="clearing steps under way at once (as from concurrent requests)")
    args = ap.parse_args()
    n = args.purchases or (2_000 if args.smoke else 200_000)

    wallet, private, verifier, commit_s = session(n)
    t = time.perf_counter()
    payments = [wallet.pay(1) for _ in range(n)]
    make_links = time.perf_counter() - t
    t = time.perf_counter()
    for index, link in payments:
        verifier.take(index, link)
    hashes_only = n / (time.perf_counter() - t)
    assert verifier.index == n

    m = max(200, n // 20)
    wallet, private, verifier, _ = session(m)
    t = time.perf_counter()
    orders = []
    for _ in range(m):
        index, link = wallet.pay(1)
        body = S.canonical(order_payload("am1.1", index, "article", 1))
        orders.append((index, link, body, S.sign(private, S.ORDER, body)))
    customer = m / (time.perf_counter() - t)
    public = S.public_of(private)
    t = time.perf_counter()
    for index, link, body, sig in orders:
        if not S.verify(public, S.ORDER, body, sig):
            raise SystemExit("an order did not verify")
        verifier.take(index, link)
    with_orders = m / (time.perf_counter() - t)

    print(f"purchases verified by the merchant (hash only): {hashes_only:12,.0f}/s "
          f"(goal >= {GOAL:,}/s; {n:,} purchases, one core)")
    print(f"  with each signed order verified too:          {with_orders:12,.0f}/s")
    print(f"customer: link + signed order per purchase:     {customer:12,.0f}/s")
    print(f"customer: chain of {n:,} links made in {make_links * 1000:.1f} ms; "
          f"commitment checked in {commit_s * 1e6:.0f} us")
    sessions = 5 if args.smoke else 50
    with tempfile.TemporaryDirectory() as folder:
        stack = start_trade(Path(folder))
        try:
            who = stack.customer("bench", 10**9)
            with httpx.Client(timeout=60) as http:
                setup, over_http = [], []
                for _ in range(sessions):
                    t = time.perf_counter()
                    s = stack.open(http, who, 1_00)
                    setup.append(time.perf_counter() - t)
                s = stack.open(http, who, 10_00)      # 1582 links of 1 JPY
                for _ in range(sessions * 4):
                    t = time.perf_counter()
                    C.buy(http, s, "song", 1)
                    over_http.append(time.perf_counter() - t)
        finally:
            stack.close()
    print(f"session set-up (initiation through 3 servers + commitment), SQLite, loopback: "
          f"median {statistics.median(setup) * 1000:.1f} ms over {sessions}")
    print(f"one purchase over HTTP to the merchant agent (SQLite):  "
          f"median {statistics.median(over_http) * 1000:.2f} ms")
    clearing(args.clearing_sessions or (200 if args.smoke else 10_000),
             20 if args.smoke else 300, args.in_flight)
    if not args.smoke and hashes_only < GOAL:
        raise SystemExit(f"below the goal of {GOAL:,}/s")


if __name__ == "__main__":
    main()
