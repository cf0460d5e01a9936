"""Leases of security modules among server processes (nodes) on one database, each module (a
payment node's PSAM, a load node's HSM) used by one node at a time (issue 16; the design:
docs/deploy-nodes.md). A server names its tables (:func:`lease_tables`) and pool class. A
lease is taken by ONE conditional UPDATE (free or expired) that bumps its fencing token and
renewed by one UPDATE naming the holder, on the database's clock. Every write made with a
module carries a :class:`Fence`, refused in the same statement once the token is stale.
:class:`LeaseKeeper` runs every ``lease_seconds / 3``: heartbeat, renew (a renewed lease the
pool does not serve is given back), drop what was lost, settle the work of nodes unseen for a
whole lease, take modules up to this node's share, give back the rest.
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
from typing import Any, Generic

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Exists,
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

from .db import now_ms, reading, step
from .reader_pool import M, PoolExhausted, ReaderPool
from .schema import Schema, prepare


@dataclass(frozen=True)
class LeaseTables:   # one server's lease tables, its schema stamp and the fence clause on them
    metadata: MetaData
    leases: Table
    history: Table
    nodes: Table
    schema: Schema
    fence: Exists


def lease_tables(leases: str, history: str, nodes: str, unique: str) -> LeaseTables:
    """The three tables under these names (the schema stamp is named like the leases')."""
    metadata = MetaData()
    lease = Table(
        leases, metadata,
        Column("slot", String(300), primary_key=True),
        Column("node", String(100)),                      # None: free
        Column("token", BigInteger, nullable=False),      # the fencing token: only grows
        Column("expires", BigInteger, nullable=False),    # ms since the epoch, the DB's clock
    )
    past = Table(
        history, metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("slot", String(300), nullable=False),
        Column("node", String(100), nullable=False),
        Column("token", BigInteger, nullable=False),
        Column("previous", String(100)),                  # the node it was taken from
        Column("taken", BigInteger, nullable=False),
        Column("until", BigInteger, nullable=False),      # the last expiry renewed
        Column("ended", BigInteger),                      # given back, or taken over at until
        UniqueConstraint("slot", "token", name=unique),
    )
    seen = Table(
        nodes, metadata,
        Column("node", String(100), primary_key=True),
        Column("seen", BigInteger, nullable=False),
        Column("started", BigInteger, nullable=False),
    )
    # the fence of a write: the lease row still names this node and token (locked FOR SHARE
    # on PostgreSQL until the write commits, so a take cannot slip in between)
    fence = exists(select(lease.c.slot).where(
        lease.c.slot == bindparam("f_slot"), lease.c.node == bindparam("f_node"),
        lease.c.token == bindparam("f_token")).with_for_update(read=True))
    return LeaseTables(metadata, lease, past, seen, Schema(leases, 1, metadata), fence)


@dataclass(frozen=True)
class Fence:   # what a fenced write names: the module's slot, this node and the token it took
    slot: str
    node: str
    token: int

    def params(self) -> dict[str, Any]:
        return {"f_slot": self.slot, "f_node": self.node, "f_token": self.token}


_CLOCKS = {"postgresql": text("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS "
                               "BIGINT)"),   # the database's clock, ms since the epoch
           "sqlite": text("SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)")}


def db_now(conn: Connection) -> int:
    """The lease statements' time: the database's clock (ms), whatever the node's clock."""
    query = _CLOCKS.get(conn.dialect.name)
    return now_ms() if query is None else int(conn.execute(query).scalar_one())


def node_id(name: str) -> str:
    """A node's id: its name and this process's incarnation (a restarted node is new)."""
    return f"{name[:60]}#{os.getpid()}-{secrets.token_hex(3)}"


class LeaseStore:   # the lease statements, each one database step
    def __init__(self, engine: Engine, tables: LeaseTables) -> None:
        self.engine, self.tables = engine, tables
        prepare(engine, tables.schema)

    def ensure(self, slots: list[str]) -> None:
        leases = self.tables.leases
        for slot in slots:
            with contextlib.suppress(IntegrityError), step(self.engine) as conn:  # (raced)
                if conn.execute(select(leases.c.slot).where(
                        leases.c.slot == slot)).first() is None:
                    conn.execute(insert(leases).values(slot=slot, node=None, token=0,
                                                       expires=0))

    def heartbeat(self, node: str, window_ms: int) -> dict[str, int]:
        """Stamp this node alive; {node: ms since seen} of the nodes seen within window_ms."""
        nodes = self.tables.nodes
        with step(self.engine) as conn:
            now = db_now(conn)
            if not conn.execute(update(nodes).where(nodes.c.node == node).values(
                    seen=now)).rowcount:
                conn.execute(insert(nodes).values(node=node, seen=now, started=now))
            return {r[0]: now - int(r[1]) for r in conn.execute(select(
                nodes.c.node, nodes.c.seen).where(nodes.c.seen >= now - window_ms))}

    def renew(self, node: str, ttl_ms: int) -> dict[str, int]:
        """Extend every lease ``node`` holds: {slot: token} of those it still holds."""
        leases, history = self.tables.leases, self.tables.history
        with step(self.engine) as conn:
            until = db_now(conn) + ttl_ms
            held = {str(r[0]): int(r[1]) for r in conn.execute(
                update(leases).where(leases.c.node == node).values(expires=until)
                .returning(leases.c.slot, leases.c.token))}
            for slot, token in held.items():
                conn.execute(update(history).where(
                    history.c.slot == slot, history.c.token == token,
                    history.c.ended.is_(None)).values(until=until))
        return held

    def take(self, slot: str, node: str, ttl_ms: int) -> tuple[int, str | None] | None:
        """Take ``slot`` if free or expired, in one statement: (new token, previous holder)."""
        leases, history = self.tables.leases, self.tables.history
        with step(self.engine) as conn:
            now = db_now(conn)
            before = conn.execute(select(leases.c.node).where(leases.c.slot == slot)).first()
            row = conn.execute(update(leases).where(
                leases.c.slot == slot, or_(leases.c.node.is_(None), leases.c.expires < now),
            ).values(node=node, token=leases.c.token + 1, expires=now + ttl_ms)
                .returning(leases.c.token)).first()
            if row is None:
                return None
            token, previous = int(row[0]), (before[0] if before is not None else None)
            conn.execute(update(history).where(
                history.c.slot == slot, history.c.token == token - 1,
                history.c.ended.is_(None)).values(ended=history.c.until))
            conn.execute(insert(history).values(
                slot=slot, node=node, token=token, previous=previous, taken=now,
                until=now + ttl_ms))
        return token, previous

    def release(self, slot: str, node: str, token: int) -> bool:  # False: no longer ours
        leases, history = self.tables.leases, self.tables.history
        with step(self.engine) as conn:
            now = db_now(conn)
            done = conn.execute(update(leases).where(
                leases.c.slot == slot, leases.c.node == node,
                leases.c.token == token).values(node=None, expires=0)).rowcount
            if done:
                conn.execute(update(history).where(
                    history.c.slot == slot, history.c.token == token).values(ended=now, until=now))
        return bool(done)

    def current(self, fence: Fence) -> bool:   # the fence's lease still stands
        leases = self.tables.leases
        with reading(self.engine) as conn:
            return conn.execute(select(leases.c.slot).where(
                leases.c.slot == fence.slot, leases.c.node == fence.node,
                leases.c.token == fence.token)).first() is not None

    def history(self) -> list[dict[str, Any]]:   # the audit, in slot and token order
        history = self.tables.history
        with reading(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(history).order_by(history.c.slot, history.c.token))]


