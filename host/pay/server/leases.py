"""PSAM leases: several payment-server processes (nodes) on one database, each PSAM served by
one node at a time (issue 16, point 4; docs/deploy-nodes.md tells the whole design).

The lease logic is :mod:`svcard.host.kit.leases`; here are the payment database's tables:
``psam_leases`` (per PSAM slot: holder, expiry in ms on the database's clock, a fencing token
that only grows), ``psam_lease_history`` (the audit of "one node at a time") and ``pay_nodes``
(heartbeats). Every write for a PSAM's transaction carries :class:`Fence`, refused in the same
statement once the token is stale (:data:`FENCE`). :class:`LeasedPsamPool` holds only the
PSAMs this node leases; :class:`LeaseKeeper` renews, takes and gives them back and settles the
draws of nodes unseen for a whole lease.

Two images of one PSAM (one serial) in two slots would write batches of one name and reuse
TTNs: ``psam_serials`` binds each serial to the first slot that opened it (a unique key, so
two nodes opening the two images at once cannot both win), and a PSAM whose serial is bound
to another slot is refused before it serves (its lease given back, one log line, never taken
again by that node).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, Engine, String, Table, insert, select, update
from sqlalchemy.exc import IntegrityError

from ....reader import Reader
from ...kit import leases as K
from ...kit.db import now_ms, step  # now_ms here too: the clock tests set it
from ...kit.leases import Fence, Sql, db_now, node_id
from .psam_pool import PooledPsam, PsamPool

__all__ = [
    "FENCE",
    "SCHEMA",
    "TABLES",
    "Fence",
    "LeaseKeeper",
    "LeaseStore",
    "LeasedPsamPool",
    "Sql",
    "db_now",
    "lease_history",
    "lease_metadata",
    "node_id",
    "now_ms",
    "pay_nodes",
    "psam_leases",
    "psam_serials",
]

TABLES = K.lease_tables("psam_leases", "psam_lease_history", "pay_nodes",
                        "uq_lease_slot_token")
lease_metadata = TABLES.metadata
psam_leases, lease_history, pay_nodes = TABLES.leases, TABLES.history, TABLES.nodes
SCHEMA = TABLES.schema
FENCE = TABLES.fence
# which slot each PSAM serial was first opened in (created with the lease tables)
psam_serials = Table(
    "psam_serials", lease_metadata,
    Column("slot", String(300), primary_key=True),
    Column("psam_id", String(40), nullable=False, unique=True),
)


class SerialClash(ValueError):
    """A PSAM whose serial another slot holds: two images of one PSAM."""


class LeaseStore(K.LeaseStore):
    """The lease statements on the payment database's tables."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine, TABLES)

    def claim_serial(self, slot: str, psam_id: str) -> str | None:
        """Bind ``psam_id`` to ``slot`` (one step): None if it is now ``slot``'s, else the
        other slot that has it (also when both were bound at the same moment)."""
        other = select(psam_serials.c.slot).where(psam_serials.c.psam_id == psam_id,
                                                  psam_serials.c.slot != slot)
        try:
            with step(self.engine) as conn:
                if (found := conn.execute(other).first()) is not None:
                    return str(found[0])
                if not conn.execute(update(psam_serials).where(
                        psam_serials.c.slot == slot).values(psam_id=psam_id)).rowcount:
                    conn.execute(insert(psam_serials).values(slot=slot, psam_id=psam_id))
        except IntegrityError:   # the other slot's bind came first
            with step(self.engine) as conn:
                found = conn.execute(other).first()
            return str(found[0]) if found is not None else "another slot"
        return None


class LeasedPsamPool(K.LeasedPool[PooledPsam], PsamPool):
    """A pool of only the PSAMs this node leases (all of one terminal id)."""

    kind = "PSAM"

    def __init__(self, readers: list[Reader], **kwargs: Any) -> None:
        super().__init__(readers, **kwargs)
        self._terminal_id = b""

    @property
    def psams(self) -> list[PooledPsam]:
        return [m for m in self.members if m.index in self.serving]

    @property
    def terminal_id(self) -> bytes:   # the terminal of the PSAMs it served (one for all)
        return self._terminal_id

    def joined(self, member: PooledPsam) -> None:
        if self._terminal_id and member.terminal_id != self._terminal_id:
            raise ValueError(f"PSAM {member.reader.name} answers another terminal id")
        self._terminal_id = member.terminal_id


class LeaseKeeper(K.LeaseKeeper):
    """The node's PSAM lease work; ``settle(living)`` voids the draws of nodes gone."""

    pool: LeasedPsamPool
    store: LeaseStore

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clashed: set[int] = set()   # slots refused for a serial another slot holds

    def fence(self, member: PooledPsam) -> Fence:  # what a write for its transaction carries
        return super().fence(member)

    async def admit(self, member: PooledPsam) -> None:
        """Refuse a PSAM whose serial another slot holds (batch names and TTNs collide)."""
        slot, serial = self.slots[member.index], member.psam_id.hex().upper()
        other = await self.sql(self.store.claim_serial, slot, serial)
        if other is not None:
            self.clashed.add(member.index)
            raise SerialClash(f"PSAM {slot} has the serial {serial} of the PSAM in {other}: "
                              "two images of one PSAM would collide on batch names and TTNs; "
                              "not served")

    def _preference(self) -> list[int]:   # a refused slot is not taken again
        return [i for i in super()._preference() if i not in self.clashed]
