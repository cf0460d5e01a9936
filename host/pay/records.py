"""What other systems may read of card payment: the payment server's database, read only.

Settlement's audit (:mod:`svcard.host.settle.audit`) reads every payment to find the proven
purchases and where each one's PSAM record went. This module is that read interface: nothing
here writes a row. Opening a database creates its tables if missing, as the payment server's
own opening does (:func:`svcard.host.pay.server.db.make_engine`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import select

from .server.db import make_engine
from .server.db import payments as payments_table


def payments(url: str) -> Iterator[dict[str, Any]]:
    """Every payment in the payment server's database at ``url``, as column name -> value
    (the columns of :data:`svcard.host.pay.server.db.payments`: ``merchant_id``, ``txn_id``,
    ``state``, ``amount``, ``card_serial``, ``card_counter``, ``tac``, ``psam_id``, ``ttn``,
    ``batch``, ``batch_number``, ``created``, ``updated``...), in the database's own order.
    The rows are read as the caller iterates, on one connection held until the end."""
    with make_engine(url).connect() as conn:
        for row in conn.execute(select(payments_table)):
            yield dict(row._mapping)