class LeasedPool(ReaderPool[M], Generic[M]):
    """Only the modules this node leases: one joins when taken (opened on its own thread),
    leaves once its work ends. First among a server pool's bases; :meth:`joined` checks."""

    kind = "module"   # in messages: "PSAM", "HSM"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.serving: dict[int, float] = {}   # member index -> monotonic time its lease ends
        self.tokens, self.busy = dict[int, int](), set[int]()
        self._leaving: dict[int, asyncio.Event] = {}

    async def start(self) -> None:   # nothing opened until leased
        self._idle = asyncio.Queue()

    def joined(self, member: M) -> None:
        """A module just opened: raise to refuse it."""

    async def join(self, member: M, token: int, valid_until: float,
                   admit: Callable[[M], Awaitable[None]] | None = None) -> None:
        """Open ``member`` (leased with ``token``; ``admit`` may refuse it, raising), serve it
        until ``valid_until`` (monotonic, from before the take: never past the expiry)."""
        loop = asyncio.get_running_loop()
        try:   # a module that fails to open is closed again: its image lock is not kept
            await loop.run_in_executor(member.executor, self.open_member, member)
            self.joined(member)
            if admit is not None:
                await admit(member)
        except BaseException:
            await loop.run_in_executor(member.executor, member.reader.disconnect)
            raise
        self.tokens[member.index] = token
        self.serving[member.index] = valid_until
        assert self._idle is not None
        self._idle.put_nowait(member)

    async def leave(self, member: M) -> None:
        """Stop serving ``member``: wait for its work to end, close its reader."""
        if member.index not in self.tokens:
            return
        self.serving.pop(member.index, None)
        assert self._idle is not None
        for m in [self._idle.get_nowait() for _ in range(self._idle.qsize())]:
            if m.index != member.index:
                self._idle.put_nowait(m)
        if member.index in self.busy:
            await self._leaving.setdefault(member.index, asyncio.Event()).wait()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(member.executor, member.reader.disconnect)
        self.tokens.pop(member.index, None)

    async def acquire(self, timeout: float) -> M:
        if not self.serving:
            raise PoolExhausted(f"this node holds no {self.kind} lease")
        deadline = time.monotonic() + timeout
        while True:
            member = await super().acquire(max(0.0, deadline - time.monotonic()))
            self.busy.add(member.index)
            if time.monotonic() < self.serving.get(member.index, 0.0):
                return member
            self.release(member)   # lost or no longer renewed: not served
            if time.monotonic() >= deadline:
                raise PoolExhausted(f"no {self.kind} lease renewed in time")
            await asyncio.sleep(0.01)

    def release(self, member: M) -> None:
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


