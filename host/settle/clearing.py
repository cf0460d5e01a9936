"""Clearing and settlement (seed FIG. 3 and the load-float paragraphs of FIG. 17).

``svcard clearing run`` takes the PSAM batches the payment servers handed to the concentration
point, and the load server's log, and in one database transaction:

1. checks each batch's MAC (the PSAM's batch key, 3DES CBC-MAC over header and records), its
   record count and total; refuses a tampered or already cleared batch whole, with a reason;
2. checks each record's card TAC through the issuer's TAC master key (diversified for the
   card): a good one is cleared, a wrong one refused, a missing one held (the card's debit is
   not proven: e.g. an early-released purchase whose card never answered); a record already
   cleared (same card and card counter) is refused as a duplicate; every record not cleared is
   kept (``uncleared_records``) with its state and reason;
2a. applies the late proofs files (``proofs-*.json``, written by the payment server when a
   FIG. 7/8 card proof arrives after its batch was closed) to the records it holds: the TAC is
   checked exactly as a batch record's; a good one clears and pays the record in this run, a
   wrong one is refused (the record stays held: an invalid message moves nothing); a file is
   processed once (``proof_files``); a held record whose card counter another cleared record
   used is ``superseded`` (the card's debit at that counter is the other one);
3. moves the funds of every load not yet moved from its bank into the issuer's float pool;
4. draws the float down by the cleared purchases, paid per acquirer and per merchant;
5. writes the settlement file (fixed layout, HMAC-SHA256, see
   :mod:`svcard.protocols.settlement`) and its JSON Lines twin.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import re
import struct
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    func,
    insert,
    select,
    update,
)

from ...protocols import crypto
from ...protocols import purse as P
from ...protocols import settlement as S
from ..kit.db import make_engine as make_db_engine
from ..kit.db import now_ms
from ..load.server.db import LoadDb
from ..load.server.db import make_engine as make_load_engine

metadata = MetaData()

runs = Table(
    "clearing_runs", metadata,
    Column("run_number", Integer, primary_key=True),
    Column("created", BigInteger, nullable=False),
    Column("file", String(300), nullable=False),
    Column("mac", String(64), nullable=False),
)
batches = Table(
    "cleared_batches", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_number", Integer, nullable=False),
    Column("terminal_id", String(12), nullable=False),
    Column("batch_number", BigInteger, nullable=False),
    Column("mac", String(8), nullable=False),
    Column("psam_id", String(20), nullable=False),
    Column("record_count", Integer, nullable=False),
    Column("file", String(300)),
    # PSAMs of one pool share a terminal id and each numbers its own batches and TTNs, so
    # the PSAM serial is part of a batch's identity (a replay under another serial still
    # finds each of its records already cleared)
    UniqueConstraint("terminal_id", "psam_id", "batch_number", "mac", name="uq_batch"),
)
records = Table(
    "cleared_records", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_number", Integer, nullable=False),
    Column("card_serial", String(16), nullable=False),
    Column("card_counter", Integer, nullable=False),
    Column("issuer_id", String(16), nullable=False),
    Column("terminal_id", String(12), nullable=False),
    Column("ttn", BigInteger, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("merchant_id", String(16), nullable=False),
    Column("acquirer_id", String(16), nullable=False),
    Column("state", String(8), nullable=False),     # cleared
    Column("reason", String(200), nullable=False),
    Column("psam_id", String(20)),
    Column("batch_number", BigInteger),
    UniqueConstraint("card_serial", "card_counter", name="uq_record_card_counter"),
)
# every record of an accepted batch that was not cleared when its batch was: held (no card
# TAC yet) -> cleared (a late proof's TAC verified) | refused | superseded; refused; skipped
uncleared = Table(
    "uncleared_records", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_number", Integer, nullable=False),
    Column("created", BigInteger, nullable=False),
    Column("updated", BigInteger, nullable=False),
    Column("terminal_id", String(12), nullable=False),
    Column("psam_id", String(20), nullable=False),
    Column("batch_number", BigInteger, nullable=False),
    Column("record_index", Integer, nullable=False),
    Column("ttn", BigInteger, nullable=False),
    Column("card_serial", String(16), nullable=False),
    Column("card_counter", Integer, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("record", String(2 * P.PSAM_RECORD_SIZE), nullable=False),
    Column("state", String(12), nullable=False),
    Column("reason", String(200), nullable=False),
    Column("resolved_run", Integer),
    UniqueConstraint("terminal_id", "psam_id", "batch_number", "record_index",
                     name="uq_uncleared_record"),
)
Index("ix_uncleared_proof", uncleared.c.terminal_id, uncleared.c.psam_id,
      uncleared.c.batch_number, uncleared.c.ttn)
Index("ix_uncleared_state", uncleared.c.state)
proof_files = Table(
    "proof_files", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_number", Integer, nullable=False),
    Column("file", String(300), nullable=False),
    Column("digest", String(64), nullable=False),
    Column("proof_count", Integer, nullable=False),
    Column("cleared", Integer, nullable=False),
    UniqueConstraint("file", name="uq_proof_file"),
    UniqueConstraint("digest", name="uq_proof_digest"),
)
moved_loads = Table(
    "moved_loads", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_number", Integer, nullable=False),
    Column("bank_id", String(16), nullable=False),
    Column("txn_id", String(32), nullable=False),
    Column("issuer_id", String(16), nullable=False),
    Column("card_serial", String(20), nullable=False),
    Column("amount", BigInteger, nullable=False),
    UniqueConstraint("bank_id", "txn_id", name="uq_moved_load"),
)
ledger = Table(
    "ledger", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_number", Integer, nullable=False),
    Column("account", String(40), nullable=False),   # bank:ID, float:ISSUER, acquirer:ID, ...
    Column("amount", BigInteger, nullable=False),    # + credit, - debit
    Column("memo", String(100), nullable=False),
)


class ClearingError(ValueError):
    """A settlement file that does not verify (its configuration: ``server_config``)."""


@dataclass(frozen=True)
class Terminal:
    terminal_id: bytes
    batch_key: bytes = field(repr=False)
    merchant_id: bytes
    acquirer_id: bytes


@dataclass(frozen=True)
class IssuerTac:
    issuer_id: bytes
    tac_master: bytes = field(repr=False)
    two_level: bool


@dataclass
class ClearingConfig:
    settlement_key: bytes = field(repr=False)
    issuers: dict[bytes, IssuerTac]
    terminals: dict[bytes, Terminal]


def make_engine(url: str) -> Engine:
    return make_db_engine(url, metadata)


# --- checking -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=65536)
def _card_tac_key(master: bytes, serial: bytes, issuer: bytes | None) -> bytes:
    return crypto.tac_key(crypto.card_key(master, serial, issuer))


@dataclass
class RecordVerdict:
    index: int
    record: Any
    state: str          # cleared | held | refused | skipped
    reason: str


class _Record(NamedTuple):
    """A PSAM record (:data:`~svcard.protocols.purse.PsamRecord`), unpacked fast."""

    terminal_txn_number: int
    issuer_id: bytes
    card_serial: bytes
    card_counter: int
    amount: int
    txn_type: int
    terminal_id: bytes
    date: bytes
    time: bytes
    tac: bytes
    status: int


_RECORD = struct.Struct(">I8s8sHIB6s4s3s4sB")
assert _RECORD.size == P.PSAM_RECORD_SIZE
_ZERO4 = bytes(4)


@dataclass
class BatchVerdict:
    """A batch's verdict and, per record (by index), its state and the reason if not cleared.
    States are kept as a flat list: a batch may hold 100,000 records."""

    file: str
    state: str          # cleared | refused
    reason: str
    terminal_id: str = ""
    batch_number: int = 0
    psam_id: str = ""
    mac: str = ""
    raw: list[bytes] = field(default_factory=list, repr=False)
    states: list[str] = field(default_factory=list, repr=False)
    reasons: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def records(self) -> list[RecordVerdict]:
        return [RecordVerdict(i, _Record(*_RECORD.unpack(raw)), st, self.reasons.get(i, ""))
                for i, (raw, st) in enumerate(zip(self.raw, self.states, strict=True))]

    def drop_records(self) -> None:
        self.raw, self.states, self.reasons = [], [], {}

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = defaultdict(int)
        amounts: dict[str, int] = defaultdict(int)
        for raw, st in zip(self.raw, self.states, strict=True):
            counts[st] += 1
            amounts[st] += int.from_bytes(raw[22:26], "big")
        problems = [{"index": i, "state": self.states[i], "reason": r}
                    for i, r in sorted(self.reasons.items())][:100]
        return {"file": self.file, "state": self.state, "reason": self.reason,
                "terminal_id": self.terminal_id, "batch_number": self.batch_number,
                "psam_id": self.psam_id, "counts": dict(counts), "amounts": dict(amounts),
                "problems": problems}


def check_batch(config: ClearingConfig, path: Path) -> BatchVerdict:
    """A batch file's MAC, count, total and every record's TAC (no database involved)."""
    name = path.name
    try:
        doc = json.loads(path.read_text())
        terminal_id = bytes.fromhex(doc["terminal_id"])
        number = int(doc["batch_number"])
        raw_records = [bytes.fromhex(r) for r in doc["records"]]
        mac = bytes.fromhex(doc["mac"])
        count, total = int(doc["record_count"]), int(doc["total_amount"])
        proofs = {int(k): bytes.fromhex(v) for k, v in doc.get("proofs", {}).items()}
        psam_id = str(doc.get("psam_id", "")).upper()
        if not _PSAM_ID.fullmatch(psam_id):
            raise ValueError("psam_id is not up to 20 hex digits")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        return BatchVerdict(name, "refused", f"not a batch file: {exc}")
    verdict = BatchVerdict(name, "refused", "", terminal_id.hex().upper(), number, psam_id,
                           mac.hex().upper())
    terminal = config.terminals.get(terminal_id)
    if terminal is None:
        verdict.reason = f"unknown terminal {terminal_id.hex().upper()}"
        return verdict
    if any(len(r) != P.PSAM_RECORD_SIZE for r in raw_records):
        verdict.reason = "a record has the wrong size"
        return verdict
    header = P.BatchHeader.build({"terminal_id": terminal_id, "batch_number": number,
                                  "record_count": count, "total_amount": total})
    expected = crypto.cbc_mac(terminal.batch_key, header + b"".join(raw_records))
    if not hmac.compare_digest(expected, mac):
        verdict.reason = "the batch MAC does not verify: tampered, or not this PSAM's batch"
        return verdict
    if count != len(raw_records) or total != sum(int.from_bytes(r[22:26], "big")
                                                 for r in raw_records):
        verdict.reason = "the record count or total does not match the records"
        return verdict
    verdict.state, verdict.reason = "cleared", "batch MAC verified"
    verdict.raw = raw_records
    verdict.states, verdict.reasons = _check_records(config, terminal, raw_records, proofs)
    return verdict


# --- late proofs ----------------------------------------------------------------------------

PROOFS_FORMAT = "svcard late proofs v1"
PROOFS_PREFIX = "proofs-"
MAX_PROOFS_FILE = 16 * 1024 * 1024   # bytes
MAX_PROOFS = 100_000                 # proofs in one file
_PSAM_ID = re.compile(r"[0-9A-F]{0,20}")
_HEX = re.compile(r"[0-9A-Fa-f]+")


@dataclass
class ProofsVerdict:
    """A late proofs file: refused whole (unreadable, malformed, already processed), or
    processed, with each proof's outcome: cleared | refused | not held."""

    file: str
    state: str          # processed | refused
    reason: str
    digest: str = ""
    terminal_id: str = ""
    psam_id: str = ""
    proofs: list[tuple[int, int, bytes]] = field(default_factory=list, repr=False)
    outcomes: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = defaultdict(int)
        for o in self.outcomes:
            counts[o["state"]] += 1
        return {"file": self.file, "state": self.state, "reason": self.reason,
                "terminal_id": self.terminal_id, "psam_id": self.psam_id,
                "counts": dict(counts),
                "problems": [o for o in self.outcomes if o["state"] != "cleared"][:100]}


