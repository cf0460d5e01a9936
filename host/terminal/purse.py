"""The local terminal of seed FIG. 2: a card slot and a security slot (PSAM or load HSM).

Each flow reads top to bottom as the APDU exchange it makes. A status word other than 9000
stops the flow with :class:`Declined`, naming the step; a terminal-side check (expiry, currency,
a malformed answer) stops it with :class:`TerminalCheckFailed`. No money moves in either case
unless the card itself accepted a MAC."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

from ...protocols import purse as P
from ...protocols import sw as SW
from ...reader import Reader
from . import apdus
from .money import Amount, format_money
from .money import format_amount as format_amount  # re-exported for the callers of purse


class TerminalError(Exception):
    """A transaction that did not complete."""


class Declined(TerminalError):
    """A chip answered a status word other than 9000."""
    def __init__(self, step: str, sw: int, message: str | None = None) -> None:
        super().__init__(message or f"{step}: {sw:04X} ({SW.meaning(sw)})")
        self.step = step
        self.sw = sw


class TerminalCheckFailed(TerminalError):
    """The terminal refused before any value moved (expired card, wrong currency, ...)."""


_Args = ParamSpec("_Args")
_Result = TypeVar("_Result")


def held(flow: Callable[Concatenate[Reader, Reader, _Args], _Result]
         ) -> Callable[Concatenate[Reader, Reader, _Args], _Result]:
    """Run a value flow with card and security module each held by :meth:`Reader.transaction`:
    over PC/SC no other program's command comes between SELECT and the last DEBIT or CREDIT."""
    @functools.wraps(flow)
    def run(card: Reader, module: Reader, /, *args: _Args.args,
            **kwargs: _Args.kwargs) -> _Result:
        with card.transaction(), module.transaction():
            return flow(card, module, *args, **kwargs)
    return run


def call(reader: Reader, apdu: bytes, step: str) -> bytes:
    answer = reader.exchange(apdu)
    if not answer.ok:
        raise Declined(step, answer.sw)
    return answer.data


@dataclass(frozen=True)
class CardInfo:
    aid: str
    label: str
    issuer_id: str
    app_serial: str
    app_type: int
    start_date: str
    expiry_date: str
    currency_code: int | None
    currency_exponent: int | None

    @property
    def serial_bytes(self) -> bytes:
        return bytes.fromhex(self.app_serial)

    def minor_units(self, amount: int | Amount) -> int:
        """An amount as typed, in this card's minor units (its currency's exponent)."""
        if isinstance(amount, int):
            return amount
        return amount.minor_units(self.currency_exponent, self.currency_code)

    def money(self, minor: int) -> str:
        """``CNY 12.34``: minor units in this card's currency."""
        return format_money(minor, self.currency_code, self.currency_exponent)

    def known_currency(self, purpose: str) -> int:
        """The card's currency code; a card that states none (no FCI, or none in it) cannot
        ``purpose`` (a payment or load needing it): :class:`TerminalCheckFailed`."""
        if self.currency_code is None:
            raise TerminalCheckFailed(f"the card states no currency (no 5F2A in its SELECT "
                                      f"answer), so it cannot {purpose}: declined")
        return self.currency_code

    def check_dates(self, today: dt.date) -> None:
        start = P.parse_bcd_date(bytes.fromhex(self.start_date))
        expiry = P.parse_bcd_date(bytes.fromhex(self.expiry_date))
        if today < start:
            raise TerminalCheckFailed(f"card not valid before {start.isoformat()}")
        if today > expiry:
            raise TerminalCheckFailed(f"card expired on {expiry.isoformat()}")


class NoPurse(Declined):
    """The card has no application at the AID the terminal selects."""

    def __init__(self, aid: bytes, sw: int) -> None:
        super().__init__(f"SELECT purse {aid.hex().upper()}", sw,
                         f"no purse application {aid.hex().upper()} on this card (SELECT "
                         f"answered {sw:04X}: {SW.meaning(sw)}); a purse at another AID is "
                         f"selected with --aid")
        self.aid = aid


