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

A run reads only the files it has not handled (issue 16: the folder keeps every file ever handed
in, and re-reading them all cost 6.6 s more each day at 100,000 purchases a day). Table
``clearing_handled_files`` records, per folder and name, each file whose outcome is final (a
batch accepted or refused as a duplicate, a proofs file processed or refused as a duplicate):
its size, mtime, ctime, inode and SHA-256. A file whose stat still matches is skipped; one
changed in any of them is read and checked again, and gets the verdict a first read gives (a
changed batch is refused as tampered or as a duplicate, as before). Refusals that a new
configuration could lift (unknown terminal, bad MAC, unreadable) are not recorded: read again.
A file changed within :data:`FRESH_NS` of the run is not recorded either (a rewrite within
the file system's clock tick could keep its stat).

Nor does a run load every record, batch or load ever cleared to find duplicates (those tables
grow with every run: 3.5 s a run at 1,000,000 records): it asks the database only about this
run's keys (:func:`_existing`, a temporary table of them joined to the unique index).

The run reads top to bottom in :func:`run_clearing`; the steps it calls are in their own
modules: checking a batch file (:mod:`.batches`), late proofs (:mod:`.proofs`), the clearing
database (:mod:`.db`) and the settlement file (:mod:`.settlement_file`). The load server's
loads are read through :mod:`svcard.host.load.records`, only those past the mark a run left or
still open (:func:`.db.new_loads`).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    MetaData,
    Table,
    delete,
    func,
    insert,
    select,
)

from ...protocols import settlement as S
from ..kit.db import now_ms
from .batches import RECORD, check_batch
from .config import ClearingConfig
from .db import (
    RECORD_COLUMNS,
    UNCLEARED_COLUMNS,
    batches,
    handled_files,
    insert_many,
    ledger,
    moved_loads,
    new_loads,
    proof_files,
    records,
    runs,
    save_load_marks,
    supersede,
    uncleared,
)
from .proofs import PROOFS_PREFIX, apply_proofs, read_proofs
from .settlement_file import build_settlement_file, settlement_jsonl, write_durably

FRESH_NS = 2_000_000_000   # a file changed this recently is read again at the next run
Stat = tuple[int, int, int, str]


def _listing(batch_dir: Path) -> dict[str, Stat | None]:
    """The folder's ``*.json`` files by name, sorted, with their stat (None: read anyway, the
    reading says what is wrong)."""
    out: dict[str, Stat | None] = {}
    if not batch_dir.is_dir():
        return out
    with os.scandir(batch_dir) as found:
        for e in found:
            if e.name.endswith(".json"):
                try:
                    st = e.stat()
                    out[e.name] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, str(st.st_ino))
                except OSError:
                    out[e.name] = None
    return dict(sorted(out.items()))


def _to_read(engine: Engine, folder: str, files: dict[str, Stat | None]) -> dict[str, Stat | None]:
    """The files not handled for good, or changed since, with their stat."""
    with engine.connect() as conn:
        seen = {r[0]: tuple(r[1:]) for r in conn.execute(
            select(handled_files.c.name, handled_files.c.size, handled_files.c.mtime_ns,
                   handled_files.c.ctime_ns, handled_files.c.inode).where(
                handled_files.c.folder == folder))}
    return {name: st for name, st in files.items() if st is None or seen.get(name) != st}