def _hex_field(doc: dict[str, Any], name: str, size: int) -> bytes:
    value = doc.get(name)
    if not isinstance(value, str) or len(value) != 2 * size or not _HEX.fullmatch(value):
        raise ValueError(f"{name} is not {size} bytes of hex")
    return bytes.fromhex(value)


def _u32_field(doc: dict[str, Any], name: str) -> int:
    value = doc.get(name)
    if type(value) is not int or not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} is not an integer from 0 to 4294967295")
    return value


def read_proofs(path: Path) -> ProofsVerdict:
    """A late proofs file, parsed and bounded (no database involved)."""
    verdict = ProofsVerdict(path.name, "refused", "")
    try:
        if path.stat().st_size > MAX_PROOFS_FILE:
            raise ValueError(f"larger than {MAX_PROOFS_FILE} bytes")
        data = path.read_bytes()
        verdict.digest = hashlib.sha256(data).hexdigest()
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != PROOFS_FORMAT:
            raise ValueError(f"format is not {PROOFS_FORMAT!r}")
        verdict.terminal_id = _hex_field(doc, "terminal_id", 6).hex().upper()
        verdict.psam_id = _hex_field(doc, "psam_id", 10).hex().upper()
        items = doc.get("proofs")
        if not isinstance(items, list) or not items or len(items) > MAX_PROOFS:
            raise ValueError(f"proofs is not a list of 1 to {MAX_PROOFS} proofs")
        for item in items:
            if not isinstance(item, dict) or set(item) != {"batch_number",
                                                           "terminal_txn_number", "tac"}:
                raise ValueError("a proof is not {batch_number, terminal_txn_number, tac}")
            verdict.proofs.append((_u32_field(item, "batch_number"),
                                   _u32_field(item, "terminal_txn_number"),
                                   _hex_field(item, "tac", 4)))
    except (OSError, ValueError, RecursionError) as exc:
        verdict.proofs = []
        verdict.reason = f"not a late proofs file: {exc}"
        return verdict
    verdict.state, verdict.reason = "processed", f"{len(verdict.proofs)} proofs"
    return verdict


