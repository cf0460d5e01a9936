"""What other systems may read of loading: the load server's and the banks' databases, read
only.

Settlement reads them: clearing moves the funds of every ``loaded`` load into the issuer's float
(:mod:`svcard.host.settle.clearing`), and the audit matches the load server's decisions with
the banks' debits and refunds (:mod:`svcard.host.settle.audit`). This module is that read
interface: nothing here writes a row. Opening a database does what its server's own opening does
(tables created if missing; a bank's PostgreSQL ``secret_hash`` column widened if it is old).
"""

from __future__ import annotations

from typing import Any

from .bank.db import BankDb
from .bank.db import make_engine as make_bank_engine
from .server.db import LoadDb
from .server.db import make_engine as make_load_engine


def loads(url: str, state: str | None = None) -> list[dict[str, Any]]:
    """The loads in the load server's database at ``url``, oldest first (by row id), each as
    column name -> value (the columns of :data:`svcard.host.load.server.db.loads`: ``bank_id``,
    ``txn_id``, ``issuer_id``, ``card_serial``, ``online_counter``, ``amount``, ``state``,
    ``evidence``, ``created``...); only those in ``state`` when it is given."""
    return LoadDb(make_load_engine(url)).rows(state)


def bank_loads(url: str) -> list[dict[str, Any]]:
    """The loads in the bank database at ``url``, in creation order, each as column name ->
    value (the columns of :data:`svcard.host.load.bank.db.bank_loads`: ``txn_id``, ``amount``,
    ``state`` (``debited``, ``confirmed`` or ``refunded``)...)."""
    return BankDb(make_bank_engine(url)).loads()
