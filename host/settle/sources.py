"""What the audit reads, and only reads: card balances and PSAMs' open batches through their
readers, and the databases, each opened read-only and never created
(:func:`svcard.host.kit.db.open_existing`): the payment, load and bank databases through their
systems' ``records`` modules, the clearing database here."""

from __future__ import annotations

from sqlalchemy import Engine

from ...card.loyalty import POINTS_CURRENCY
from ...protocols import purse as P
from ...protocols import sw as SW
from ...reader import Reader
from ..goods import records as goods_records
from ..kit.db import DatabaseError, must_exist
from ..kit.schema import open_for_reading
from ..load.records import check_bank_db, check_load_db
from ..pay.records import open_payments
from ..terminal import apdus
from ..terminal.purse import call, select_purse
from .db import SCHEMA, batches, ledger, records, uncleared

CLEARING_DB = "clearing database"
CLEARING_TABLES = (records.name, uncleared.name, batches.name, ledger.name)


def check_sources(*, payment_dbs: tuple[str, ...] = (), load_dbs: tuple[str, ...] = (),
                  bank_dbs: tuple[str, ...] = (), clearing_db: str | None = None) -> None:
    """Refuse (:class:`~svcard.host.kit.db.DatabaseError`, naming it) the first database that
    does not exist or is not of its kind; reads no row, creates nothing."""
    for url in payment_dbs:
        open_payments(url).dispose()
    for url in load_dbs:
        check_load_db(url)
    for url in bank_dbs:
        check_bank_db(url)
    if clearing_db:
        open_for_reading(clearing_db, CLEARING_TABLES, CLEARING_DB, SCHEMA).dispose()


def purse_debits(goods_dbs: tuple[str, ...]) -> dict[tuple[str, int], tuple[int, str]]:
    """The purse debits the goods payment server proved (seed 000: each composite purchase,
    type 09, whose card MAC2 matched: the session ``committed``), as the card payments' proven
    purchases: (8-byte card serial, card counter) -> (amount, full serial). Clearing's record of
    one has the same key; the other goods parties' databases give none. The audit counts them
    when it reads the purse's money (cards, clearing, payments or loads); the goods databases
    alone are the goods books (:mod:`.goods_books`)."""
    out: dict[tuple[str, int], tuple[int, str]] = {}
    for url in goods_dbs:
        role, tables = goods_records.books(url)
        if role != "payment":
            continue
        orders = {r["order_ref"]: r for r in tables.get("goods_payment_orders", [])}
        for session in tables.get("goods_purse_sessions", []):
            order = orders.get(session["order_ref"])
            if session["state"] == "committed" and order is not None:
                serial = str(session["card"]).lower()
                out[(serial[-16:], int(session["counter"]))] = (int(order["amount"]), serial)
    return out


def clearing_engine(url: str) -> Engine | None:
    """The clearing database, read-only; None when its SQLite file does not exist yet (no
    clearing run so far: nothing cleared). The command line refuses a missing one first
    (:func:`check_sources`): there it is a mistyped path."""
    try:
        must_exist(url, CLEARING_DB)
    except DatabaseError:
        return None
    return open_for_reading(url, CLEARING_TABLES, CLEARING_DB, SCHEMA)


def card_balances(readers: list[Reader], aid: bytes = P.DEFAULT_IEP_AID) -> dict[str, int]:
    """Card serial (lower-case hex) -> EP balance of the purse at ``aid``, read through each
    reader."""
    out = {}
    for reader in readers:
        info = select_purse(reader, aid)
        out[info.app_serial.lower()] = int.from_bytes(
            call(reader, apdus.get_balance(P.PURSE_EP), "GET BALANCE"), "big")
    return out


def states_points(readers: list[Reader], aid: bytes = P.DEFAULT_IEP_AID) -> bool:
    """True when every card's application at ``aid`` states currency 999 ("no currency"): a
    loyalty programme, whose figures are points. A mix of points and money is an error."""
    codes = {select_purse(reader, aid).currency_code for reader in readers}
    if POINTS_CURRENCY in codes and len(codes) > 1:
        raise ValueError("the cards mix a loyalty programme (points) with money at one AID")
    return codes == {POINTS_CURRENCY}


def psam_open_batches(readers: list[Reader],
                      psam_aid: bytes = P.DEFAULT_PSAM_AID) -> dict[str, set[int]]:
    """PSAM serial (upper-case hex) -> the terminal transaction numbers of its open batch (the
    records not yet closed and handed to clearing), read through each reader."""
    out: dict[str, set[int]] = {}
    for reader in readers:
        call(reader, apdus.select(psam_aid), "SELECT PSAM")
        serial = call(reader, apdus.read_binary(P.SFI_PUBLIC_DATA, 10), "READ PSAM SERIAL")
        ttns: set[int] = set()
        for index in range(_MAX_OPEN_RECORDS):
            answer = reader.exchange(apdus.read_batch_record(0, index))
            if answer.sw == SW.RECORD_NOT_FOUND:
                break
            if not answer.ok:
                raise ValueError(f"PSAM {serial.hex().upper()}: READ BATCH RECORD {index} "
                                 f"answered {answer.sw:04X}")
            ttns.add(P.PsamRecord.parse(answer.data).terminal_txn_number)
        out[serial.hex().upper()] = ttns
    return out


_MAX_OPEN_RECORDS = 1_000_000