def _tac_input(raw: bytes) -> bytes:
    """purchase_tac_input(amount, type, terminal id, TTN, date, time), sliced from a record."""
    return raw[22:33] + raw[0:4] + raw[33:40]


def _check_records(config: ClearingConfig, terminal: Terminal, raw_records: list[bytes],
                   proofs: dict[int, bytes]) -> tuple[list[str], dict[int, str]]:
    """Every record's state, and the reason of each one not cleared. TACs are checked per card
    key, many at once (:func:`~svcard.protocols.crypto.cbc_macs_same_key`)."""
    states = ["cleared"] * len(raw_records)
    reasons: dict[int, str] = {}

    def mark(i: int, state: str, reason: str) -> None:
        states[i] = state
        reasons[i] = reason

    to_check: dict[bytes, list[int]] = defaultdict(list)
    tid, issuers = terminal.terminal_id, config.issuers
    for i, raw in enumerate(raw_records):
        if raw[27:33] != tid:
            mark(i, "refused", "record of another terminal")
            continue
        if raw[22:26] == _ZERO4:
            mark(i, "skipped", "zero amount: a card authentication")
            continue
        issuer = issuers.get(raw[4:12])
        if issuer is None:
            mark(i, "refused", f"unknown issuer {raw[4:12].hex()}")
            continue
        if raw[40:44] == _ZERO4 and i not in proofs:
            mark(i, "held", "no card TAC: the card's debit is not proven")
            continue
        to_check[_card_tac_key(issuer.tac_master, raw[12:20],
                               issuer.issuer_id if issuer.two_level else None)].append(i)
    for key, indexes in to_check.items():
        expected = crypto.cbc_macs_same_key(key, [_tac_input(raw_records[i]) for i in indexes])
        for i, good in zip(indexes, expected, strict=True):
            tac = raw_records[i][40:44]
            if tac != _ZERO4:  # the PSAM's record carries it: covered by the batch MAC
                if not hmac.compare_digest(good, tac):
                    mark(i, "refused", "the card TAC does not verify: tampered")
            elif not hmac.compare_digest(good, proofs[i]):
                # the batch's "proofs" are outside its MAC: a wrong one moves nothing
                mark(i, "held", "the supplied card TAC does not verify: tampered; held")
    seen: set[bytes] = set()
    for i, raw in enumerate(raw_records):
        if states[i] == "cleared":
            card = raw[12:22]  # card serial and card counter
            if card in seen:
                mark(i, "refused", "duplicate record in the batch")
            seen.add(card)
    return states, reasons


