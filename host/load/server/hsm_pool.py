"""The load HSMs and the two commands the load server sends them: HSM AUTHORIZE LOAD verifies
a card's S1 and makes S2 (seed steps 897-899, and the zero-value probe's S2); HSM VERIFY LOAD
TAC checks the card's S3 for a load (steps 883-890) or the card's TAC for a probe.

Each HSM is selected once when the server starts; a command runs on whichever HSM is free.
None free in time is 503 with Retry-After.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ....protocols import purse as P
from ....protocols import sw as SW
from ....reader import Reader
from ....reader.virtual import VirtualReader
from ...kit.http import Refused
from ...kit.reader_pool import Pooled, PoolExhausted, ReaderPool, executor
from ...terminal import apdus
from ...terminal.purse import call

if TYPE_CHECKING:
    from .app import LoadServer
    from .leases import Fence

T = TypeVar("T")


class HsmPool(ReaderPool[Pooled]):
    """Load HSMs (any reader spec), each selected once when the server starts."""

    def __init__(self, readers: list[Reader], aid: bytes = P.DEFAULT_HSM_AID) -> None:
        super().__init__([Pooled(i, r, executor(f"hsm{i}")) for i, r in enumerate(readers)])
        self.aid = aid

    def open_member(self, member: Pooled) -> None:
        member.reader.connect()
        call(member.reader, apdus.select(self.aid), "SELECT HSM")

    async def run(self, member: Pooled, fn: Callable[[Reader], T]) -> T:
        """``fn`` on ``member``'s reader, in the member's thread; on the event loop for a
        virtual HSM (an image in this process: its load commands compute a few MACs and
        write nothing, and the hop to a thread and back cost more CPU than the command)."""
        if isinstance(member.reader, VirtualReader):
            return fn(member.reader)
        return await super().run(member, fn)

    async def run_in_time(self, fn: Callable[[Reader], T], timeout: float) -> T:
        """Run ``fn`` on a free HSM; none free in time is 503 with Retry-After."""
        try:
            return await self.run_any(fn, timeout)
        except PoolExhausted as exc:
            raise Refused(503, 503, f"no HSM free ({exc}); retry",
                          {"Retry-After": "1"}) from None


    async def acquire_in_time(self, timeout: float) -> Pooled:
        """A free HSM (give it back with :meth:`release`); none free in time is 503."""
        try:
            return await self.acquire(timeout)
        except PoolExhausted as exc:
            raise Refused(503, 503, f"no HSM free ({exc}); retry",
                          {"Retry-After": "1"}) from None


class LoggedRequest:
    """The parts of the original load request the HSM needs, as the log kept them."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.issuer_id = bytes.fromhex(row["issuer_id"])
        self.card_serial = bytes.fromhex(row["card_serial"])
        self.key_version = int(row["key_version"])
        self.algorithm_id = int(row["algorithm_id"])
        self.txn_type = int(row["txn_type"])


async def authorize_load(server: LoadServer, r: Any, counter: int, balance: int, amount: int,
                         random: bytes, s1: bytes, date: bytes, clock: bytes,
                         what: str) -> tuple[bytes, Fence | None]:
    """HSM AUTHORIZE LOAD for the card of request ``r`` (a load request, or a
    :class:`LoggedRequest`): the HSM verifies S1 and answers S2, with the fence the write
    of that S2 carries (a node's lease of that HSM, leases.py; None on a single server). A
    refusal is :class:`~svcard.host.terminal.purse.Declined`."""
    fields = {"issuer_id": r.issuer_id, "card_serial": r.card_serial[-8:],
              "key_version": r.key_version, "algorithm_id": r.algorithm_id,
              "balance": balance, "amount": amount, "txn_type": r.txn_type,
              "terminal_id": server.config.terminal_id, "online_counter": counter,
              "random": random, "s1": s1, "date": date, "time": clock}
    member = await server.hsms.acquire_in_time(server.config.acquire_timeout)
    try:
        fence = server.fence(member)   # the token this command runs under
        s2 = await server.hsms.run(
            member, lambda hsm: call(hsm, apdus.hsm_authorize_load(fields), what))
    finally:
        server.hsms.release(member)
    return s2, fence


async def verify_tac(server: LoadServer, row: dict[str, Any], balance_after: int, counter: int,
                     amount: int, date_hex: str, time_hex: str, s3: bytes, wrong: str) -> None:
    """The HSM checks a card's load TAC (S3) over these fields; not the card's is 401."""
    fields = {"issuer_id": bytes.fromhex(row["issuer_id"]),
              "card_serial": bytes.fromhex(row["card_serial"])[-8:],
              "balance_after": balance_after, "online_counter": counter, "amount": amount,
              "txn_type": row["txn_type"], "terminal_id": server.config.terminal_id,
              "date": bytes.fromhex(date_hex), "time": bytes.fromhex(time_hex), "s3": s3}
    checked = await server.hsms.run_in_time(
        lambda hsm: hsm.exchange(apdus.hsm_verify_load_tac(fields)),
        server.config.acquire_timeout)
    if checked.sw == SW.MAC_INVALID:
        raise Refused(400, 401, wrong)
    if not checked.ok:
        raise Refused(400, 400, f"the HSM refused S3: {checked.sw:04X}")