def card_uid(card: Reader) -> bytes:
    """The card's 9-byte UID (GET DATA ``00 00``), which a UID-in-MAC1 MAC scheme (e.g.
    ``changsha-metro``) has the PSAM put into MAC1; empty for a card without one."""
    answer = card.exchange(apdus.get_uid())
    return answer.data if answer.ok and len(answer.data) == 9 else b""


def select_purse(card: Reader, aid: bytes = P.DEFAULT_IEP_AID) -> CardInfo:
    """SELECT the purse application at ``aid`` and take its public data (EF 0x15): from the
    copy in the FCI's issuer discretionary data when the card gives one, else by READ BINARY.
    A bare 9000 (no FCI, as some purses and GlobalPlatform applets answer) is read the same way,
    with no label and the currency unknown (None). A card without that application (6A82)
    raises :class:`NoPurse`; a malformed FCI or EF 0x15 is :class:`TerminalCheckFailed`."""
    step = f"SELECT purse {aid.hex().upper()}"
    answer = card.exchange(apdus.select(aid))
    if answer.sw == SW.FILE_NOT_FOUND:
        raise NoPurse(aid, answer.sw)
    if not answer.ok:
        raise Declined(step, answer.sw)
    what = "FCI"
    try:   # TLVError, a currency code that is not BCD, or EF 0x15 of the wrong size
        fci = P.Fci.parse(answer.data) if answer.data else P.Fci(df_name=aid)
        raw = fci.issuer_discretionary
        if len(raw) != 30:
            what = "public data (EF 0x15)"
            raw = call(card, apdus.read_binary(P.SFI_PUBLIC_DATA, 30), "READ BINARY EF15")
        public = P.PublicAppData.parse(raw)
    except ValueError as exc:
        raise TerminalCheckFailed(f"{step}: the card's {what} is malformed ({exc})") from None
    return CardInfo(
        aid=fci.df_name.hex().upper(), label=fci.label, issuer_id=public.issuer_id.hex().upper(),
        app_serial=public.app_serial.hex().upper(), app_type=public.app_type,
        start_date=public.start_date.hex(), expiry_date=public.expiry_date.hex(),
        currency_code=fci.currency_code, currency_exponent=fci.currency_exponent)


def purse_id(name: str) -> int:
    return {"ep": P.PURSE_EP, "ed": P.PURSE_ED}[name.lower()]


def verify_pin_if_needed(card: Reader, purse: int, pin: str | None) -> None:
    if purse == P.PURSE_ED:
        if pin is None:
            raise TerminalCheckFailed("the ED passbook needs the cardholder's PIN (--pin)")
        call(card, apdus.verify_pin(pin), "VERIFY PIN")


def read_balance(card: Reader, purse: int = P.PURSE_EP, pin: str | None = None,
                 aid: bytes = P.DEFAULT_IEP_AID) -> tuple[CardInfo, int]:
    info = select_purse(card, aid)
    verify_pin_if_needed(card, purse, pin)
    return info, int.from_bytes(call(card, apdus.get_balance(purse), "GET BALANCE"), "big")


def read_balance_limit(card: Reader) -> int | None:
    """The selected purse's balance limit (GET DATA 9F77, svcard's own), or None when the card
    does not answer it with 9000 (a purse without the command: 6A88, 6A81, 6D00, 6E00, ...);
    the bank then goes by the limit it has configured for the card's issuer. A 9000 answer that
    is not a ``9F77 04`` element is a :class:`TerminalCheckFailed`."""
    answer = card.exchange(apdus.get_data(P.TAG_BALANCE_LIMIT))
    if not answer.ok:
        return None
    raw = answer.data
    if len(raw) != 7 or int.from_bytes(raw[:2], "big") != P.TAG_BALANCE_LIMIT or raw[2] != 4:
        raise TerminalCheckFailed(f"the card's balance limit answer is malformed: {raw.hex()}")
    return int.from_bytes(raw[3:], "big")


