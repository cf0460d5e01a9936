"""PSAM leases: several payment-server processes (nodes) on one database, each PSAM served by
one node at a time (issue 16, point 4; docs/deploy-nodes.md tells the whole design).

Tables: ``psam_leases`` (per PSAM slot: holder, expiry in ms on the database's clock, a fencing
token that only grows), ``psam_lease_history`` (the audit of "one node at a time") and
``pay_nodes`` (heartbeats). A lease is taken by ONE conditional UPDATE (free or expired) that
bumps the token, renewed by one UPDATE naming the holder. Every write for a PSAM's transaction
carries :class:`Fence`, refused in the same statement once the token is stale (:data:`FENCE`).
:class:`LeasedPsamPool` holds only the PSAMs this node leases; :class:`LeaseKeeper` runs every
``lease_seconds / 3``: heartbeat, renew, drop what was lost, settle the draws of nodes no
longer alive, take PSAMs up to this node's share, give back the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    bindparam,
    exists,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from ....reader import Reader
from ...kit.db import now_ms, reading, step
from ...kit.schema import Schema, prepare
from .psam_pool import PooledPsam, PoolExhausted, PsamPool

log = logging.getLogger(__name__)

lease_metadata = MetaData()

psam_leases = Table(
    "psam_leases", lease_metadata,
    Column("slot", String(300), primary_key=True),
    Column("node", String(100)),                      # None: free
    Column("token", BigInteger, nullable=False),      # the fencing token: only grows
    Column("expires", BigInteger, nullable=False),    # ms since the epoch
)

lease_history = Table(
    "psam_lease_history", lease_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("slot", String(300), nullable=False),
    Column("node", String(100), nullable=False),
    Column("token", BigInteger, nullable=False),
    Column("previous", String(100)),                  # the node it was taken from
    Column("taken", BigInteger, nullable=False),
    Column("until", BigInteger, nullable=False),      # the last expiry renewed
    Column("ended", BigInteger),                      # given back, or taken over at ``until``
    UniqueConstraint("slot", "token", name="uq_lease_slot_token"),
)

pay_nodes = Table(
    "pay_nodes", lease_metadata,
    Column("node", String(100), primary_key=True),
    Column("seen", BigInteger, nullable=False),
    Column("started", BigInteger, nullable=False),
)

SCHEMA = Schema("psam_leases", 1, lease_metadata)

# the fence of a write: the lease row still names this node and token (locked FOR SHARE on
# PostgreSQL until the write commits, so a take cannot slip in between)
FENCE = exists(select(psam_leases.c.slot).where(
    psam_leases.c.slot == bindparam("f_slot"), psam_leases.c.node == bindparam("f_node"),
    psam_leases.c.token == bindparam("f_token")).with_for_update(read=True))


@dataclass(frozen=True)
class Fence:
    """What a fenced write names: the PSAM's slot, this node and the token it took."""

    slot: str
    node: str
    token: int

    def params(self) -> dict[str, Any]:
        return {"f_slot": self.slot, "f_node": self.node, "f_token": self.token}


_CLOCKS = {"postgresql": text("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS "
                               "BIGINT)"),   # the database's clock, ms since the epoch
           "sqlite": text("SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)")}


def db_now(conn: Connection) -> int:
    """The time every lease statement uses: the database's clock (ms since the epoch), so a
    node whose own clock is off neither takes a lease early nor renews one into the past."""
    query = _CLOCKS.get(conn.dialect.name)
    return now_ms() if query is None else int(conn.execute(query).scalar_one())


def node_id(name: str) -> str:
    """A node's id: its configured name and this process's incarnation (a restarted node is
    a new holder: it waits for its old leases to expire like any other node)."""
    return f"{name[:60]}#{os.getpid()}-{secrets.token_hex(3)}"


