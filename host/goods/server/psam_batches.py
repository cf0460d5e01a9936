"""The goods payment server's PSAM batches handed to clearing (docs/goods.md, "The purse-paid
goods in clearing"), the way seed 002's payment server hands its own (host/pay/server/batches.py):
the same batch file and late proofs file, so ``svcard clearing run`` takes them unchanged.

``POST /v1/batches/close`` (``BATCH_CLOSE``, signed by this payment party's own key: only its
operator holds it; ``svcard goods close-batch``): every PSAM is taken as its purchase ends and
held until all are closed. For each, the batch it closed last is first read again (CLOSE BATCH
``P1=1``) if this database does not hold it (a crash between CLOSE BATCH and the step below),
then its open batch is closed and read. One database step per batch keeps its file and, for
each record, the TAC of its committed session (``goods_purse_sessions``: the MAC2 matched, the
card committed the good and the debit) as the file's ``proofs``; a record whose session never
committed goes without a proof (clearing holds it, unpaid) and is remembered; when its session
commits later (a proof at the card's next contact), its TAC goes out in a late proofs file
(one step: the file kept, the records marked). The answer (signed) is the files made by this
close, or with ``resend`` every file kept (an answer lost: clearing takes each file once, by
its batch MAC or its digest).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    select,
    update,
)
from starlette.requests import Request
from starlette.responses import Response

from ....protocols import purse as P
from ....protocols.apdu import build_command
from ....reader import Reader, ReaderError
from ...kit.db import reading, step
from ...kit.http import Refused
from ...kit.reader_pool import PoolExhausted
from ...terminal import apdus
from ...terminal.purse import TerminalError, call
from .. import db as D
from .. import wire as W
from .common import handled

if TYPE_CHECKING:
    from .psams import GoodsPsam, GoodsPsamPool

BATCH_CLOSE = b"svcard-goods-batch-close/1\n"   # the payment party's operator -> payment
CLOSE_FIELDS: dict[str, W.Checker] = {"resend": W.BOOL, "created": W.SECONDS}
CLOSE_WAIT = 60.0        # s the close waits for each PSAM's purchase to end (then 503)
MAX_RESENT = 10_000      # files one answer resends
PROOFS_FORMAT = "svcard late proofs v1"   # host/settle/proofs.py reads it

batch_md = MetaData()
files = Table(   # every file handed to clearing, kept to be resent
    "goods_clearing_files", batch_md,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("psam", String(20), nullable=False),
    Column("batch_number", BigInteger, nullable=True),    # a batch file's; None: late proofs
    Column("body", Text, nullable=False),
    Column("created", BigInteger, nullable=False))
unproved = Table(   # records handed in a batch without their card TAC
    "goods_unproved_records", batch_md,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("psam", String(20), nullable=False),
    Column("ttn", BigInteger, nullable=False),
    Column("batch_number", BigInteger, nullable=False),
    Column("proof_file", String(100), nullable=True),     # the late proofs file with its TAC
    UniqueConstraint("psam", "ttn", "batch_number"),
    Column("created", BigInteger, nullable=False))


def batch_name(terminal_hex: str, psam_hex: str, number: int) -> str:
    return f"batch-{terminal_hex}-{psam_hex}-{number:06d}.json"


def _prepare(engine: Engine) -> None:
    batch_md.create_all(engine, checkfirst=True)


def _read_batch(reader: Reader, answer: Any) -> dict[str, Any] | None:
    """The records of the batch the PSAM closed last (``answer``: its header); None if empty."""
    records = [call(reader, apdus.read_batch_record(1, i), "PSAM READ BATCH RECORD").hex()
               .upper() for i in range(answer.record_count)]
    if not records:
        return None
    return {"terminal_id": answer.terminal_id.hex().upper(),
            "batch_number": answer.batch_number, "record_count": answer.record_count,
            "total_amount": answer.total_amount, "mac": answer.mac.hex().upper(),
            "records": records}


def last_closed(reader: Reader) -> dict[str, Any] | None:
    """The PSAM's last closed batch with its records (CLOSE BATCH P1=1 answers it again), or
    None when it never closed one or it was empty."""
    found = reader.exchange(build_command(P.CLA_PBOC, P.INS_SAM_CLOSE_BATCH, 1, 0, b"", 256))
    if not found.ok:   # 6A83: none closed yet
        return None
    return _read_batch(reader, P.BatchCloseAnswer.parse(found.data))


def close_open(reader: Reader) -> dict[str, Any] | None:
    """CLOSE BATCH on the PSAM's open batch and its records (None if it was empty: closed
    anyway, so the numbers stay in step)."""
    answer = P.BatchCloseAnswer.parse(call(reader, apdus.sam_close_batch(), "PSAM CLOSE BATCH"))
    return _read_batch(reader, answer)


def _held(engine: Engine, psam: str, number: int) -> bool:
    with reading(engine) as conn:
        return conn.execute(select(files.c.id).where(
            files.c.psam == psam, files.c.batch_number == number)).first() is not None


def keep_batch(engine: Engine, psam: str, batch: dict[str, Any], now: int) -> dict[str, str]:
    """One step: the batch file kept with the TACs of its records' committed sessions, its
    records without one remembered; the file as {name, body} (the kept one if already kept)."""
    s = D.purse_sessions
    name = batch_name(batch["terminal_id"], psam, int(batch["batch_number"]))
    ttns = [P.PsamRecord.parse(bytes.fromhex(r)).terminal_txn_number for r in batch["records"]]
    with step(engine) as conn:
        kept = conn.execute(select(files.c.body).where(files.c.name == name)).first()
        if kept is not None:
            return {"name": name, "body": kept.body}
        tacs = {int(t): str(tac) for t, tac in conn.execute(select(s.c.ttn, s.c.tac).where(
            s.c.psam == psam, s.c.state == D.COMMITTED, s.c.ttn.in_(ttns),
            s.c.tac.is_not(None)))}
        proofs = {str(i): tacs[t].upper() for i, t in enumerate(ttns) if t in tacs}
        body = json.dumps({**batch, "psam_id": psam, "proofs": proofs}, indent=1)
        conn.execute(insert(files).values(name=name, psam=psam,
                                          batch_number=int(batch["batch_number"]), body=body,
                                          created=now))
        rows = [{"psam": psam, "ttn": t, "batch_number": int(batch["batch_number"]),
                 "created": now} for t in dict.fromkeys(ttns) if t not in tacs]
        if rows:
            conn.execute(insert(unproved), rows)
    return {"name": name, "body": body}


def late_proofs(engine: Engine, terminal: str, now: int) -> list[dict[str, str]]:
    """One step: the TACs of sessions that committed after their record went out without one,
    one late proofs file per PSAM, the records marked with it."""
    s, u = D.purse_sessions, unproved
    out = []
    with step(engine) as conn:
        found = conn.execute(select(u.c.id, u.c.psam, u.c.ttn, u.c.batch_number, s.c.tac)
                             .join(s, (s.c.psam == u.c.psam) & (s.c.ttn == u.c.ttn))
                             .where(u.c.proof_file.is_(None), s.c.state == D.COMMITTED,
                                    s.c.tac.is_not(None))
                             .order_by(u.c.id).limit(100_000)).all()
        by_psam: dict[str, list[Any]] = {}
        for row in found:
            by_psam.setdefault(row.psam, []).append(row)
        for psam, rows in sorted(by_psam.items()):
            body = json.dumps({"format": PROOFS_FORMAT, "terminal_id": terminal,
                               "psam_id": psam,
                               "proofs": [{"batch_number": int(r.batch_number),
                                           "terminal_txn_number": int(r.ttn),
                                           "tac": str(r.tac).upper()} for r in rows]},
                              indent=1)
            digest = hashlib.sha256(body.encode()).hexdigest()[:20].upper()
            name = f"proofs-{terminal}-{psam}-{digest}.json"
            conn.execute(insert(files).values(name=name, psam=psam, batch_number=None,
                                              body=body, created=now))
            conn.execute(update(u).where(u.c.id.in_([r.id for r in rows]))
                         .values(proof_file=name))
            out.append({"name": name, "body": body})
    return out


def kept_files(engine: Engine) -> list[dict[str, str]]:
    """The newest :data:`MAX_RESENT` files kept, oldest first."""
    with reading(engine) as conn:
        rows = conn.execute(select(files.c.name, files.c.body).order_by(files.c.id.desc())
                            .limit(MAX_RESENT)).all()
    return [{"name": r.name, "body": r.body} for r in reversed(rows)]


async def close_batches(server: Any, request: Request) -> Response:
    """The route: ``server`` is the goods payment server (its pool, database and keys)."""
    async def work() -> Response:
        _, data, _ = await server.authenticated(request, CLOSE_FIELDS, "batch close",
                                                BATCH_CLOSE, ("payment",))
        pool: GoodsPsamPool | None = server.pool
        if pool is None:
            raise Refused(409, 409, "batch close: this payment server holds no PSAMs")
        engine: Engine = server.engine
        await server.sql(_prepare, engine)
        made: list[dict[str, str]] = []
        async with pool.close_lock:
            taken: list[GoodsPsam] = []
            try:
                for _ in pool.members:   # each as its purchase ends, all held to the end
                    taken.append(await pool.acquire(CLOSE_WAIT))
                for member in taken:
                    lost = await pool.run(member, last_closed)
                    if lost is not None and not await server.sql(
                            _held, engine, member.serial, int(lost["batch_number"])):
                        made.append(await server.sql(keep_batch, engine, member.serial, lost,
                                                     server.now_ms()))
                    batch = await pool.run(member, close_open)
                    if batch is not None:
                        made.append(await server.sql(keep_batch, engine, member.serial, batch,
                                                     server.now_ms()))
            except PoolExhausted:
                raise Refused(503, 503, f"batch close: a PSAM stayed busy; {len(made)} "
                                        "batches closed are kept: run again (with resend)",
                              {"Retry-After": "5"}) from None
            except (TerminalError, ReaderError) as exc:   # the next close reads it again
                raise Refused(503, 503, f"batch close: a PSAM failed ({type(exc).__name__}: "
                                        f"{str(exc)[:100]}); {len(made)} batches closed are "
                                        "kept: run again (with resend)") from None
            finally:
                for member in taken:
                    pool.release(member)
            made += await server.sql(late_proofs, engine, pool.terminal_id.hex().upper(),
                                     server.now_ms())
        answer = await server.sql(kept_files, engine) if data["resend"] else made
        reply: Response = server.reply(BATCH_CLOSE, {"files": answer,
                                                     "created": server.now_ms() // 1000})
        return reply
    result: Response = await handled(work)
    return result