# --- the run --------------------------------------------------------------------------------

@dataclass
class ClearingReport:
    run_number: int
    settlement_file: str
    jsonl_file: str
    batches: list[dict[str, Any]]
    records_cleared: int
    total_paid: int
    loads_moved: int
    total_loaded: int
    lines: list[dict[str, Any]]
    proofs: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_clearing(config: ClearingConfig, batch_dir: Path, engine: Engine, out_dir: Path, *,
                 load_db_urls: tuple[str, ...] = ()) -> ClearingReport:
    files = sorted(p for p in batch_dir.glob("*.json")) if batch_dir.exists() else []
    verdicts = [check_batch(config, p) for p in files if not p.name.startswith(PROOFS_PREFIX)]
    proof_verdicts = [read_proofs(p) for p in files if p.name.startswith(PROOFS_PREFIX)]
    loads: list[dict[str, Any]] = []
    for url in load_db_urls:
        loads.extend(LoadDb(make_load_engine(url)).rows("loaded"))
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = int(time.time())
    stamp_ms = now_ms()
    with engine.begin() as conn:
        run_number = int(conn.execute(select(func.coalesce(func.max(runs.c.run_number), 0)))
                         .scalar_one()) + 1
        known_batches = {(r.terminal_id, r.psam_id, r.batch_number, r.mac): r.run_number
                         for r in conn.execute(select(batches.c.terminal_id, batches.c.psam_id,
                                                      batches.c.batch_number, batches.c.mac,
                                                      batches.c.run_number))}
        known_records = {(r.card_serial, r.card_counter) for r in conn.execute(
            select(records.c.card_serial, records.c.card_counter))}
        known_loads = {(r.bank_id, r.txn_id) for r in conn.execute(
            select(moved_loads.c.bank_id, moved_loads.c.txn_id))}
        record_rows: list[tuple[Any, ...]] = []
        uncleared_rows: list[tuple[Any, ...]] = []
        batch_rows: list[dict[str, Any]] = []
        acquired: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        paid: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])

        def pay(names: tuple[str, str, str], rec: tuple[Any, ...], key: tuple[str, int],
                psam_id: str, batch_number: int) -> None:
            """A record cleared: its row, and its amount in the acquirer's and merchant's
            tallies. ``names``: the terminal's id, merchant and acquirer, in hex."""
            terminal_id, merchant, acquirer = names
            issuer = rec[1].hex().upper()
            record_rows.append((run_number, key[0], key[1], issuer, terminal_id, rec[0], rec[4],
                                merchant, acquirer, "cleared", "", psam_id, batch_number))
            tally = acquired[(issuer, acquirer)]
            tally[0] += 1
            tally[1] += rec[4]
            tally = paid[(acquirer, merchant)]
            tally[0] += 1
            tally[1] += rec[4]

        for v in verdicts:
            if v.state != "cleared":
                continue
            prior = known_batches.get((v.terminal_id, v.psam_id, v.batch_number, v.mac))
            if prior is not None:
                v.state, v.reason = "refused", f"duplicate batch: cleared in run {prior}"
                v.drop_records()
                continue
            known_batches[(v.terminal_id, v.psam_id, v.batch_number, v.mac)] = run_number
            names = _names(config.terminals[bytes.fromhex(v.terminal_id)])
            batch_rows.append({"run_number": run_number, "terminal_id": v.terminal_id,
                               "batch_number": v.batch_number, "mac": v.mac,
                               "psam_id": v.psam_id, "record_count": len(v.raw),
                               "file": v.file[:300]})
            for i, raw in enumerate(v.raw):
                rec = _RECORD.unpack(raw)
                key = (rec[2].hex(), rec[3])
                if v.states[i] == "cleared":
                    if key not in known_records:
                        known_records.add(key)
                        pay(names, rec, key, v.psam_id, v.batch_number)
                        continue
                    v.states[i] = "refused"
                    v.reasons[i] = "duplicate record: already cleared"
                # held records are kept, not paid: a late proof may clear them; the card
                # counter may instead be used by the card's real next purchase
                uncleared_rows.append((
                    run_number, stamp_ms, stamp_ms, v.terminal_id, v.psam_id, v.batch_number,
                    i, rec[0], key[0], key[1], rec[4], raw.hex().upper(), v.states[i],
                    v.reasons[i][:200]))
        _insert_many(conn, uncleared, uncleared_rows, _UNCLEARED_COLUMNS)
        for pv in proof_verdicts:
            if pv.state == "processed":
                _apply_proofs(conn, config, pv, run_number, known_records, pay)
        proof_rows = [(run_number, pv.file[:300], pv.digest, len(pv.proofs),
                       sum(o["state"] == "cleared" for o in pv.outcomes))
                      for pv in proof_verdicts if pv.state == "processed"]
        _insert_many(conn, proof_files, proof_rows,
                     ["run_number", "file", "digest", "proof_count", "cleared"])
        load_rows = []
        for row in loads:
            if (row["bank_id"], row["txn_id"]) in known_loads:
                continue
            known_loads.add((row["bank_id"], row["txn_id"]))
            load_rows.append({"run_number": run_number, "bank_id": row["bank_id"],
                              "txn_id": row["txn_id"], "issuer_id": row["issuer_id"] or "",
                              "card_serial": row["card_serial"], "amount": row["amount"]})
        lines, entries = _settle(run_number, load_rows, acquired, paid)
        total_paid = sum(amount for _, amount in paid.values())
        total_loaded = sum(r["amount"] for r in load_rows)
        cleared = len(record_rows)
        blob = _settlement_file(config, run_number, stamp, lines, cleared, total_paid,
                                total_loaded)
        base = out_dir / f"settlement-{run_number:06d}"
        for rows, table in ((batch_rows, batches), (load_rows, moved_loads), (entries, ledger)):
            _insert_many(conn, table, [tuple(r.values()) for r in rows],
                         list(rows[0]) if rows else [])
        _insert_many(conn, records, record_rows, _RECORD_COLUMNS)
        _supersede(conn, run_number, stamp_ms)
        summaries = [v.summary() for v in verdicts]
        proof_summaries = [pv.summary() for pv in proof_verdicts]
        conn.execute(insert(runs).values(run_number=run_number, created=now_ms(),
                                         file=str(base) + ".bin", mac=blob[-S.MAC_SIZE:].hex()))
        _write(base.with_suffix(".bin"), blob)
        _write(base.with_suffix(".jsonl"), _jsonl(run_number, stamp, lines, blob,
                                                   summaries, proof_summaries))
    return ClearingReport(
        run_number, str(base) + ".bin", str(base) + ".jsonl", summaries,
        cleared, total_paid, len(load_rows), total_loaded, lines, proof_summaries)


