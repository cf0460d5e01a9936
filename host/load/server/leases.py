"""HSM leases: several load-server processes (nodes) on one database, each load HSM used by one
node at a time (issue 16, point 4 for loads; docs/deploy-nodes.md, "Load nodes").

The same design as the payment nodes' PSAM leases (``host/pay/server/leases.py``), on tables of
the load database (schema stamp ``hsm_leases``): ``hsm_leases`` (per HSM slot, i.e. its reader
spec: holder, expiry in ms on the database's clock, a fencing token that only grows),
``hsm_lease_history`` (the audit of "one node at a time") and ``load_nodes`` (heartbeats). A lease
is taken by one conditional UPDATE (free or expired) that bumps the token and renewed by one
UPDATE naming the holder. The write that issues an HSM's S2 (a load's, a probe's) carries a
:class:`Fence` and is refused in the same statement once the token is stale (:data:`FENCE`):
a node that lost its lease while its HSM worked hands out no S2, so no card is credited by it.
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
from ...kit.reader_pool import Pooled, PoolExhausted
from ...kit.schema import Schema, prepare
from .hsm_pool import HsmPool

log = logging.getLogger(__name__)

lease_metadata = MetaData()

hsm_leases = Table(
    "hsm_leases", lease_metadata,
    Column("slot", String(300), primary_key=True),
    Column("node", String(100)),                      # None: free
    Column("token", BigInteger, nullable=False),      # the fencing token: only grows
    Column("expires", BigInteger, nullable=False),    # ms since the epoch, the DB's clock
)

lease_history = Table(
    "hsm_lease_history", lease_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("slot", String(300), nullable=False),
    Column("node", String(100), nullable=False),
    Column("token", BigInteger, nullable=False),
    Column("previous", String(100)),
    Column("taken", BigInteger, nullable=False),
    Column("until", BigInteger, nullable=False),      # the last expiry renewed
    Column("ended", BigInteger),
    UniqueConstraint("slot", "token", name="uq_hsm_lease_slot_token"),
)

load_nodes = Table(
    "load_nodes", lease_metadata,
    Column("node", String(100), primary_key=True),
    Column("seen", BigInteger, nullable=False),
    Column("started", BigInteger, nullable=False),
)

SCHEMA = Schema("hsm_leases", 1, lease_metadata)

# the fence of a write: the lease row still names this node and token (FOR SHARE on
# PostgreSQL until the write commits, so a take waits for a write already under way)
FENCE = exists(select(hsm_leases.c.slot).where(
    hsm_leases.c.slot == bindparam("f_slot"), hsm_leases.c.node == bindparam("f_node"),
    hsm_leases.c.token == bindparam("f_token")).with_for_update(read=True))


@dataclass(frozen=True)
class Fence:
    """What a fenced write names: the HSM's slot, this node and the token it took."""

    slot: str
    node: str
    token: int

    def params(self) -> dict[str, Any]:
        return {"f_slot": self.slot, "f_node": self.node, "f_token": self.token}


_CLOCKS = {"postgresql": text("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS "
                               "BIGINT)"),
           "sqlite": text("SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)")}


def db_now(conn: Connection) -> int:
    """Every lease statement's time: the database's clock (ms since the epoch)."""
    query = _CLOCKS.get(conn.dialect.name)
    return now_ms() if query is None else int(conn.execute(query).scalar_one())


def node_id(name: str) -> str:
    """This process's holder id: the node's name and an incarnation (a restarted node waits for
    its old leases to expire like any other)."""
    return f"{name[:60]}#{os.getpid()}-{secrets.token_hex(3)}"


