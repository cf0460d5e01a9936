"""HSM leases: several load-server processes (nodes) on one database, each load HSM used by one
node at a time (issue 16, point 4 for loads; docs/deploy-nodes.md, "Load nodes").

The lease logic is :mod:`svcard.host.kit.leases` (as for the payment nodes' PSAMs); here are
the load database's tables (schema stamp ``hsm_leases``): ``hsm_leases`` (per HSM slot, i.e.
its reader spec), ``hsm_lease_history`` (the audit of "one node at a time") and ``load_nodes``
(heartbeats). The write that issues an HSM's S2 (a load's, a probe's) carries a :class:`Fence`
and is refused in the same statement once the token is stale (:data:`FENCE`): a node that lost
its lease while its HSM worked hands out no S2, so no card is credited by it.
"""

from __future__ import annotations

from sqlalchemy import Engine

from ...kit import leases as K
from ...kit.db import now_ms  # here too: the clock tests set it
from ...kit.leases import Fence, Sql, db_now, node_id
from ...kit.reader_pool import Pooled
from .hsm_pool import HsmPool

__all__ = [
    "FENCE",
    "SCHEMA",
    "TABLES",
    "Fence",
    "LeaseKeeper",
    "LeaseStore",
    "LeasedHsmPool",
    "Sql",
    "db_now",
    "hsm_leases",
    "lease_history",
    "lease_metadata",
    "load_nodes",
    "node_id",
    "now_ms",
]

TABLES = K.lease_tables("hsm_leases", "hsm_lease_history", "load_nodes",
                        "uq_hsm_lease_slot_token")
lease_metadata = TABLES.metadata
hsm_leases, lease_history, load_nodes = TABLES.leases, TABLES.history, TABLES.nodes
SCHEMA = TABLES.schema
FENCE = TABLES.fence


class LeaseStore(K.LeaseStore):
    """The lease statements on the load database's tables."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine, TABLES)


class LeasedHsmPool(K.LeasedPool[Pooled], HsmPool):
    """Only the HSMs this node leases."""

    kind = "HSM"


class LeaseKeeper(K.LeaseKeeper):
    """The node's HSM lease work; ``settle(living)`` settles the loads of nodes gone."""

    pool: LeasedHsmPool
