"""The IEP's read-only answers about the purse: GET BALANCE, GET DATA (the balance limit) and
READ BINARY of the application's files (EF 0x15 public data, EF 0x16 holder data).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...protocols import purse as P
from ...protocols import sw as SW
from ...protocols.apdu import CommandAPDU
from ..runtime import CardError, read_binary_sfi

if TYPE_CHECKING:
    from ..iep import Iep


def get_balance(iep: Iep, cmd: CommandAPDU) -> bytes:
    """GET BALANCE ``80 5C 00 P2 04``: the balance of the purse P2 names (the ED after VERIFY)."""
    if cmd.p1 != 0:
        raise CardError(SW.WRONG_P1P2)
    if cmd.data:
        raise CardError(SW.WRONG_LENGTH)
    if cmd.le is not None and cmd.le not in (4, 256):
        raise CardError(0x6C04)
    return iep.purse_for(cmd.p2).balance.to_bytes(4, "big")


def get_data(iep: Iep, cmd: CommandAPDU) -> bytes:
    """GET DATA ``80 CA 9F 77``: the purse's balance limit as TLV ``9F77 04 limit``, so a
    bank can work out the largest load (seed step 872) before the card is asked for S1."""
    if (cmd.p1 << 8) | cmd.p2 != P.TAG_BALANCE_LIMIT:
        raise CardError(SW.DATA_NOT_FOUND)
    if cmd.data:
        raise CardError(SW.WRONG_LENGTH)
    value = iep.state.balance_limit.to_bytes(4, "big")
    return P.TAG_BALANCE_LIMIT.to_bytes(2, "big") + bytes([len(value)]) + value


def read_binary(iep: Iep, cmd: CommandAPDU) -> bytes:
    """READ BINARY by SFI of EF 0x15 (public data) or EF 0x16 (holder data)."""
    return read_binary_sfi(cmd, {P.SFI_PUBLIC_DATA: iep.state.public_data,
                                 P.SFI_HOLDER_DATA: iep.state.holder_data})