def _existing(conn: Connection, table: Table, names: list[str], keys: Iterable[tuple[Any, ...]],
              extra: str | None = None) -> dict[tuple[Any, ...], Any]:
    """Which of ``keys`` (values of the columns ``names``, its unique index) the table holds:
    key -> the ``extra`` column (or None). Only this run's keys are asked, never the whole
    table (it grows with every run): one key by equality, many through a temporary table of
    them joined to the table's index (a row-value IN list is not indexed by SQLite)."""
    wanted = list(dict.fromkeys(keys))
    got = [*names, *([extra] if extra else [])]
    if len(wanted) < 2:
        rows = [conn.execute(select(*[table.c[n] for n in got]).where(
            *[table.c[n] == v for n, v in zip(names, key, strict=True)])).all()
            for key in wanted]
        found = [r for part in rows for r in part]
    else:
        tmp = f"clearing_asked_{table.name}"
        conn.exec_driver_sql(f"CREATE TEMP TABLE IF NOT EXISTS {tmp} AS SELECT "
                             f"{', '.join(names)} FROM {table.name} WHERE 1 = 0")
        conn.exec_driver_sql(f"DELETE FROM {tmp}")   # (SQLite may have made it outside)
        insert_many(conn, Table(tmp, MetaData()), wanted, names)
        on = " AND ".join(f"t.{n} = k.{n}" for n in names)
        found = list(conn.exec_driver_sql(
            f"SELECT {', '.join('t.' + n for n in got)} FROM {tmp} k JOIN {table.name} t "
            f"ON {on}"))
        conn.exec_driver_sql(f"DELETE FROM {tmp}")
    return {tuple(r[:len(names)]): r[len(names)] if extra else None for r in found}


class _Cleared(set[tuple[str, int]]):
    """(card serial, card counter) of the records cleared, this run's and the database's: the
    batches' keys are fetched at once; any other key asked is looked up when asked."""

    def __init__(self, conn: Connection) -> None:
        super().__init__()
        self.conn, self.absent = conn, set[object]()

    def prefetch(self, keys: list[tuple[str, int]]) -> None:
        self.update(_existing(self.conn, records, ["card_serial", "card_counter"], keys))

    def __contains__(self, key: object) -> bool:
        if super().__contains__(key):
            return True
        if key in self.absent or not isinstance(key, tuple):
            return False
        if _existing(self.conn, records, ["card_serial", "card_counter"], [key]):
            self.add(key)
            return True
        self.absent.add(key)
        return False


