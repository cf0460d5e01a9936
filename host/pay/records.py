"""What other systems may read of card payment: the payment server's database, read only.

Settlement's audit (:mod:`svcard.host.settle.audit`) reads every payment to find the proven
purchases and where each one's PSAM record went. This module is that read interface: nothing
here writes a row, and nothing is created: the database must exist and hold the payment
server's tables (:func:`svcard.host.kit.db.open_existing`: SQLite opened read-only), else a
:class:`~svcard.host.kit.db.DatabaseError` names it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, select

from ..kit.schema import open_for_reading
from .server.db import SCHEMA
from .server.db import payments as payments_table

WHAT = "payment server database"


def open_payments(url: str) -> Engine:
    """A read-only engine on the payment server's database at ``url`` (which must exist; a
    newer schema than this svcard's is refused: :class:`~svcard.host.kit.schema.SchemaError`)."""
    return open_for_reading(url, (payments_table.name,), WHAT, SCHEMA)


def payments(url: str) -> Iterator[dict[str, Any]]:
    """Every payment in the payment server's database at ``url``, as column name -> value
    (the columns of :data:`svcard.host.pay.server.db.payments`: ``merchant_id``, ``txn_id``,
    ``state``, ``amount``, ``card_serial``, ``card_counter``, ``tac``, ``psam_id``, ``ttn``,
    ``batch``, ``batch_number``, ``created``, ``updated``...), in the database's own order.
    The database is opened at once (a missing one is refused here); the rows are read as the
    caller iterates, on one connection held until the end."""
    return _rows(open_payments(url))


def _rows(engine: Engine) -> Iterator[dict[str, Any]]:
    try:
        with engine.connect() as conn:
            for row in conn.execute(select(payments_table)):
                yield dict(row._mapping)
    finally:
        engine.dispose()
