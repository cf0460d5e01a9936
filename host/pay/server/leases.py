"""PSAM leases: several payment-server processes (nodes) on one database, each PSAM served by
one node at a time (issue 16, point 4; docs/deploy-nodes.md tells the whole design).

The lease logic is :mod:`svcard.host.kit.leases`; here are the payment database's tables:
``psam_leases`` (per PSAM slot: holder, expiry in ms on the database's clock, a fencing token
that only grows), ``psam_lease_history`` (the audit of "one node at a time") and ``pay_nodes``
(heartbeats). Every write for a PSAM's transaction carries :class:`Fence`, refused in the same
statement once the token is stale (:data:`FENCE`). :class:`LeasedPsamPool` holds only the
PSAMs this node leases; :class:`LeaseKeeper` renews, takes and gives them back and settles the
draws of nodes unseen for a whole lease.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from ....reader import Reader
from ...kit import leases as K
from ...kit.db import now_ms  # here too: the clock tests set it
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
]

TABLES = K.lease_tables("psam_leases", "psam_lease_history", "pay_nodes",
                        "uq_lease_slot_token")
lease_metadata = TABLES.metadata
psam_leases, lease_history, pay_nodes = TABLES.leases, TABLES.history, TABLES.nodes
SCHEMA = TABLES.schema
FENCE = TABLES.fence


class LeaseStore(K.LeaseStore):
    """The lease statements on the payment database's tables."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine, TABLES)


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

    def fence(self, member: PooledPsam) -> Fence:  # what a write for its transaction carries
        return super().fence(member)