@dataclass(frozen=True)
class LogEntry:
    counter: int
    overdraft_limit: int
    amount: int
    txn_type: int
    type_name: str
    terminal_id: str
    date: str
    time: str

    @classmethod
    def from_record(cls, raw: bytes) -> LogEntry:
        r = P.LogRecord.parse(raw)
        return cls(r.counter, r.overdraft_limit, r.amount, r.txn_type,
                   P.TYPE_NAMES.get(r.txn_type, f"type {r.txn_type:02X}"),
                   r.terminal_id.hex().upper(), r.date.hex(), r.time.hex())


def read_log(card: Reader, aid: bytes = P.DEFAULT_IEP_AID) -> list[LogEntry]:
    """All log records, newest first (READ RECORD 1.. until 6A83)."""
    return read_log_info(card, aid)[1]


def read_log_info(card: Reader, aid: bytes = P.DEFAULT_IEP_AID
                  ) -> tuple[CardInfo, list[LogEntry]]:
    """The card's public data and all its log records, newest first."""
    info = select_purse(card, aid)
    entries = []
    for number in range(1, P.LOG_RECORDS + 1):
        answer = card.exchange(apdus.read_record(number))
        if answer.sw == SW.RECORD_NOT_FOUND:
            break
        if not answer.ok:
            raise Declined(f"READ RECORD {number}", answer.sw)
        entries.append(LogEntry.from_record(answer.data))
    return info, entries


def prove(card: Reader, txn_type: int, counter: int) -> tuple[bytes, bytes] | None:
    """GET TRANSACTION PROVE: (MAC, TAC) of that transaction, or None if it did not happen."""
    answer = card.exchange(apdus.get_transaction_prove(txn_type, counter))
    if answer.sw == SW.NO_SUCH_PROOF:
        return None
    if not answer.ok:
        raise Declined("GET TRANSACTION PROVE", answer.sw)
    return answer.data[:4], answer.data[4:8]


@dataclass(frozen=True, kw_only=True)
class Receipt:
    """What every value transaction reports."""

    card_serial: str
    issuer_id: str
    purse: str
    txn_type: int
    amount: int
    balance_before: int
    balance_after: int
    terminal_id: str
    date: str
    time: str
    currency_code: int | None
    currency_exponent: int | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def money(self, minor: int) -> str:
        """``CNY 12.34``: minor units in the card's currency."""
        return format_money(minor, self.currency_code, self.currency_exponent)

    def balance_line(self) -> str:
        return f"  balance {self.money(self.balance_before)} -> {self.money(self.balance_after)}"


@dataclass(frozen=True, kw_only=True)
class PurchaseReceipt(Receipt):
    offline_counter: int
    terminal_txn_number: int
    mac1: str
    mac2: str
    tac: str

    def text(self) -> str:
        """The receipt for a person: amounts and balances with the currency."""
        return (f"{self.purse} purchase of {self.money(self.amount)} approved\n"
                f"{self.balance_line()}\n"
                f"  terminal {self.terminal_id} txn {self.terminal_txn_number}, card counter "
                f"{self.offline_counter}\n  MAC1 {self.mac1}  MAC2 {self.mac2}  TAC {self.tac}")


