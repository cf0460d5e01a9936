"""``POST /v1/batches/close`` (the hand-off to the concentration point, for clearing): each PSAM
closes its batch, which is written with the card proofs this database holds for records without
TAC; proofs that came after their batch had left go out in late-proofs files (CL4).

Admin only (``Authorization: Bearer`` the admin token); one close at a time. Each PSAM is taken
as its transaction ends and held until every batch is closed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ....card.storage import write_atomically
from ....protocols import purse as P
from ....protocols.apdu import build_command
from ....reader import Reader
from ...terminal import apdus
from ...terminal.purse import call
from .psam_pool import PooledPsam, PoolExhausted

if TYPE_CHECKING:
    from .app import PaymentServer


async def hand_over_batches(server: PaymentServer, request: Request) -> Response:
    """Close every PSAM's batch and hand the batches and late proofs over: their paths."""
    token = server.config.admin_token
    given = request.headers.get("authorization", "")
    if not token or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return JSONResponse({"reason": "admin token required"}, status_code=403)
    if not server.config.concentration_dir:
        return JSONResponse({"reason": "no concentration_dir configured"},
                            status_code=409)
    async with server.close_lock:
        written: list[str] = []
        taken: list[PooledPsam] = []
        try:  # each PSAM as its transaction ends; held until all are closed
            for member in server.pool.psams:   # one of each terminal's in turn
                psam = await server.pool.acquire_for(member.terminal_id,
                                                     server.config.acquire_timeout * 10)
                taken.append(psam)
                # the PSAM's last closed batch first, if its file was never written (a crash or
                # an error between CLOSE BATCH and the write): re-answered by the PSAM
                lost = await server.pool.run(psam, functools.partial(_lost_batch, server, psam))
                if lost is not None:
                    written.append(await server.sql(_write_batch, server, psam, lost))
                batch = await server.pool.run(psam, collect_batch)
                if batch is not None:
                    written.append(await server.sql(_write_batch, server, psam, batch))
        except PoolExhausted as exc:
            return JSONResponse({"reason": f"PSAMs stayed busy ({exc}); closed "
                                           f"{len(written)} batches", "batches": written},
                                status_code=503)
        finally:
            for psam in taken:
                server.pool.release(psam)
        late = await server.sql(_write_late_proofs, server)
    return JSONResponse({"batches": written, "late_proofs": late})


def _lost_batch(server: PaymentServer, psam: PooledPsam,
                reader: Reader) -> dict[str, Any] | None:   # on the PSAM's thread
    """The PSAM's last closed batch (CLOSE BATCH P1=1 answers it again, one APDU) with its
    records if no file of it was written: neither in the concentration folder nor named by a
    payment row. None when it was handed, empty, or the PSAM never closed one."""
    again = build_command(P.CLA_PBOC, P.INS_SAM_CLOSE_BATCH, 1, 0, b"", 256)
    found = reader.exchange(again)
    if not found.ok:   # 6A83: no batch closed yet
        return None
    answer = P.BatchCloseAnswer.parse(found.data)
    name = _batch_name(answer.terminal_id.hex().upper(), psam.psam_id.hex().upper(),
                       answer.batch_number)
    if not answer.record_count or (Path(server.config.concentration_dir) / name).exists() \
            or server.db.batch_named(name):
        return None
    return _read_batch(reader, answer)


def _batch_name(terminal_hex: str, psam_hex: str, number: int) -> str:
    return f"batch-{terminal_hex}-{psam_hex}-{number:06d}.json"


def collect_batch(reader: Reader) -> dict[str, Any] | None:
    """Close the PSAM's open batch and read its records back (None if it was empty: an empty
    batch is closed anyway, so batch numbers stay in step)."""
    answer = P.BatchCloseAnswer.parse(call(reader, apdus.sam_close_batch(),
                                           "PSAM CLOSE BATCH"))
    return _read_batch(reader, answer)


