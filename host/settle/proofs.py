"""Late proofs files: card TACs that reached the payment server after its batch was closed.

The payment server writes them (``proofs-*.json``, format :data:`PROOFS_FORMAT`) when a FIG. 7/8
card proof arrives late. :func:`read_proofs` parses and bounds one (no database involved);
:func:`apply_proofs` applies it, inside a clearing run's transaction, to the records clearing
holds: the TAC is checked exactly as a batch record's; a good one clears and pays the record in
this run, a wrong one is refused (the record stays held: an invalid message moves nothing). A file
is processed once (table ``proof_files``, by name and by digest).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select, update

from ...protocols import crypto
from ..kit.db import now_ms
from .batches import RECORD, card_tac_key, tac_input
from .config import ClearingConfig
from .db import proof_files, uncleared

PROOFS_FORMAT = "svcard late proofs v1"
PROOFS_PREFIX = "proofs-"
MAX_PROOFS_FILE = 16 * 1024 * 1024   # bytes
MAX_PROOFS = 100_000                 # proofs in one file
_HEX = re.compile(r"[0-9A-Fa-f]+")

# pays a cleared record in the run: (terminal id, merchant, acquirer in hex), the unpacked PSAM
# record, (card serial hex, card counter), PSAM id, batch number
PayRecord = Callable[[tuple[str, str, str], tuple[Any, ...], tuple[str, int], str, int], None]


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


def _held_rows(conn: Connection, pv: ProofsVerdict) -> dict[tuple[int, int], Any]:
    """The records clearing keeps for this file's proofs, by (batch number, TTN): only the
    proofs' keys are asked, through index ``ix_uncleared_proof`` (terminal, PSAM, batch, TTN),
    never every record the PSAM ever had kept (issue 16: that grows with every run). The keys
    go 500 to a statement, sorted, so a statement's batches are neighbours (a file of 100,000
    proofs of as many batches is 200 statements, not 100,000); rows of another key that the
    statement's IN lists also let through are dropped."""
    wanted = sorted({(batch_number, ttn) for batch_number, ttn, _ in pv.proofs})
    keys = set(wanted)
    found: list[Any] = []
    for i in range(0, len(wanted), 500):
        part = wanted[i:i + 500]
        found += [r for r in conn.execute(select(
            uncleared.c.id, uncleared.c.batch_number, uncleared.c.ttn, uncleared.c.state,
            uncleared.c.record).where(
            uncleared.c.terminal_id == pv.terminal_id, uncleared.c.psam_id == pv.psam_id,
            uncleared.c.batch_number.in_(sorted({b for b, _ in part})),
            uncleared.c.ttn.in_(sorted({t for _, t in part})))) if (r.batch_number, r.ttn) in keys]
    return {(r.batch_number, r.ttn): r for r in sorted(found, key=lambda r: int(r.id))}


def apply_proofs(conn: Connection, config: ClearingConfig, pv: ProofsVerdict, run_number: int,
                 known_records: set[tuple[str, int]], pay: PayRecord) -> None:
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
    rows = _held_rows(conn, pv)
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
        key = card_tac_key(issuer.tac_master, raw[12:20],
                           issuer.issuer_id if issuer.two_level else None)
        if not hmac.compare_digest(crypto.cbc_mac(key, tac_input(raw)), tac):
            outcome(batch_number, ttn, "refused",
                    "the card TAC does not verify: tampered (the record stays held)")
            continue
        rec = RECORD.unpack(raw)
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
        pay(terminal.names(), rec, card, pv.psam_id, batch_number)
        outcome(batch_number, ttn, "cleared", "card TAC verified: paid in this run")