@held
def purchase(card: Reader, psam: Reader, amount: int | Amount, *, purse: int = P.PURSE_EP,
             key_index: int = 1, pin: str | None = None, when: dt.datetime | None = None,
             card_aid: bytes = P.DEFAULT_IEP_AID, psam_aid: bytes = P.DEFAULT_PSAM_AID,
             issuer_factor: bool = False) -> PurchaseReceipt:
    """A purchase at a POS: card <-> terminal <-> PSAM, MAC1 from the PSAM, MAC2 checked by it.
    ``amount`` is minor units, or an :class:`Amount` as typed, placed by the card's currency
    exponent once the card is read (``AmountError`` if it cannot be). ``issuer_factor`` uses the
    24-byte INIT SAM form (issuer id as a second diversification level)."""
    _check_minor(amount)
    when = when or dt.datetime.now()
    date, time = P.bcd_date(when.date()), P.bcd_time(when)
    info = select_purse(card, card_aid)   # 1. Read the card and check it.
    amount = info.minor_units(amount)
    info.check_dates(when.date())
    # 2. The PSAM: terminal id and currency.
    psam_fci = P.Fci.parse(call(psam, apdus.select(psam_aid), "SELECT PSAM"))
    terminal_id = call(psam, apdus.read_binary(P.SFI_PSAM_TERMINAL_ID, 6), "READ TERMINAL ID")
    currency = psam_fci.currency_code
    if currency is None:
        currency = P.PsamCurrency.parse(call(psam, apdus.read_binary(P.SFI_PSAM_CURRENCY, 3),
                                             "READ PSAM CURRENCY")).currency_code
    if info.currency_code not in (None, currency):
        raise TerminalCheckFailed(f"card currency {info.currency_code} is not the terminal's "
                                  f"{currency}")
    verify_pin_if_needed(card, purse, pin)
    uid = card_uid(card)   # before INITIALIZE: any other command would end its session
    # 3. INITIALIZE FOR PURCHASE on the card.
    init = P.InitForPurchaseAnswer.parse(call(
        card, apdus.initialize(P.INIT_PURCHASE, purse, key_index, amount, terminal_id),
        "INITIALIZE FOR PURCHASE"))
    txn_type = P.TYPE_EP_PURCHASE if purse == P.PURSE_EP else P.TYPE_ED_PURCHASE
    # 4. INIT SAM FOR PURCHASE: the PSAM numbers the transaction and makes MAC1.
    sam = P.InitSamAnswer.parse(call(psam, apdus.init_sam_for_purchase({
        "random": init.random, "offline_counter": init.offline_counter, "amount": amount,
        "txn_type": txn_type, "date": date, "time": time, "key_version": init.key_version,
        "algorithm_id": init.algorithm_id, "card_serial": info.serial_bytes[-8:]},
        issuer_id=bytes.fromhex(info.issuer_id) if issuer_factor else None, uid=uid),
        "INIT SAM FOR PURCHASE"))
    # 5. DEBIT FOR PURCHASE: the card checks MAC1, debits itself, answers TAC and MAC2.
    debit = P.DebitForPurchaseAnswer.parse(call(
        card, apdus.debit_for_purchase(sam.terminal_txn_number, date, time, sam.mac1),
        "DEBIT FOR PURCHASE"))
    # 6. CREDIT SAM FOR PURCHASE: the PSAM checks the card's MAC2 and records the purchase.
    call(psam, apdus.credit_sam_for_purchase(debit.mac2, debit.tac), "CREDIT SAM FOR PURCHASE")
    return PurchaseReceipt(
        card_serial=info.app_serial, issuer_id=info.issuer_id,
        purse="EP" if purse == P.PURSE_EP else "ED", txn_type=txn_type, amount=amount,
        balance_before=init.balance, balance_after=init.balance - amount,
        offline_counter=init.offline_counter, terminal_id=terminal_id.hex().upper(),
        terminal_txn_number=sam.terminal_txn_number, date=date.hex(), time=time.hex(),
        mac1=sam.mac1.hex().upper(), mac2=debit.mac2.hex().upper(), tac=debit.tac.hex().upper(),
        currency_code=info.currency_code, currency_exponent=info.currency_exponent)