def _apply_proofs(conn: Connection, config: ClearingConfig, pv: ProofsVerdict, run_number: int,
                  known_records: set[tuple[str, int]],
                  pay: Callable[[tuple[str, str, str], tuple[Any, ...], tuple[str, int], str,
                                 int], None],
                  ) -> None:
    """Apply one late proofs file to the records clearing holds, in the run's transaction.
    Each state change is a compare-and-set on ``state = 'held'`` checked by its row count."""
    prior = conn.execute(select(proof_files.c.run_number).where(
        (proof_files.c.file == pv.file) | (proof_files.c.digest == pv.digest))).first()
    if prior is not None:
        pv.state = "refused"
        pv.reason = f"duplicate proofs file: processed in run {prior.run_number}"
        return
    terminal = config.terminals.get(bytes.fromhex(pv.terminal_id))
    if terminal is None:
        pv.state, pv.reason = "refused", f"unknown terminal {pv.terminal_id}"
        return
    rows = {(r.batch_number, r.ttn): r for r in conn.execute(
        select(uncleared.c.id, uncleared.c.batch_number, uncleared.c.ttn, uncleared.c.state,
               uncleared.c.record).where(uncleared.c.terminal_id == pv.terminal_id,
                                         uncleared.c.psam_id == pv.psam_id))}
    states = {k: r.state for k, r in rows.items()}
    stamp = now_ms()

    def outcome(batch_number: int, ttn: int, state: str, reason: str) -> None:
        pv.outcomes.append({"batch_number": batch_number, "terminal_txn_number": ttn,
                            "state": state, "reason": reason})

    def settle(row_id: int, state: str, reason: str) -> bool:
        return bool(conn.execute(update(uncleared).where(
            uncleared.c.id == row_id, uncleared.c.state == "held").values(
            state=state, reason=reason, resolved_run=run_number, updated=stamp)).rowcount)

    for batch_number, ttn, tac in pv.proofs:
        row = rows.get((batch_number, ttn))
        state = states.get((batch_number, ttn))
        if row is None or state != "held":
            outcome(batch_number, ttn, "not held", "no effect: clearing holds no such record"
                    if row is None else f"no effect: the record is {state}")
            continue
        raw = bytes.fromhex(row.record)
        issuer = config.issuers.get(raw[4:12])
        if issuer is None:
            outcome(batch_number, ttn, "refused", f"unknown issuer {raw[4:12].hex()}")
            continue
        key = _card_tac_key(issuer.tac_master, raw[12:20],
                            issuer.issuer_id if issuer.two_level else None)
        if not hmac.compare_digest(crypto.cbc_mac(key, _tac_input(raw)), tac):
            outcome(batch_number, ttn, "refused",
                    "the card TAC does not verify: tampered (the record stays held)")
            continue
        rec = _RECORD.unpack(raw)
        card = (rec[2].hex(), rec[3])
        if card in known_records:
            reason = "duplicate record: already cleared"
            if settle(row.id, "refused", reason):
                states[(batch_number, ttn)] = "refused"
            outcome(batch_number, ttn, "refused", reason)
            continue
        if not settle(row.id, "cleared", f"late proof {pv.file}"[:200]):
            outcome(batch_number, ttn, "not held", "no effect: the record changed meanwhile")
            continue
        states[(batch_number, ttn)] = "cleared"
        known_records.add(card)
        pay(_names(terminal), rec, card, pv.psam_id, batch_number)
        outcome(batch_number, ttn, "cleared", "card TAC verified: paid in this run")