def _read_batch(reader: Reader, answer: Any) -> dict[str, Any] | None:
    """The records of the batch the PSAM closed last, as ``answer`` (its header) names."""
    records = []
    for index in range(answer.record_count):
        records.append(call(reader, apdus.read_batch_record(1, index),
                            "PSAM READ BATCH RECORD").hex().upper())
    if not records:
        return None
    return {"terminal_id": answer.terminal_id.hex().upper(),
            "batch_number": answer.batch_number, "record_count": answer.record_count,
            "total_amount": answer.total_amount, "mac": answer.mac.hex().upper(),
            "records": records}


def _write_batch(server: PaymentServer, psam: PooledPsam, batch: dict[str, Any]) -> str:
    """The batch as the PSAM closed it, with the card proofs the database holds for its
    records without TAC (early-released, or FIG. 5 whose CREDIT SAM never ran); each record's
    row is marked with the batch it went out in and whether its TAC went too."""
    proofs: dict[str, str] = {}
    handed: list[tuple[int, bool]] = []
    psam_hex = psam.psam_id.hex()
    for i, raw in enumerate(batch["records"]):
        rec = P.PsamRecord.parse(bytes.fromhex(raw))
        has_tac = rec.tac != bytes(4)
        if not has_tac:
            row = server.db.by_psam_ttn(psam_hex, rec.terminal_txn_number)
            if row is not None and row["tac"] and row["state"] == "confirmed":
                proofs[str(i)] = row["tac"]
                has_tac = True
        handed.append((rec.terminal_txn_number, has_tac))
    batch = {**batch, "psam_id": psam_hex.upper(), "proofs": proofs}
    folder = Path(server.config.concentration_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = _batch_name(batch["terminal_id"], batch["psam_id"], batch["batch_number"])
    write_atomically(folder / name, json.dumps(batch, indent=1).encode())
    # not fenced: the PSAM did close this batch and its file is written, whoever leases the
    # PSAM now (rows left unmarked would never get their late proofs). A record with no row is
    # a draw voided after INIT SAM (its node died first): clearing holds it, unpaid.
    server.db.mark_handed(psam_hex, name, int(batch["batch_number"]), handed)
    return str(folder / name)


def _write_late_proofs(server: PaymentServer) -> list[str]:
    """CL4: the TACs of payments confirmed after their PSAM record went to clearing without
    one, one file per PSAM (``proofs-{terminal}-{psam}-{digest of the file}.json``)."""
    rows = server.db.late_proofs()
    if server.leases is not None:   # a node hands the late proofs of the PSAMs it leases
        held = {p.psam_id.hex() for p in server.pool.psams}
        rows = [r for r in rows if r["psam_id"] in held]
    if not rows:
        return []
    by_psam: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_psam.setdefault(row["psam_id"], []).append(row)
    folder = Path(server.config.concentration_dir)
    folder.mkdir(parents=True, exist_ok=True)
    terminals = {p.psam_id.hex(): p.terminal_id.hex().upper() for p in server.pool.psams}
    out = []
    for psam_hex, items in sorted(by_psam.items()):
        terminal = terminals.get(psam_hex, server.pool.terminal_id.hex().upper())
        doc = {"format": "svcard late proofs v1", "terminal_id": terminal,
               "psam_id": psam_hex.upper(),
               "proofs": [{"batch_number": int(r["batch_number"]),
                           "terminal_txn_number": int(r["ttn"]),
                           "tac": str(r["tac"]).upper()} for r in items]}
        data = json.dumps(doc, indent=1).encode()
        # named by its content: the step run again (its group failed after the file was
        # written, the rows not marked) rewrites the same file instead of adding a copy
        name = hashlib.sha256(data).hexdigest()[:20].upper()
        path = folder / f"proofs-{terminal}-{psam_hex.upper()}-{name}.json"
        write_atomically(path, data)
        server.db.mark_proofs_handed([int(r["id"]) for r in items])
        out.append(str(path))
    return out