class LeaseStore:
    """The lease statements, each one database step."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        prepare(engine, SCHEMA)

    def ensure(self, slots: list[str]) -> None:
        for slot in slots:
            with contextlib.suppress(IntegrityError), step(self.engine) as conn:  # raced
                if conn.execute(select(hsm_leases.c.slot).where(
                        hsm_leases.c.slot == slot)).first() is None:
                    conn.execute(insert(hsm_leases).values(slot=slot, node=None, token=0,
                                                           expires=0))

    def heartbeat(self, node: str, window_ms: int) -> list[str]:
        """Stamp ``node`` alive; the nodes seen within ``window_ms`` (this one too)."""
        with step(self.engine) as conn:
            now = db_now(conn)
            if not conn.execute(update(load_nodes).where(load_nodes.c.node == node).values(
                    seen=now)).rowcount:
                conn.execute(insert(load_nodes).values(node=node, seen=now, started=now))
            return sorted(r[0] for r in conn.execute(select(load_nodes.c.node).where(
                load_nodes.c.seen >= now - window_ms)))

    def renew(self, node: str, ttl_ms: int) -> dict[str, int]:
        """Extend every lease ``node`` holds: {slot: token} of those it still holds."""
        with step(self.engine) as conn:
            until = db_now(conn) + ttl_ms
            held = {str(r[0]): int(r[1]) for r in conn.execute(
                update(hsm_leases).where(hsm_leases.c.node == node).values(expires=until)
                .returning(hsm_leases.c.slot, hsm_leases.c.token))}
            for slot, token in held.items():
                conn.execute(update(lease_history).where(
                    lease_history.c.slot == slot, lease_history.c.token == token,
                    lease_history.c.ended.is_(None)).values(until=until))
        return held

    def take(self, slot: str, node: str, ttl_ms: int) -> tuple[int, str | None] | None:
        """Take ``slot`` if free or expired (one UPDATE): (new token, previous holder), or
        None while another node holds it."""
        with step(self.engine) as conn:
            now = db_now(conn)
            before = conn.execute(select(hsm_leases.c.node).where(
                hsm_leases.c.slot == slot)).first()
            row = conn.execute(update(hsm_leases).where(
                hsm_leases.c.slot == slot,
                or_(hsm_leases.c.node.is_(None), hsm_leases.c.expires < now),
            ).values(node=node, token=hsm_leases.c.token + 1, expires=now + ttl_ms)
                .returning(hsm_leases.c.token)).first()
            if row is None:
                return None
            token = int(row[0])
            previous = before[0] if before is not None else None
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
            done = conn.execute(update(hsm_leases).where(
                hsm_leases.c.slot == slot, hsm_leases.c.node == node,
                hsm_leases.c.token == token).values(node=None, expires=0)).rowcount
            if done:
                conn.execute(update(lease_history).where(
                    lease_history.c.slot == slot, lease_history.c.token == token).values(
                    ended=now, until=now))
        return bool(done)

    def current(self, fence: Fence) -> bool:   # the fence's lease still stands
        with reading(self.engine) as conn:
            return conn.execute(select(hsm_leases.c.slot).where(
                hsm_leases.c.slot == fence.slot, hsm_leases.c.node == fence.node,
                hsm_leases.c.token == fence.token)).first() is not None

    def history(self) -> list[dict[str, Any]]:   # the audit, in slot and token order
        with reading(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(lease_history).order_by(lease_history.c.slot, lease_history.c.token))]


class LeasedHsmPool(HsmPool):
    """Only the HSMs this node leases: one joins when taken (opened on its own thread) and
    leaves once its command ends, before its lease is given back or once it was lost."""

    def __init__(self, readers: list[Reader], **kwargs: Any) -> None:
        super().__init__(readers, **kwargs)
        self.serving: dict[int, float] = {}   # member index -> monotonic end of its lease
        self.tokens: dict[int, int] = {}
        self.busy: set[int] = set()
        self._leaving: dict[int, asyncio.Event] = {}

    async def start(self) -> None:   # nothing opened until leased
        self._idle = asyncio.Queue()

    async def join(self, member: Pooled, token: int, valid_until: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(member.executor, self.open_member, member)
        except BaseException:   # not opened: its image lock is not kept
            await loop.run_in_executor(member.executor, member.reader.disconnect)
            raise
        self.tokens[member.index] = token
        self.serving[member.index] = valid_until
        assert self._idle is not None
        self._idle.put_nowait(member)

    async def leave(self, member: Pooled) -> None:
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

    async def acquire(self, timeout: float) -> Pooled:
        if not self.serving:
            raise PoolExhausted("this node holds no HSM lease")
        deadline = time.monotonic() + timeout
        while True:
            member = await super().acquire(max(0.0, deadline - time.monotonic()))
            self.busy.add(member.index)
            if time.monotonic() < self.serving.get(member.index, 0.0):
                return member
            self.release(member)   # lost, or not renewed in time: not used
            if time.monotonic() >= deadline:
                raise PoolExhausted("no HSM lease renewed in time")
            await asyncio.sleep(0.01)

    def release(self, member: Pooled) -> None:
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


class LeaseKeeper:
    """The node's lease work, every ``lease_seconds / 3``: heartbeat, renew, drop what was lost,
    settle the loads of nodes no longer alive (``settle(alive)``), take HSMs up to this node's
    share of them, give back the rest."""

    def __init__(self, store: LeaseStore, pool: LeasedHsmPool, name: str, lease_seconds: float,
                 sql: Sql, settle: Callable[[list[str]], int]) -> None:
        self.store, self.pool, self.sql, self.settle = store, pool, sql, settle
        self.node, self.lease_seconds = node_id(name), lease_seconds
        self.ttl_ms = int(lease_seconds * 1000)
        self.slots = [m.reader.name for m in pool.members]
        self.alive: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._pending: set[asyncio.Task[None]] = set()

    def fence(self, member: Pooled) -> Fence:   # what the S2 write of its command carries
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
            except Exception:   # the database away for a moment: the leases run out
                log.exception("HSM lease renewal failed at node %s", self.node)

    async def tick(self) -> None:
        started = time.monotonic()
        alive = await self.sql(self.store.heartbeat, self.node, self.ttl_ms * 2 // 3)
        held = await self.sql(self.store.renew, self.node, self.ttl_ms)
        for m in [m for m in self.pool.members if m.index in self.pool.serving]:
            if held.get(self.slots[m.index]) == self.pool.tokens.get(m.index):
                self.pool.serving[m.index] = started + self.lease_seconds * 0.9
            else:
                log.warning("node %s lost the lease of %s", self.node, self.slots[m.index])
                self._later(self.pool.leave(m))
        if not self.alive or set(self.alive) - set(alive):
            await self.sql(self.settle, alive)   # a node went away: settle its loads
        self.alive = alive
        share = math.ceil(len(self.slots) / max(1, len(alive)))
        mine, order = len(self.pool.serving), self._preference()
        for index in order:
            if mine >= share:
                break
            if index in self.pool.tokens:
                continue
            asked = time.monotonic()
            taken = await self.sql(self.store.take, self.slots[index], self.node, self.ttl_ms)
            if taken is None:
                continue
            token, previous = taken
            try:
                await self.pool.join(self.pool.members[index], token,
                                     asked + self.lease_seconds * 0.9)
            except Exception:
                log.exception("node %s took %s but could not open it", self.node,
                              self.slots[index])
                await self.sql(self.store.release, self.slots[index], self.node, token)
                continue
            mine += 1
            if previous is not None:
                await self.sql(self.settle, alive)
        for index in reversed(order):
            if mine <= share:
                break
            if index in self.pool.serving:
                self._later(self._give_back(self.pool.members[index]))
                mine -= 1

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _preference(self) -> list[int]:   # nodes started together ask for different HSMs first
        n, first = len(self.slots), sum(self.node.split("#")[0].encode())
        return [(first + i) % n for i in range(n)]

    async def _give_back(self, member: Pooled) -> None:
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
