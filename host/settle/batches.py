"""Checking a PSAM batch file before clearing (no database involved).

A batch is refused whole when its MAC (the PSAM's batch key, 3DES CBC-MAC over header and
records), its record count or its total does not verify. Each record of an accepted batch gets a
state: ``cleared`` (its card TAC verifies through the issuer's TAC master key, diversified for
the card), ``refused`` (wrong TAC, another terminal's record, unknown issuer, duplicate in the
batch), ``held`` (no card TAC: the card's debit is not proven) or ``skipped`` (zero amount). The
PSAM record layout and the card TAC check are here too: late proofs
(:mod:`svcard.host.settle.proofs`) check a TAC exactly as a batch record's.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ...protocols import crypto
from ...protocols import purse as P
from .config import ClearingConfig, Terminal


@functools.lru_cache(maxsize=65536)
def card_tac_key(master: bytes, serial: bytes, issuer: bytes | None) -> bytes:
    """A card's TAC key: the issuer's TAC master diversified for the card (``issuer`` set for
    a two-level issuer)."""
    return crypto.tac_key(crypto.card_key(master, serial, issuer))


def tac_input(raw: bytes) -> bytes:
    """purchase_tac_input(amount, type, terminal id, TTN, date, time), sliced from a record."""
    return raw[22:33] + raw[0:4] + raw[33:40]


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


# a PSAM record's fields in the order of _Record
RECORD = struct.Struct(">I8s8sHIB6s4s3s4sB")
assert RECORD.size == P.PSAM_RECORD_SIZE
_ZERO4 = bytes(4)
_PSAM_ID = re.compile(r"[0-9A-F]{0,20}")


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
    digest: str = ""    # SHA-256 of the file's bytes, when it could be read
    raw: list[bytes] = field(default_factory=list, repr=False)
    states: list[str] = field(default_factory=list, repr=False)
    reasons: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def records(self) -> list[RecordVerdict]:
        return [RecordVerdict(i, _Record(*RECORD.unpack(raw)), st, self.reasons.get(i, ""))
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
    name, digest = path.name, ""
    try:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        doc = json.loads(data)
        terminal_id = bytes.fromhex(doc["terminal_id"])
        number = int(doc["batch_number"])
        raw_records = [bytes.fromhex(r) for r in doc["records"]]
        mac = bytes.fromhex(doc["mac"])
        count, total = int(doc["record_count"]), int(doc["total_amount"])
        proofs = {int(k): bytes.fromhex(v) for k, v in doc.get("proofs", {}).items()}
        psam_id = str(doc.get("psam_id", "")).upper()
        if not _PSAM_ID.fullmatch(psam_id):
            raise ValueError("psam_id is not up to 20 hex digits")
    except KeyError as exc:  # the field's name, not the exception's repr
        return BatchVerdict(name, "refused", f"not a batch file: no field {exc.args[0]}",
                            digest=digest)
    except (OSError, ValueError, TypeError, RecursionError) as exc:
        return BatchVerdict(name, "refused", f"not a batch file: {exc}", digest=digest)
    verdict = BatchVerdict(name, "refused", "", terminal_id.hex().upper(), number, psam_id,
                           mac.hex().upper(), digest)
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
        to_check[card_tac_key(issuer.tac_master, raw[12:20],
                              issuer.issuer_id if issuer.two_level else None)].append(i)
    for key, indexes in to_check.items():
        expected = crypto.cbc_macs_same_key(key, [tac_input(raw_records[i]) for i in indexes])
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