def _record_handled(conn: Connection, folder: str, run_number: int,
                    done: list[tuple[Path, Stat | None, str, str]]) -> None:
    """The files read in this run: rows replaced; those whose outcome is final recorded."""
    names = [p.name for p, *_ in done]
    for i in range(0, len(names), 500):
        conn.execute(delete(handled_files).where(handled_files.c.folder == folder,
                                                 handled_files.c.name.in_(names[i:i + 500])))
    fresh = time.time_ns() - FRESH_NS
    rows = [(folder, p.name, run_number, *st, digest, verdict[:200])
            for p, st, digest, verdict in done
            if st is not None and verdict and digest and len(p.name) <= 300
            and len(folder) <= 1000 and max(st[1], st[2]) < fresh]
    insert_many(conn, handled_files, rows, [c.name for c in handled_files.columns][1:])


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
    files_skipped: int = 0   # handled in an earlier run and unchanged: not read again

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_clearing(config: ClearingConfig, batch_dir: Path, engine: Engine, out_dir: Path, *,
                 load_db_urls: tuple[str, ...] = ()) -> ClearingReport:
    files = _listing(batch_dir)
    folder = str(batch_dir.resolve())
    to_read = {batch_dir / name: st for name, st in _to_read(engine, folder, files).items()}
    batch_files = [p for p in to_read if not p.name.startswith(PROOFS_PREFIX)]
    proof_paths = [p for p in to_read if p.name.startswith(PROOFS_PREFIX)]
    verdicts = [check_batch(config, p) for p in batch_files]
    proof_verdicts = [read_proofs(p) for p in proof_paths]
    loads, marks = new_loads(engine, load_db_urls)   # past each database's mark, or open
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = int(time.time())
    stamp_ms = now_ms()
    with engine.begin() as conn:
        run_number = int(conn.execute(select(func.coalesce(func.max(runs.c.run_number), 0)))
                         .scalar_one()) + 1
        accepted = [v for v in verdicts if v.state == "cleared"]
        known_batches = _existing(
            conn, batches, ["terminal_id", "psam_id", "batch_number", "mac"],
            ((v.terminal_id, v.psam_id, v.batch_number, v.mac) for v in accepted), "run_number")
        known_records = _Cleared(conn)
        card_keys = {id(v): [(raw[12:20].hex(), raw[20] << 8 | raw[21]) for raw in v.raw]
                     for v in accepted}   # (card serial, card counter) of each record
        known_records.prefetch([k for keys in card_keys.values() for k in keys])
        cleared_before = set.__contains__   # every key of the batches is fetched by now
        known_loads = set(_existing(conn, moved_loads, ["bank_id", "txn_id"],
                                    ((r["bank_id"], r["txn_id"]) for r in loads)))
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
            names = config.terminals[bytes.fromhex(v.terminal_id)].names()
            batch_rows.append({"run_number": run_number, "terminal_id": v.terminal_id,
                               "batch_number": v.batch_number, "mac": v.mac,
                               "psam_id": v.psam_id, "record_count": len(v.raw),
                               "file": v.file[:300]})
            for i, (raw, key) in enumerate(zip(v.raw, card_keys[id(v)], strict=True)):
                rec = RECORD.unpack(raw)
                if v.states[i] == "cleared":
                    if not cleared_before(known_records, key):
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
        insert_many(conn, uncleared, uncleared_rows, UNCLEARED_COLUMNS)
        for pv in proof_verdicts:
            if pv.state == "processed":
                apply_proofs(conn, config, pv, run_number, known_records, pay)
        proof_rows = [(run_number, pv.file[:300], pv.digest, len(pv.proofs),
                       sum(o["state"] == "cleared" for o in pv.outcomes))
                      for pv in proof_verdicts if pv.state == "processed"]
        insert_many(conn, proof_files, proof_rows,
                    ["run_number", "file", "digest", "proof_count", "cleared"])
        final = [(p, to_read[p], v.digest, _final(v.state, v.reason, "duplicate batch"))
                 for p, v in zip(batch_files, verdicts, strict=True)]
        final += [(p, to_read[p], v.digest, _final(v.state, v.reason, "duplicate proofs"))
                  for p, v in zip(proof_paths, proof_verdicts, strict=True)]
        _record_handled(conn, folder, run_number, final)
        load_rows = []
        for row in loads:
            if (row["bank_id"], row["txn_id"]) in known_loads:
                continue
            known_loads.add((row["bank_id"], row["txn_id"]))
            load_rows.append({"run_number": run_number, "bank_id": row["bank_id"],
                              "txn_id": row["txn_id"], "issuer_id": row["issuer_id"] or "",
                              "card_serial": row["card_serial"], "amount": row["amount"]})
        save_load_marks(conn, marks)
        lines, entries = _settle(run_number, load_rows, acquired, paid)
        total_paid = sum(amount for _, amount in paid.values())
        total_loaded = sum(r["amount"] for r in load_rows)
        cleared = len(record_rows)
        blob = build_settlement_file(config, run_number, stamp, lines, cleared, total_paid,
                                     total_loaded)
        base = out_dir / f"settlement-{run_number:06d}"
        for rows, table in ((batch_rows, batches), (load_rows, moved_loads), (entries, ledger)):
            insert_many(conn, table, [tuple(r.values()) for r in rows],
                        list(rows[0]) if rows else [])
        insert_many(conn, records, record_rows, RECORD_COLUMNS)
        supersede(conn, run_number, stamp_ms)
        summaries = [v.summary() for v in verdicts]
        proof_summaries = [pv.summary() for pv in proof_verdicts]
        conn.execute(insert(runs).values(run_number=run_number, created=now_ms(),
                                         file=str(base) + ".bin", mac=blob[-S.MAC_SIZE:].hex()))
        write_durably(base.with_suffix(".bin"), blob)
        write_durably(base.with_suffix(".jsonl"), settlement_jsonl(
            run_number, stamp, lines, blob, summaries, proof_summaries))
    return ClearingReport(
        run_number, str(base) + ".bin", str(base) + ".jsonl", summaries,
        cleared, total_paid, len(load_rows), total_loaded, lines, proof_summaries,
        len(files) - len(to_read))


def _final(state: str, reason: str, duplicate: str) -> str:
    """The verdict to record for a file read in this run: "" when a later run must read it
    again (a refusal that a new configuration could lift)."""
    if state in ("cleared", "processed"):
        return f"{state}: {reason}"
    return f"refused: {reason}" if reason.startswith(duplicate) else ""


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