def _names(terminal: Terminal) -> tuple[str, str, str]:
    return (terminal.terminal_id.hex().upper(), terminal.merchant_id.hex().upper(),
            terminal.acquirer_id.hex().upper())


def _supersede(conn: Connection, run_number: int, stamp: int) -> None:
    """A held record whose card counter a cleared record used was never debited (a debit
    moves the counter, and the cleared one carries the card's TAC): it is superseded."""
    used = select(records.c.id).where(records.c.card_serial == uncleared.c.card_serial,
                                      records.c.card_counter == uncleared.c.card_counter)
    conn.execute(update(uncleared).where(uncleared.c.state == "held", used.exists()).values(
        state="superseded", reason="the card counter was used by a cleared record",
        resolved_run=run_number, updated=stamp))


def _insert_many(conn: Connection, table: Table, rows: list[tuple[Any, ...]],
                 names: list[str]) -> None:
    """Many rows through the driver's own executemany (SQLAlchemy's per-row parameter
    processing costs more than SQLite's insert itself)."""
    if not rows:
        return
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    sql = (f"INSERT INTO {table.name} ({', '.join(names)}) "
           f"VALUES ({', '.join([mark] * len(names))})")
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.executemany(sql, rows)
    finally:
        cursor.close()


_RECORD_COLUMNS = ["run_number", "card_serial", "card_counter", "issuer_id", "terminal_id",
                   "ttn", "amount", "merchant_id", "acquirer_id", "state", "reason", "psam_id",
                   "batch_number"]