@dataclass(frozen=True, kw_only=True)
class LoadReceipt(Receipt):
    online_counter: int
    s1: str
    s2: str
    s3: str

    def text(self) -> str:
        """The receipt for a person: amounts and balances with the currency."""
        return (f"{self.purse} load of {self.money(self.amount)} done\n{self.balance_line()}\n"
                f"  terminal {self.terminal_id}, online counter {self.online_counter}\n"
                f"  S1 {self.s1}  S2 {self.s2}  S3 {self.s3}")


@held
def load(card: Reader, hsm: Reader, amount: int | Amount, *, terminal_id: bytes,
         purse: int = P.PURSE_EP, key_index: int = 1, pin: str | None = None,
         when: dt.datetime | None = None, card_aid: bytes = P.DEFAULT_IEP_AID,
         hsm_aid: bytes = P.DEFAULT_HSM_AID) -> LoadReceipt:
    """A load: the card's S1 (MAC1) to the HSM, the HSM's S2 (MAC2) to the card, S3 checked.
    ``amount`` as for :func:`purchase`."""
    _check_minor(amount)
    if len(terminal_id) != 6:
        raise TerminalCheckFailed("a terminal id has 6 bytes")
    when = when or dt.datetime.now()
    date, time = P.bcd_date(when.date()), P.bcd_time(when)
    info = select_purse(card, card_aid)   # 1. Read the card and check it.
    amount = info.minor_units(amount)
    info.check_dates(when.date())
    call(hsm, apdus.select(hsm_aid), "SELECT HSM")
    verify_pin_if_needed(card, purse, pin)
    # 2. INITIALIZE FOR LOAD: the card answers balance, counter, random and S1.
    init = P.InitForLoadAnswer.parse(call(
        card, apdus.initialize(P.INIT_LOAD, purse, key_index, amount, terminal_id),
        "INITIALIZE FOR LOAD"))
    txn_type = P.TYPE_EP_LOAD if purse == P.PURSE_EP else P.TYPE_ED_LOAD
    issuer, serial = bytes.fromhex(info.issuer_id), info.serial_bytes[-8:]
    # 3. The HSM verifies S1 and makes S2.
    s2 = call(hsm, apdus.hsm_authorize_load({
        "issuer_id": issuer, "card_serial": serial, "key_version": init.key_version,
        "algorithm_id": init.algorithm_id, "balance": init.balance, "amount": amount,
        "txn_type": txn_type, "terminal_id": terminal_id, "online_counter": init.online_counter,
        "random": init.random, "s1": init.mac1, "date": date, "time": time}),
        "HSM AUTHORIZE LOAD")
    # 4. CREDIT FOR LOAD: the card checks S2, credits itself and answers S3 (its TAC).
    s3 = call(card, apdus.credit_for_load(date, time, s2), "CREDIT FOR LOAD")
    balance_after = init.balance + amount
    # 5. The HSM verifies S3.
    call(hsm, apdus.hsm_verify_load_tac({
        "issuer_id": issuer, "card_serial": serial, "balance_after": balance_after,
        "online_counter": init.online_counter, "amount": amount, "txn_type": txn_type,
        "terminal_id": terminal_id, "date": date, "time": time, "s3": s3}),
        "HSM VERIFY LOAD TAC")
    return LoadReceipt(
        card_serial=info.app_serial, issuer_id=info.issuer_id,
        purse="EP" if purse == P.PURSE_EP else "ED", txn_type=txn_type, amount=amount,
        balance_before=init.balance, balance_after=balance_after,
        online_counter=init.online_counter, terminal_id=terminal_id.hex().upper(),
        date=date.hex(), time=time.hex(), s1=init.mac1.hex().upper(), s2=s2.hex().upper(),
        s3=s3.hex().upper(), currency_code=info.currency_code,
        currency_exponent=info.currency_exponent)


def _check_minor(amount: int | Amount) -> None:
    if isinstance(amount, int) and not 0 <= amount <= 0xFFFFFFFF:
        raise TerminalCheckFailed("an amount is 0..4294967295 minor units")
