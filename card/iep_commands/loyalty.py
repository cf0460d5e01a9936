"""The commands of a loyalty programme's ADF (seed 002 FIG. 16): the purse commands of PBOC's EP,
unchanged, on a purse that counts points.

Each programme is its own application (its own AID, selected by SELECT) holding one EP purse of
points with its own keys, counters, cyclic log and TAC (:mod:`svcard.card.loyalty`). The
handlers are the IEP's own (:mod:`.load`, :mod:`.purchase`, :mod:`.queries`, :mod:`.records`);
this module only narrows what a programme answers:

- INITIALIZE ``80 50``: P1 ``00`` (load) or ``01`` (purchase, i.e. redeem), P2 ``02`` (the EP)
  only; anything else ``6A86``;
- DEBIT ``80 54 01 00`` completes a purchase; any other session kind is spent and ``6985``;
- CREDIT FOR LOAD, GET BALANCE (P2 ``02``), GET TRANSACTION PROVE, GET DATA (UID, 9F77),
  READ RECORD of the log (SFI 18; a programme has no goods files: ``6A82``), READ BINARY of
  EF 0x15 only.

No PIN, no ED passbook, no unload, overdraft, CAPP or secure-messaging writes: those commands
answer ``6D00`` (or ``6E00`` for a class the programme does not know).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

from ...protocols import purse as P
from ...protocols import sw as SW
from ...protocols.apdu import CommandAPDU
from ..runtime import CardError, read_binary_sfi
from . import load, purchase, queries, records

if TYPE_CHECKING:
    from ..iep import Iep


def initialize(iep: Iep, cmd: CommandAPDU) -> bytes:
    """INITIALIZE FOR LOAD or FOR PURCHASE on the programme's purse (P2 ``02``)."""
    if cmd.p2 != P.PURSE_EP:
        raise CardError(SW.WRONG_P1P2)
    if cmd.p1 == P.INIT_LOAD:
        return load.initialize_for_load(iep, cmd)
    if cmd.p1 == P.INIT_PURCHASE:
        return purchase.initialize_for_purchase(iep, cmd)
    raise CardError(SW.WRONG_P1P2)


def debit(iep: Iep, cmd: CommandAPDU) -> bytes:
    """DEBIT FOR PURCHASE: points redeemed; a load session is spent here and refused."""
    if iep.session is not None and iep.session.kind != P.INIT_PURCHASE:
        iep.session = None
        raise CardError(SW.CONDITIONS_NOT_SATISFIED)
    return purchase.debit(iep, cmd)


def read_binary(iep: Iep, cmd: CommandAPDU) -> bytes:
    """READ BINARY by SFI of EF 0x15, the programme's public data (it has no holder data)."""
    return read_binary_sfi(cmd, {P.SFI_PUBLIC_DATA: iep.state.public_data})


ProgrammeCommand: TypeAlias = Callable[["Iep", CommandAPDU], bytes]

COMMANDS: dict[tuple[int, int], ProgrammeCommand] = {
    (P.CLA_PBOC, P.INS_INITIALIZE): initialize,
    (P.CLA_PBOC, P.INS_CREDIT_FOR_LOAD): load.credit_for_load,
    (P.CLA_PBOC, P.INS_DEBIT): debit,
    (P.CLA_PBOC, P.INS_GET_BALANCE): queries.get_balance,
    (P.CLA_PBOC, P.INS_GET_TRANSACTION_PROVE): records.get_transaction_prove,
    (P.CLA_PBOC, P.INS_GET_DATA): purchase.get_data,
    (P.CLA_ISO, P.INS_READ_BINARY): read_binary,
    (P.CLA_ISO, P.INS_READ_RECORD): records.read_record,
}

# the completions an INITIALIZE's session survives into
COMPLETIONS = ((P.CLA_PBOC, P.INS_CREDIT_FOR_LOAD), (P.CLA_PBOC, P.INS_DEBIT))
