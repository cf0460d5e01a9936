#!/usr/bin/env python3
"""Clearing throughput: records per second for one 100,000-record PSAM batch.

    python benchmarks/bench_clearing.py [--records 100000] [--cards 2000] [--smoke]

Builds a batch the way a PSAM closes one (each record with the card's real TAC, made with the
demo issuer's diversified TAC keys; the batch MAC under the demo batch key), then times a whole
``svcard clearing`` run on it: batch MAC, every record's TAC, duplicate checks, the cleared
records and the ledger into SQLite (synchronous=FULL), the settlement file and its JSON Lines
twin. Target: >= 50,000 records/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from svcard.card.personalise import load_issuer
from svcard.fixtures import fixture_path
from svcard.host.settle import clearing as CL
from svcard.host.settle.config import clearing_config
from svcard.host.settle.db import make_engine as make_clearing_engine
from svcard.protocols import crypto
from svcard.protocols import purse as P

TERMINAL = bytes.fromhex("000000000001")


def make_batch(path: Path, records: int, cards: int) -> int:
    issuer = load_issuer(fixture_path("demo-issuer.toml"))
    config = clearing_config(fixture_path("clearing-demo.toml"))
    batch_key = config.terminals[TERMINAL].batch_key
    counters = [0] * cards
    raw = []
    total = 0
    date, time_ = bytes.fromhex("20261122"), bytes.fromhex("120000")
    for ttn in range(1, records + 1):
        card = ttn % cards
        serial = (1_000_000 + card).to_bytes(8, "big")
        amount = 1 + ttn % 997
        tac = crypto.tac(crypto.card_key(issuer.tac, serial), crypto.purchase_tac_input(
            amount, P.TYPE_EP_PURCHASE, TERMINAL, ttn, date, time_))
        raw.append(P.PsamRecord.build({
            "terminal_txn_number": ttn, "issuer_id": issuer.issuer_id, "card_serial": serial,
            "card_counter": counters[card], "amount": amount, "txn_type": P.TYPE_EP_PURCHASE,
            "terminal_id": TERMINAL, "date": date, "time": time_, "tac": tac, "status": 0}))
        counters[card] += 1
        total += amount
    header = P.BatchHeader.build({"terminal_id": TERMINAL, "batch_number": 1,
                                  "record_count": records, "total_amount": total})
    mac = crypto.cbc_mac(batch_key, header + b"".join(raw))
    path.write_text(json.dumps({"terminal_id": TERMINAL.hex().upper(), "batch_number": 1,
                                "record_count": records, "total_amount": total,
                                "mac": mac.hex().upper(), "psam_id": "0" * 20,
                                "records": [r.hex().upper() for r in raw], "proofs": {}}))
    return total


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--cards", type=int, default=2_000)
    parser.add_argument("--smoke", action="store_true", help="a small run, for CI")
    args = parser.parse_args()
    records = 2_000 if args.smoke else args.records
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "batches").mkdir()
        t0 = time.perf_counter()
        total = make_batch(folder / "batches" / "batch.json", records, args.cards)
        built = time.perf_counter() - t0
        config = clearing_config(fixture_path("clearing-demo.toml"))
        engine = make_clearing_engine(f"sqlite:///{folder / 'clearing.db'}")
        t0 = time.perf_counter()
        report = CL.run_clearing(config, folder / "batches", engine, folder / "out")
        elapsed = time.perf_counter() - t0
    assert report.records_cleared == records and report.total_paid == total, report.batches
    rate = records / elapsed
    print(f"batch of {records:,} records ({args.cards:,} cards) built in {built:.2f} s")
    print(f"clearing run: {elapsed:.2f} s = {rate:,.0f} records/s "
          f"(target >= 50,000/s: {'met' if rate >= 50_000 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
