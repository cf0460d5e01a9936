"""The local terminal's two ED maintenance flows with the issuer's load HSM, each top to bottom:
an unload (the ED's value back to the account) and an overdraft-limit update.

Both run card <-> HSM as a load does: the card's MAC1 to the HSM, the HSM's MAC2 to the card,
and the card's proof (an unload's MAC3, an update's TAC) checked by the HSM. Byte layouts:
``protocols/purse.py``; the commands: docs/protocol.md.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from ...protocols import purse as P
from ...reader.base import Reader
from . import apdus
from .money import Amount
from .purse import Receipt, TerminalCheckFailed, call, held, select_purse, verify_pin_if_needed


@dataclass(frozen=True, kw_only=True)
class UnloadReceipt(Receipt):
    online_counter: int
    mac1: str
    mac2: str
    mac3: str

    def text(self) -> str:
        return (f"ED unload of {self.money(self.amount)} done\n{self.balance_line()}\n"
                f"  terminal {self.terminal_id}, online counter {self.online_counter}\n"
                f"  MAC1 {self.mac1}  MAC2 {self.mac2}  MAC3 {self.mac3}")


@held
def unload(card: Reader, hsm: Reader, amount: int | Amount, *, terminal_id: bytes,
           pin: str | None, key_index: int = 1, when: dt.datetime | None = None,
           card_aid: bytes = P.DEFAULT_IEP_AID,
           hsm_aid: bytes = P.DEFAULT_HSM_AID) -> UnloadReceipt:
    """Unload ``amount`` from the ED: MAC1 from the card, MAC2 from the HSM, MAC3 checked."""
    if len(terminal_id) != 6:
        raise TerminalCheckFailed("a terminal id has 6 bytes")
    when = when or dt.datetime.now()
    date, time = P.bcd_date(when.date()), P.bcd_time(when)
    # 1. Read the card, open the HSM, open the ED with the PIN.
    info = select_purse(card, card_aid)
    minor = info.minor_units(amount)
    info.check_dates(when.date())
    call(hsm, apdus.select(hsm_aid), "SELECT HSM")
    verify_pin_if_needed(card, P.PURSE_ED, pin)
    # 2. INITIALIZE FOR UNLOAD: balance, online counter, random and MAC1.
    init = P.InitForUnloadAnswer.parse(call(card, apdus.initialize(
        P.INIT_UNLOAD, P.PURSE_ED, key_index, minor, terminal_id), "INITIALIZE FOR UNLOAD"))
    fields = {"issuer_id": bytes.fromhex(info.issuer_id), "card_serial": info.serial_bytes[-8:],
              "key_version": init.key_version, "algorithm_id": init.algorithm_id,
              "balance": init.balance, "amount": minor, "terminal_id": terminal_id,
              "online_counter": init.online_counter, "random": init.random, "date": date,
              "time": time}
    # 3. The HSM checks MAC1 and answers MAC2.
    mac2 = call(hsm, apdus.hsm_unload({**fields, "mac": init.mac1}), "HSM AUTHORIZE UNLOAD")
    # 4. DEBIT FOR UNLOAD: the card checks MAC2, debits the ED, answers MAC3.
    mac3 = call(card, apdus.debit_for_unload(date, time, mac2), "DEBIT FOR UNLOAD")
    # 5. The HSM checks MAC3: the card really debited this amount.
    call(hsm, apdus.hsm_unload({**fields, "mac": mac3}, verify=True), "HSM VERIFY UNLOAD MAC3")
    return UnloadReceipt(
        card_serial=info.app_serial, issuer_id=info.issuer_id, purse="ED",
        txn_type=P.TYPE_UNLOAD, amount=minor, balance_before=init.balance,
        balance_after=init.balance - minor, online_counter=init.online_counter,
        terminal_id=terminal_id.hex().upper(), date=date.hex(), time=time.hex(),
        mac1=init.mac1.hex().upper(), mac2=mac2.hex().upper(), mac3=mac3.hex().upper(),
        currency_code=info.currency_code, currency_exponent=info.currency_exponent)


@dataclass(frozen=True, kw_only=True)
class OverdraftReceipt(Receipt):
    online_counter: int
    limit_before: int
    limit_after: int
    mac1: str
    mac2: str
    tac: str

    def text(self) -> str:
        return (f"ED overdraft limit {self.money(self.limit_before)} -> "
                f"{self.money(self.limit_after)} set\n{self.balance_line()}\n"
                f"  terminal {self.terminal_id}, online counter {self.online_counter}\n"
                f"  MAC1 {self.mac1}  MAC2 {self.mac2}  TAC {self.tac}")


@held
def update_overdraft(card: Reader, hsm: Reader, limit: int | Amount, *, terminal_id: bytes,
                     pin: str | None, key_index: int = 1, when: dt.datetime | None = None,
                     card_aid: bytes = P.DEFAULT_IEP_AID,
                     hsm_aid: bytes = P.DEFAULT_HSM_AID) -> OverdraftReceipt:
    """Set the ED's overdraft limit: MAC1 from the card, MAC2 from the HSM, TAC checked. The
    ED balance moves by the change of limit."""
    if len(terminal_id) != 6:
        raise TerminalCheckFailed("a terminal id has 6 bytes")
    when = when or dt.datetime.now()
    date, time = P.bcd_date(when.date()), P.bcd_time(when)
    # 1. Read the card, open the HSM, open the ED with the PIN.
    info = select_purse(card, card_aid)
    new_limit = info.minor_units(limit)
    if new_limit > P.MAX_OVERDRAFT_LIMIT:
        raise TerminalCheckFailed(f"an overdraft limit is at most "
                                  f"{info.money(P.MAX_OVERDRAFT_LIMIT)} (3 bytes)")
    info.check_dates(when.date())
    call(hsm, apdus.select(hsm_aid), "SELECT HSM")
    verify_pin_if_needed(card, P.PURSE_ED, pin)
    # 2. INITIALIZE FOR UPDATE: balance, online counter, current limit, random and MAC1.
    init = P.InitForUpdateAnswer.parse(call(
        card, apdus.initialize_for_update(key_index, terminal_id), "INITIALIZE FOR UPDATE"))
    balance_after = init.balance + new_limit - init.overdraft_limit
    if balance_after < 0:
        raise TerminalCheckFailed(
            f"the ED balance {info.money(init.balance)} does not cover lowering the limit "
            f"from {info.money(init.overdraft_limit)} to {info.money(new_limit)}")
    fields = {"issuer_id": bytes.fromhex(info.issuer_id), "card_serial": info.serial_bytes[-8:],
              "key_version": init.key_version, "algorithm_id": init.algorithm_id,
              "balance": init.balance, "old_limit": init.overdraft_limit,
              "new_limit": new_limit, "terminal_id": terminal_id,
              "online_counter": init.online_counter, "random": init.random, "date": date,
              "time": time}
    # 3. The HSM checks MAC1 and answers MAC2 for the new limit.
    mac2 = call(hsm, apdus.hsm_update({**fields, "mac": init.mac1}), "HSM AUTHORIZE UPDATE")
    # 4. UPDATE OVERDRAFT LIMIT: the card checks MAC2, sets the limit, answers its TAC.
    tac = call(card, apdus.update_overdraft_limit(new_limit, date, time, mac2),
               "UPDATE OVERDRAFT LIMIT")
    # 5. The HSM checks the TAC.
    call(hsm, apdus.hsm_update({**fields, "mac": tac}, verify=True), "HSM VERIFY UPDATE TAC")
    return OverdraftReceipt(
        card_serial=info.app_serial, issuer_id=info.issuer_id, purse="ED",
        txn_type=P.TYPE_OVERDRAFT_UPDATE, amount=0, balance_before=init.balance,
        balance_after=balance_after, online_counter=init.online_counter,
        limit_before=init.overdraft_limit, limit_after=new_limit,
        terminal_id=terminal_id.hex().upper(), date=date.hex(), time=time.hex(),
        mac1=init.mac1.hex().upper(), mac2=mac2.hex().upper(), tac=tac.hex().upper(),
        currency_code=info.currency_code, currency_exponent=info.currency_exponent)
