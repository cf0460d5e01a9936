#!/usr/bin/env python3
"""Costs that must not grow with the work done (issue 16, point 2).

    python benchmarks/bench_growth.py journal [--payments 1000,10000,100000]
    python benchmarks/bench_growth.py clearing [--files 1000,10000]
    python benchmarks/bench_growth.py inputs [--loads 10000,100000] [--held 100000]

``journal``: the client terminal's start-up: a fresh :class:`Journal` (a new ``svcard pay``
process) answering ``unfinished()`` over a journal of N finished payments (six lines each, as
``pay.client`` writes them) and one open. Timed twice: the first reader (no checkpoint yet) and
a later one (one more payment appended after the checkpoint the first wrote), median of 5.

``clearing``: ``svcard clearing run`` over a folder where N batch files (one record each) were
already cleared, plus one new batch: the run's wall time (median of 3), against the first run;
``--history R`` puts R records cleared by earlier runs into the database first.

``inputs``: clearing's other inputs. A load server database with N ``loaded`` loads, all moved
by a first run, and H held records of one PSAM in the clearing database: a later run's wall time
(median of 3) with 5 new loads and one new late-proofs file (one proof).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from svcard.host.terminal.journal import Journal

SERIAL = "0000000000000001"


def payment_lines(n: int) -> list[str]:
    txn = f"{n:032x}"
    params = {"merchant_id": "4D45524348414E54", "txn_id": txn, "amount": 1250,
              "currency_code": "0156", "currency_exponent": 2, "terminal_id": "000000000001",
              "variant": "fig7", "description": "ticket", "payment_url": "http://127.0.0.1:8080",
              "status_url": f"http://127.0.0.1:8081/v1/orders/{txn}/status",
              "expires": 1795000000, "order_ref": f"order-{n}"}
    steps: list[dict[str, Any]] = [
        {"state": "draw", "params": params, "card_serial": SERIAL, "aid": "F05356434152440101",
         "counter": n, "txn_type": 6, "balance": 10_000_000 - n},
        {"state": "debit-sent", "debit": "8054010015" + "00" * 21},
        {"state": "debited", "tac": "11223344", "mac2": "55667788"},
        {"state": "confirmed"},
        {"state": "goods", "goods": f"ticket-{n}"},
        {"state": "done", "goods": f"ticket-{n}", "item": "ticket", "receipt": {"n": n}}]
    return [json.dumps({"txn_id": txn, **s}) + "\n" for s in steps]


def timed(fn: Any, times: int) -> float:
    out = []
    for _ in range(times):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def bench_journal(sizes: list[int]) -> None:
    from svcard.host.terminal import journal as J

    every = getattr(J, "CHECKPOINT_EVERY", 64 * 1024)   # (the code before has none: paired runs)

    print("journal start-up: payments, first reader ms, a later reader ms (best, worst), "
          "checkpoint KiB")
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "journal.jsonl"
            with path.open("w") as fh:
                for i in range(size):
                    fh.writelines(payment_lines(i))
                fh.write(payment_lines(size)[0])   # one open payment
            first = timed(lambda p=path: Journal(p).unfinished(SERIAL), 1)

            def later(p: Path = path, n: int = size) -> None:
                with p.open("a") as fh:   # a payment since the checkpoint
                    fh.writelines(payment_lines(n + 1 + int(time.time_ns() % 10**9)))
                assert len(Journal(p).unfinished(SERIAL)) == 1

            again = timed(later, 5)
            cp = path.with_name(path.name + ".checkpoint")
            kib = cp.stat().st_size / 1024 if cp.exists() else 0.0
            getattr(Journal(path), "checkpoint", lambda: None)()   # then just under a
            # checkpoint's worth of lines after it
            with path.open("a") as fh:
                n, added = size + 10**9, 0
                while added + 1200 < every:
                    lines = payment_lines(n)
                    added += sum(len(x) for x in lines)
                    fh.writelines(lines)
                    n += 1
            worst = timed(lambda p=path: Journal(p).unfinished(SERIAL), 1)
            print(f"{size:>8} {first * 1000:>10.1f} {again * 1000:>8.1f} {worst * 1000:>8.1f} "
                  f"{kib:>8.1f}", flush=True)


def write_batches(folder: Path, numbers: range) -> None:
    """One-record batches as a PSAM closes them (real card TAC, the demo batch key's MAC)."""
    from svcard.card.personalise import load_issuer
    from svcard.fixtures import fixture_path
    from svcard.host.settle.config import clearing_config
    from svcard.protocols import crypto
    from svcard.protocols import purse as P

    issuer = load_issuer(fixture_path("demo-issuer.toml"))
    terminal = bytes.fromhex("000000000001")
    key = clearing_config(fixture_path("clearing-demo.toml")).terminals[terminal].batch_key
    date, time_ = bytes.fromhex("20261122"), bytes.fromhex("120000")
    for n in numbers:
        serial, amount = (5_000_000 + n).to_bytes(8, "big"), 100 + n % 900
        tac = crypto.tac(crypto.card_key(issuer.tac, serial), crypto.purchase_tac_input(
            amount, P.TYPE_EP_PURCHASE, terminal, n, date, time_))
        raw = P.PsamRecord.build({
            "terminal_txn_number": n, "issuer_id": issuer.issuer_id, "card_serial": serial,
            "card_counter": 0, "amount": amount, "txn_type": P.TYPE_EP_PURCHASE,
            "terminal_id": terminal, "date": date, "time": time_, "tac": tac, "status": 0})
        header = P.BatchHeader.build({"terminal_id": terminal, "batch_number": n,
                                      "record_count": 1, "total_amount": amount})
        (folder / f"batch-{n:07d}.json").write_text(json.dumps({
            "terminal_id": terminal.hex().upper(), "batch_number": n, "record_count": 1,
            "total_amount": amount, "mac": crypto.cbc_mac(key, header + raw).hex().upper(),
            "psam_id": "0" * 20, "records": [raw.hex().upper()], "proofs": {}}))


def fill_history(engine: Any, rows: int) -> None:
    """``rows`` cleared records (and a batch per 1,000) from earlier runs, as a database holds
    them after days of clearing."""
    from svcard.host.settle import db as D

    with engine.begin() as conn:
        D.insert_many(conn, D.records, [
            (1, f"{9_000_000 + i // 50:016x}", i % 50, "00" * 8, "0" * 12, i, 1, "0" * 16,
             "0" * 16, "cleared", "", "0" * 20, i // 1000) for i in range(rows)],
            D.RECORD_COLUMNS)
        D.insert_many(conn, D.batches, [(1, "0" * 12, 1_000_000 + b, "00000000", "0" * 20, 1000,
                                         f"old-{b}.json") for b in range(rows // 1000)],
                      ["run_number", "terminal_id", "batch_number", "mac", "psam_id",
                       "record_count", "file"])


def bench_clearing(sizes: list[int], history: int) -> None:
    from svcard.fixtures import fixture_path
    from svcard.host.settle import clearing as CL
    from svcard.host.settle.config import clearing_config
    from svcard.host.settle.db import make_engine

    print(f"clearing run ({history:,} records cleared before): files handled before, "
          "first run s, a later run s (one new file)")
    config = clearing_config(fixture_path("clearing-demo.toml"))
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "batches"
            folder.mkdir()
            write_batches(folder, range(1, size + 1))
            time.sleep(2.1)   # older than clearing's FRESH_NS: their stat is settled
            engine = make_engine(f"sqlite:///{tmp}/clearing.db")
            fill_history(engine, history)
            start = time.perf_counter()
            CL.run_clearing(config, folder, engine, Path(tmp) / "out")
            first = time.perf_counter() - start
            later = []
            for k in range(3):
                write_batches(folder, range(size + 1 + k, size + 2 + k))
                start = time.perf_counter()
                report = CL.run_clearing(config, folder, engine, Path(tmp) / "out")
                later.append(time.perf_counter() - start)
                assert report.records_cleared == 1, report.batches[:3]
            print(f"{size:>8} {first:>10.2f} {statistics.median(later):>10.3f}", flush=True)


def bench_inputs(sizes: list[int], held: int) -> None:
    import sqlite3

    from svcard.fixtures import fixture_path
    from svcard.host.load.server.db import make_engine as load_engine
    from svcard.host.settle import clearing as CL
    from svcard.host.settle.config import clearing_config
    from svcard.host.settle.db import UNCLEARED_COLUMNS, insert_many, make_engine, uncleared
    from svcard.host.settle.proofs import PROOFS_FORMAT

    print(f"clearing run ({held:,} held records of one PSAM): loads moved before, "
          "first run s, a later run s (5 new loads, one proofs file)")
    config = clearing_config(fixture_path("clearing-demo.toml"))
    names = ["bank_id", "txn_id", "state", "amount", "currency_code", "issuer_id",
             "card_serial", "s1", "online_counter", "created", "updated", "reason", "evidence"]

    def add_loads(path: str, numbers: range) -> None:
        with sqlite3.connect(path) as raw:
            raw.executemany(f"INSERT INTO loads ({', '.join(names)}) VALUES "
                            f"({', '.join('?' * len(names))})",
                            [("0000000000000B01", f"T{n:09d}", "loaded", 100, 156,
                              "0102030405060708", f"{n:016X}", f"{n:08X}", n, 1, 1, "", "")
                             for n in numbers])

    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "batches"
            folder.mkdir()
            load_path = f"{tmp}/load.db"
            load_engine(f"sqlite:///{load_path}").dispose()
            add_loads(load_path, range(1, size + 1))
            urls = (f"sqlite:///{load_path}",)
            engine = make_engine(f"sqlite:///{tmp}/clearing.db")
            with engine.begin() as conn:
                insert_many(conn, uncleared, [
                    (0, 1, 1, "000000000001", "0" * 19 + "1", i // 1000, i % 1000, i,
                     f"{i:016X}", 0, 1, "00" * 60, "held", "no TAC") for i in range(held)],
                    UNCLEARED_COLUMNS)
            start = time.perf_counter()
            CL.run_clearing(config, folder, engine, Path(tmp) / "out", load_db_urls=urls)
            first = time.perf_counter() - start
            later = []
            for k in range(3):
                add_loads(load_path, range(size + 1 + 5 * k, size + 6 + 5 * k))
                (folder / f"proofs-{k}.json").write_text(json.dumps({
                    "format": PROOFS_FORMAT, "terminal_id": "000000000001",
                    "psam_id": "0" * 19 + "1", "proofs": [
                        {"batch_number": 10**6 + k, "terminal_txn_number": 1,
                         "tac": "00000000"}]}))
                start = time.perf_counter()
                report = CL.run_clearing(config, folder, engine, Path(tmp) / "out",
                                         load_db_urls=urls)
                later.append(time.perf_counter() - start)
                assert report.loads_moved == 5, report.loads_moved
            print(f"{size:>8} {first:>10.2f} {statistics.median(later):>10.3f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["journal", "clearing", "inputs"])
    parser.add_argument("--loads", default="10000,100000")
    parser.add_argument("--held", type=int, default=100_000,
                        help="held records of one PSAM in the clearing database (inputs)")
    parser.add_argument("--payments", default="1000,10000,100000")
    parser.add_argument("--files", default="1000,10000")
    parser.add_argument("--history", type=int, default=0,
                        help="records cleared by earlier runs already in the database")
    args = parser.parse_args()
    if args.what == "journal":
        bench_journal([int(x) for x in args.payments.split(",")])
    elif args.what == "inputs":
        bench_inputs([int(x) for x in args.loads.split(",")], args.held)
    else:
        bench_clearing([int(x) for x in args.files.split(",")], args.history)
    return 0


if __name__ == "__main__":
    sys.exit(main())