class LeaseStore:
    """The lease statements (each a :func:`~svcard.host.kit.db.step`)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        prepare(engine, SCHEMA)

    def ensure(self, slots: list[str]) -> None:
        for slot in slots:
            with contextlib.suppress(IntegrityError), step(self.engine) as conn:  # (raced)
                if conn.execute(select(psam_leases.c.slot).where(
                        psam_leases.c.slot == slot)).first() is None:
                    conn.execute(insert(psam_leases).values(slot=slot, node=None, token=0,
                                                            expires=0))

    def heartbeat(self, node: str, window_ms: int) -> dict[str, int]:
        """Stamp this node alive; {node: ms since seen} of the nodes seen within window_ms."""
        with step(self.engine) as conn:
            now = db_now(conn)
            if not conn.execute(update(pay_nodes).where(pay_nodes.c.node == node).values(
                    seen=now)).rowcount:
                conn.execute(insert(pay_nodes).values(node=node, seen=now, started=now))
            return {r[0]: now - int(r[1]) for r in conn.execute(select(
                pay_nodes.c.node, pay_nodes.c.seen).where(pay_nodes.c.seen >= now - window_ms))}

    def renew(self, node: str, ttl_ms: int) -> dict[str, int]:
        """Extend every lease ``node`` holds: {slot: token} of those it still holds."""
        with step(self.engine) as conn:
            until = db_now(conn) + ttl_ms
            held = {str(r[0]): int(r[1]) for r in conn.execute(
                update(psam_leases).where(psam_leases.c.node == node).values(expires=until)
                .returning(psam_leases.c.slot, psam_leases.c.token))}
            for slot, token in held.items():
                conn.execute(update(lease_history).where(
                    lease_history.c.slot == slot, lease_history.c.token == token,
                    lease_history.c.ended.is_(None)).values(until=until))
        return held

    def take(self, slot: str, node: str, ttl_ms: int) -> tuple[int, str | None] | None:
        """Take ``slot`` if it is free or its lease expired, in one statement: (the new token,
        the node it was taken from), or None if another node holds it."""
        with step(self.engine) as conn:
            now = db_now(conn)
            before = conn.execute(select(psam_leases).where(
                psam_leases.c.slot == slot)).first()
            row = conn.execute(update(psam_leases).where(
                psam_leases.c.slot == slot,
                or_(psam_leases.c.node.is_(None), psam_leases.c.expires < now),
            ).values(node=node, token=psam_leases.c.token + 1, expires=now + ttl_ms)
                .returning(psam_leases.c.token)).first()
            if row is None:
                return None
            token, previous = int(row[0]), (before.node if before is not None else None)
            conn.execute(update(lease_history).where(
                lease_history.c.slot == slot, lease_history.c.token == token - 1,
                lease_history.c.ended.is_(None)).values(ended=lease_history.c.until))
            conn.execute(insert(lease_history).values(
                slot=slot, node=node, token=token, previous=previous, taken=now,
                until=now + ttl_ms))
        return token, previous

    def release(self, slot: str, node: str, token: int) -> bool:  # False: no longer ours
        with step(self.engine) as conn:
            now = db_now(conn)
            done = conn.execute(update(psam_leases).where(
                psam_leases.c.slot == slot, psam_leases.c.node == node,
                psam_leases.c.token == token).values(node=None, expires=0)).rowcount
            if done:
                conn.execute(update(lease_history).where(
                    lease_history.c.slot == slot, lease_history.c.token == token).values(
                    ended=now, until=now))
        return bool(done)

    def history(self) -> list[dict[str, Any]]:   # the audit, in slot and token order
        with reading(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(lease_history).order_by(lease_history.c.slot, lease_history.c.token))]


class LeasedPsamPool(PsamPool):
    """A pool of only the PSAMs this node leases: a PSAM joins when taken (opened on its own
    thread) and leaves before its lease is given back or once it was lost."""

    def __init__(self, readers: list[Reader], **kwargs: Any) -> None:
        super().__init__(readers, **kwargs)
        self.serving: dict[int, float] = {}   # member index -> monotonic time its lease ends
        self.tokens: dict[int, int] = {}
        self._leaving: dict[int, asyncio.Event] = {}
        self.busy, self._terminal_id = set[int](), b""

    @property
    def psams(self) -> list[PooledPsam]:
        return [m for m in self.members if m.index in self.serving]

    @property
    def terminal_id(self) -> bytes:   # the terminal of the PSAMs it served (one for all)
        return self._terminal_id

    async def start(self) -> None:   # nothing opened until leased
        self._idle = asyncio.Queue()

    async def join(self, member: PooledPsam, token: int, valid_until: float) -> None:
        """Open ``member`` (leased with ``token``) and serve it until ``valid_until``
        (monotonic; counted from before the take, so never past the lease's expiry)."""
        loop = asyncio.get_running_loop()
        try:   # a PSAM that fails to open is closed again: its image lock is not kept
            await loop.run_in_executor(member.executor, self.open_member, member)
            if self._terminal_id and member.terminal_id != self._terminal_id:
                raise ValueError(f"PSAM {member.reader.name} answers another terminal id")
        except BaseException:
            await loop.run_in_executor(member.executor, member.reader.disconnect)
            raise
        self._terminal_id = member.terminal_id
        self.tokens[member.index] = token
        self.serving[member.index] = valid_until
        assert self._idle is not None
        self._idle.put_nowait(member)

    async def leave(self, member: PooledPsam) -> None:
        """Stop serving ``member``: wait for its transaction to end, close its reader."""
        if member.index not in self.tokens:
            return
        self.serving.pop(member.index, None)
        assert self._idle is not None
        for m in _drain(self._idle):
            if m.index != member.index:
                self._idle.put_nowait(m)
        if member.index in self.busy:
            event = self._leaving.setdefault(member.index, asyncio.Event())
            await event.wait()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(member.executor, member.reader.disconnect)
        self.tokens.pop(member.index, None)

    async def acquire(self, timeout: float) -> PooledPsam:
        if not self.serving:
            raise PoolExhausted("this node holds no PSAM lease")
        deadline = time.monotonic() + timeout
        while True:
            member = await super().acquire(max(0.0, deadline - time.monotonic()))
            self.busy.add(member.index)
            if time.monotonic() < self.serving.get(member.index, 0.0):
                return member
            self.release(member)   # lost or no longer renewed: not served
            if time.monotonic() >= deadline:
                raise PoolExhausted("no PSAM lease renewed in time")
            await asyncio.sleep(0.01)

    def release(self, member: PooledPsam) -> None:
        self.busy.discard(member.index)
        if member.index in self.serving:
            super().release(member)
        elif member.index in self._leaving:
            self._leaving.pop(member.index).set()

    def close(self) -> None:
        for m in self.members:
            try:
                if m.index in self.tokens:
                    m.executor.submit(m.reader.disconnect).result(timeout=10)
            finally:
                m.executor.shutdown(wait=False)


def _drain(queue: asyncio.Queue[PooledPsam]) -> list[PooledPsam]:
    return [queue.get_nowait() for _ in range(queue.qsize())]


Sql = Callable[..., Awaitable[Any]]


class LeaseKeeper:
    """The node's background lease work (see the module docstring)."""

    def __init__(self, store: LeaseStore, pool: LeasedPsamPool, name: str, lease_seconds: float,
                 sql: Sql, settle: Callable[[list[str]], int]) -> None:
        self.store, self.pool, self.sql, self.settle = store, pool, sql, settle
        self.node, self.lease_seconds, self.ttl_ms = node_id(name), lease_seconds, int(
            lease_seconds * 1000)
        self.slots, self.alive = [m.reader.name for m in pool.members], list[str]()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._pending: set[asyncio.Task[None]] = set()

    def fence(self, member: PooledPsam) -> Fence:  # what a write for its transaction carries
        return Fence(self.slots[member.index], self.node, self.pool.tokens[member.index])

    async def start(self) -> None:
        await self.sql(self.store.ensure, self.slots)
        await self.tick()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.tick()
            except Exception:  # the database away for a moment: the leases run out
                log.exception("lease renewal failed at node %s", self.node)

    async def tick(self) -> None:
        started = time.monotonic()
        # share: nodes seen within 2 ticks; settled: draws of nodes unseen for a whole lease
        ages = await self.sql(self.store.heartbeat, self.node, self.ttl_ms)
        alive, living = [n for n, age in ages.items() if age <= self.ttl_ms * 2 // 3], sorted(ages)
        held = await self.sql(self.store.renew, self.node, self.ttl_ms)
        for slot, token in held.items():   # taken, never opened (a tick failed between): back
            if self.pool.tokens.get(self.slots.index(slot)) != token:
                await self.sql(self.store.release, slot, self.node, token)
        valid = started + self.lease_seconds * 0.9
        for m in [m for m in self.pool.members if m.index in self.pool.serving]:
            if held.get(self.slots[m.index]) == self.pool.tokens.get(m.index):
                self.pool.serving[m.index] = valid
            else:
                log.warning("node %s lost the lease of %s", self.node, self.slots[m.index])
                self._later(self.pool.leave(m))   # once its transaction ends
        if not self.alive or set(self.alive) - set(living):
            await self.sql(self.settle, living)   # a node went away: settle its draws
        self.alive = living
        share, mine = math.ceil(len(self.slots) / max(1, len(alive))), len(self.pool.serving)
        order = self._preference()
        for index in order:
            if mine >= share:
                break
            if index in self.pool.tokens:   # served, or still leaving
                continue
            asked = time.monotonic()
            taken = await self.sql(self.store.take, self.slots[index], self.node, self.ttl_ms)
            if taken is None:
                continue
            token, previous = taken
            member = self.pool.members[index]
            try:
                await self.pool.join(member, token, asked + self.lease_seconds * 0.9)
            except Exception:
                log.exception("node %s took %s but could not open it", self.node,
                              self.slots[index])
                await self.sql(self.store.release, self.slots[index], self.node, token)
                continue
            mine += 1
            if previous is not None:
                await self.sql(self.settle, living)
        for index in reversed(order):
            if mine <= share:
                break
            if index in self.pool.serving:
                self._later(self._give_back(self.pool.members[index]))
                mine -= 1

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        """Work that waits for a PSAM's transaction (a FIG. 5 hold may last ``hold_timeout``)
        runs beside the ticks, so the other leases are still renewed on time."""
        task = asyncio.create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _preference(self) -> list[int]:
        """The slots in this node's order: a rotation by the node's name, so nodes started
        together ask for different PSAMs first."""
        n, first = len(self.slots), sum(self.node.split("#")[0].encode())
        return [(first + i) % n for i in range(n)]

    async def _give_back(self, member: PooledPsam) -> None:
        token = self.pool.tokens.get(member.index)
        await self.pool.leave(member)
        if token is not None:
            await self.sql(self.store.release, self.slots[member.index], self.node, token)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await asyncio.gather(*self._pending, return_exceptions=True)
        for m in self.pool.members:
            if m.index in self.pool.tokens:
                await self._give_back(m)