Sql = Callable[..., Awaitable[Any]]


class LeaseKeeper:   # see the module docstring; settle(living): the work of nodes not living
    def __init__(self, store: LeaseStore, pool: LeasedPool[Any], name: str,
                 lease_seconds: float, sql: Sql, settle: Callable[[list[str]], int]) -> None:
        self.store, self.pool, self.sql, self.settle = store, pool, sql, settle
        self.node, self.lease_seconds, self.ttl_ms = node_id(name), lease_seconds, int(
            lease_seconds * 1000)
        self.slots, self.alive = [m.reader.name for m in pool.members], list[str]()
        self.log = logging.getLogger(type(self).__module__)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._pending: set[asyncio.Task[None]] = set()

    def fence(self, member: Any) -> Fence:  # what a write made with the module carries
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
                self.log.exception("%s lease renewal failed at node %s", self.pool.kind,
                                   self.node)

    async def tick(self) -> None:
        started = time.monotonic()
        # share: nodes seen within 2 ticks; settled: work of nodes unseen for a whole lease
        ages = await self.sql(self.store.heartbeat, self.node, self.ttl_ms)
        alive, living = [n for n, age in ages.items() if age <= self.ttl_ms * 2 // 3], sorted(ages)
        held = await self.sql(self.store.renew, self.node, self.ttl_ms)
        for slot, token in held.items():   # taken, never opened (a tick failed between): back
            if slot not in self.slots or self.pool.tokens.get(self.slots.index(slot)) != token:
                await self.sql(self.store.release, slot, self.node, token)
        valid = started + self.lease_seconds * 0.9
        for m in [m for m in self.pool.members if m.index in self.pool.serving]:
            if held.get(self.slots[m.index]) == self.pool.tokens.get(m.index):
                self.pool.serving[m.index] = valid
            else:
                self.log.warning("node %s lost the lease of %s", self.node, self.slots[m.index])
                self._later(self.pool.leave(m))   # once its work ends
        if not self.alive or set(self.alive) - set(living):
            await self.sql(self.settle, living)   # a node went away: settle its work
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
            try:
                await self.pool.join(self.pool.members[index], token,
                                     asked + self.lease_seconds * 0.9, self.admit)
            except Exception:
                self.log.exception("node %s took %s but could not open it", self.node,
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

    async def admit(self, member: Any) -> None:
        """A module just opened, not yet served: raise to refuse it (the lease is given back)."""

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        """Work waiting for a module's transaction (a FIG. 5 hold) runs beside the ticks."""
        task = asyncio.create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _preference(self) -> list[int]:   # nodes started together ask for different ones
        """The slots in this node's order: a rotation by the node's name."""
        n, first = len(self.slots), sum(self.node.split("#")[0].encode())
        return [(first + i) % n for i in range(n)]

    async def _give_back(self, member: Any) -> None:
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