_UNCLEARED_COLUMNS = ["run_number", "created", "updated", "terminal_id", "psam_id",
                      "batch_number", "record_index", "ttn", "card_serial", "card_counter",
                      "amount", "record", "state", "reason"]


def _settle(run_number: int, load_rows: list[dict[str, Any]],
            acquired: dict[tuple[str, str], list[int]], paid: dict[tuple[str, str], list[int]],
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Settlement lines and the matching double-entry ledger rows."""
    loaded: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for r in load_rows:
        acc = loaded[(r["bank_id"].upper(), r["issuer_id"].upper())]
        acc[0] += 1
        acc[1] += r["amount"]
    lines, entries = [], []
    for kind, book in ((S.KIND_LOADED_FUNDS, loaded), (S.KIND_ACQUIRER_TOTAL, acquired),
                       (S.KIND_MERCHANT_PAYOUT, paid)):
        for (payer, payee), (count, amount) in sorted(book.items()):
            lines.append({"kind": kind, "kind_name": S.KIND_NAMES[kind], "payer": payer,
                          "payee": payee, "count": count, "amount": amount})
            names = {S.KIND_LOADED_FUNDS: ("bank", "float"),
                     S.KIND_ACQUIRER_TOTAL: ("float", "acquirer"),
                     S.KIND_MERCHANT_PAYOUT: ("acquirer", "merchant")}[kind]
            entries.append({"run_number": run_number, "account": f"{names[0]}:{payer}",
                            "amount": -amount, "memo": S.KIND_NAMES[kind]})
            entries.append({"run_number": run_number, "account": f"{names[1]}:{payee}",
                            "amount": amount, "memo": S.KIND_NAMES[kind]})
    return lines, entries


def _settlement_file(config: ClearingConfig, run_number: int, stamp: int,
                     lines: list[dict[str, Any]], cleared: int, total_paid: int,
                     total_loaded: int) -> bytes:
    header = S.SettlementHeader.build({
        "version": 1, "run_number": run_number, "created": stamp, "line_count": len(lines),
        "records_cleared": cleared, "total_paid": total_paid, "total_loaded": total_loaded})
    body: bytes = header + b"".join(S.SettlementLine.build({
        "kind": ln["kind"], "payer": bytes.fromhex(ln["payer"]),
        "payee": bytes.fromhex(ln["payee"]), "count": ln["count"], "amount": ln["amount"]})
        for ln in lines)
    return body + hmac.new(config.settlement_key, body, hashlib.sha256).digest()


def verify_settlement_file(settlement_key: bytes, blob: bytes) -> dict[str, Any]:
    """Parse a settlement file, checking its MAC and layout; raises ClearingError."""
    if len(blob) < S.HEADER_SIZE + S.MAC_SIZE:
        raise ClearingError("too short to be a settlement file")
    body, mac = blob[:-S.MAC_SIZE], blob[-S.MAC_SIZE:]
    if not hmac.compare_digest(hmac.new(settlement_key, body, hashlib.sha256).digest(), mac):
        raise ClearingError("the settlement file MAC does not verify")
    header = S.SettlementHeader.parse(body[:S.HEADER_SIZE])
    if len(body) != S.HEADER_SIZE + header.line_count * S.LINE_SIZE:
        raise ClearingError("the settlement file length does not match its line count")
    lines = [S.SettlementLine.parse(body[i:i + S.LINE_SIZE])
             for i in range(S.HEADER_SIZE, len(body), S.LINE_SIZE)]
    return {"run_number": header.run_number, "total_paid": header.total_paid,
            "total_loaded": header.total_loaded, "records_cleared": header.records_cleared,
            "lines": [{"kind": ln.kind, "payer": ln.payer.hex().upper(),
                       "payee": ln.payee.hex().upper(), "count": ln.count,
                       "amount": ln.amount} for ln in lines]}


def _jsonl(run_number: int, stamp: int, lines: list[dict[str, Any]], blob: bytes,
           batch_summaries: list[dict[str, Any]],
           proof_summaries: list[dict[str, Any]] | None = None) -> bytes:
    out = [{"type": "header", "run_number": run_number, "created": stamp,
            "line_count": len(lines)}]
    out += [{"type": "line", **ln} for ln in lines]
    out += [{"type": "batch", **b} for b in batch_summaries]
    out += [{"type": "proofs", **p} for p in proof_summaries or []]
    out.append({"type": "mac", "hmac_sha256": blob[-S.MAC_SIZE:].hex()})
    return b"".join(json.dumps(o, sort_keys=True).encode() + b"\n" for o in out)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def ledger_balances(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {account: int(total) for account, total in conn.execute(
            select(ledger.c.account, func.sum(ledger.c.amount)).group_by(ledger.c.account))}


def cleared_keys(engine: Engine) -> set[tuple[str, int]]:
    """(card serial 8 bytes hex, card counter) of every cleared record."""
    with engine.connect() as conn:
        return {(r.card_serial, r.card_counter) for r in conn.execute(
            select(records.c.card_serial, records.c.card_counter).where(
                records.c.state == "cleared"))}
