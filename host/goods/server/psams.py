"""The goods payment server's PSAMs, for goods the purse pays (docs/goods.md, "The purse
pays"): a pool of PSAM readers (``host/kit/reader_pool.py``), all of one terminal id, each
asked for INIT SAM FOR PURCHASE in its early-release form (``80 70 01 00``: MAC1 and the MAC2
the card must answer; the PSAM records the purchase, type 09, at once).

The PSAMs are this server's own, not the seed-002 payment server's: that server's draw is a
purchase of type 06 sealed for a client terminal, and a composite purchase needs its MAC1 for
type 09 and a cache record MAC'd for the same card session in the same answer, so the goods
payment server holds its PSAMs and the layers stay as they are (host/goods imports host/kit
and host/terminal only).

Their records go to clearing the seed-002 way: ``POST /v1/batches/close``, signed with the
payment party's own key (``svcard goods close-batch``), closes each PSAM's batch
(:mod:`.psam_batches`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass, field

from ....protocols import purse as P
from ....reader import Reader
from ...kit.reader_pool import Pooled, PoolError, ReaderPool, executor
from ...terminal import apdus
from ...terminal.purse import call


@dataclass
class GoodsPsam(Pooled):
    serial: str = ""
    terminal_id: bytes = b""
    currency: int | None = None


@dataclass(frozen=True)
class SamAnswer:
    psam: str            # the PSAM's serial
    ttn: int
    mac1: bytes
    expected_mac2: bytes = field(repr=False)
    date: bytes
    time: bytes


class GoodsPsamPool(ReaderPool[GoodsPsam]):
    def __init__(self, readers: list[Reader]) -> None:
        super().__init__([GoodsPsam(i, r, executor(f"goods-psam{i}"))
                          for i, r in enumerate(readers)])
        self.close_lock = asyncio.Lock()   # one batch close at a time

    def open_member(self, member: GoodsPsam) -> None:
        member.reader.connect()
        fci = P.Fci.parse(call(member.reader, apdus.select(P.DEFAULT_PSAM_AID), "SELECT PSAM"))
        member.currency = fci.currency_code
        if member.currency is None:
            member.currency = P.PsamCurrency.parse(call(
                member.reader, apdus.read_binary(P.SFI_PSAM_CURRENCY, 3),
                "READ PSAM CURRENCY")).currency_code
        member.serial = call(member.reader, apdus.read_binary(P.SFI_PUBLIC_DATA, 10),
                             "READ PSAM SERIAL").hex().upper()
        member.terminal_id = call(member.reader, apdus.read_binary(P.SFI_PSAM_TERMINAL_ID, 6),
                                  "READ TERMINAL ID")

    async def start(self, currency: int | None = None) -> None:
        """Open every PSAM: one terminal id, and ``currency`` (the system's) if given."""
        await super().start()
        ids = {m.terminal_id for m in self.members}
        if len(ids) != 1:
            raise PoolError("the goods payment server's PSAMs differ in terminal id: "
                            + ", ".join(sorted(i.hex().upper() for i in ids)))
        wrong = [m.serial for m in self.members if currency is not None
                 and m.currency != currency]
        if wrong:
            raise PoolError(f"PSAM {wrong[0]} is not of the goods system's currency {currency}")

    @property
    def terminal_id(self) -> bytes:
        return self.members[0].terminal_id


def init_sam(reader: Reader, *, random: bytes, counter: int, amount: int, key_version: int,
             algorithm: int, serial: bytes, uid: bytes, when: dt.datetime) -> SamAnswer:
    """INIT SAM FOR PURCHASE (early release) for a composite purchase (type 09)."""
    date, time = P.bcd_date(when.date()), P.bcd_time(when)
    call(reader, apdus.select(P.DEFAULT_PSAM_AID), "SELECT PSAM")
    answer = P.InitSamAnswerEarly.parse(call(reader, apdus.init_sam_for_purchase({
        "random": random, "offline_counter": counter, "amount": amount,
        "txn_type": P.TYPE_COMPOSITE_PURCHASE, "date": date, "time": time,
        "key_version": key_version, "algorithm_id": algorithm, "card_serial": serial[-8:]},
        early=True, uid=uid), "INIT SAM FOR PURCHASE"))
    return SamAnswer("", answer.terminal_txn_number, answer.mac1, answer.expected_mac2, date,
                     time)
