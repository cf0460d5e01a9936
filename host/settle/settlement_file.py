"""The settlement file a clearing run writes, and its check.

The file has a fixed layout (:mod:`svcard.protocols.settlement`): a header, one line per
settlement (loaded funds, acquirer totals, merchant payouts), then an HMAC-SHA256 over all of it
under the clearing system's settlement key. Its JSON Lines twin carries the same lines and MAC,
with each batch's and each late proofs file's summary.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

from ...protocols import settlement as S
from .config import ClearingConfig


class ClearingError(ValueError):
    """A settlement file that does not verify (its key: the clearing configuration's
    ``settlement_key``)."""


def build_settlement_file(config: ClearingConfig, run_number: int, stamp: int,
                          lines: list[dict[str, Any]], cleared: int, total_paid: int,
                          total_loaded: int) -> bytes:
    """The settlement file's bytes: header, lines, HMAC-SHA256."""
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


def settlement_jsonl(run_number: int, stamp: int, lines: list[dict[str, Any]], blob: bytes,
                     batch_summaries: list[dict[str, Any]],
                     proof_summaries: list[dict[str, Any]] | None = None) -> bytes:
    """The JSON Lines twin of the settlement file ``blob``."""
    out = [{"type": "header", "run_number": run_number, "created": stamp,
            "line_count": len(lines)}]
    out += [{"type": "line", **ln} for ln in lines]
    out += [{"type": "batch", **b} for b in batch_summaries]
    out += [{"type": "proofs", **p} for p in proof_summaries or []]
    out.append({"type": "mac", "hmac_sha256": blob[-S.MAC_SIZE:].hex()})
    return b"".join(json.dumps(o, sort_keys=True).encode() + b"\n" for o in out)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file, synced, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
