"""The IEP: a PBOC ED/EP purse application (EP purse, PIN-protected ED passbook, log).

Persistent writes of a value transaction, in order (each one an atomic image write):

1. balance and counter, together with the transaction's proof (for GET TRANSACTION PROVE) and
   the log record waiting to be written;
2. the log record moved into the cyclic log.

A card that loses power after write 1 finishes write 2 when it is next powered (see
:meth:`Iep.recover`), so balance, counter, proof and log always agree.

MAC failures: every purse key (purchase keys and load keys, each by key index) has a counter of
CONSECUTIVE wrong MACs (MAC1 of DEBIT, S2 of CREDIT FOR LOAD). A wrong MAC adds one and is
written to the image before the card answers ``9302``; a right MAC sets it back to 0 in the same
image write as the value it moves. At ``mac_failure_limit`` the key is locked: INITIALIZE with
it answers ``6983`` (authentication method blocked) until the issuer re-personalises the card
(:func:`unlock_keys`).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..protocols import crypto
from ..protocols import purse as P
from ..protocols import sw as SW
from ..protocols.apdu import CommandAPDU
from .keys import KeyEntry
from .runtime import CardError, TableApplication, read_binary_sfi

MAX_AMOUNT = 0xFFFFFFFF
MAX_COUNTER = 0xFFFF
DEFAULT_MAC_FAILURE_LIMIT = 15   # a 4-bit key error counter, as on common card OSes
KEY_LOCKED = SW.PIN_BLOCKED      # 6983: authentication method blocked (ISO 7816-4)


@dataclass(slots=True)
class Purse:
    balance: int = 0
    online_counter: int = 0
    offline_counter: int = 0
    overdraft_limit: int = 0

    def to_json(self) -> dict[str, int]:
        return {"balance": self.balance, "online_counter": self.online_counter,
                "offline_counter": self.offline_counter, "overdraft_limit": self.overdraft_limit}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Purse:
        return cls(int(data["balance"]), int(data["online_counter"]),
                   int(data["offline_counter"]), int(data.get("overdraft_limit", 0)))


@dataclass(frozen=True, slots=True)
class Proof:
    """What GET TRANSACTION PROVE answers for the last value transaction."""

    txn_type: int
    counter: int
    mac: bytes
    tac: bytes

    def to_json(self) -> dict[str, Any]:
        return {"txn_type": self.txn_type, "counter": self.counter, "mac": self.mac.hex(),
                "tac": self.tac.hex()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Proof:
        return cls(int(d["txn_type"]), int(d["counter"]), bytes.fromhex(d["mac"]),
                   bytes.fromhex(d["tac"]))


@dataclass(slots=True)
class IepState:
    """Everything the purse keeps in its non-volatile memory."""

    aid: bytes
    public_data: bytes          # EF 0x15, 30 bytes
    holder_data: bytes          # EF 0x16, 55 bytes
    currency_code: int
    currency_exponent: int
    balance_limit: int
    purchase_keys: dict[int, KeyEntry]
    load_keys: dict[int, KeyEntry]
    tac_key: bytes
    pin: str | None = None
    pin_try_limit: int = 3
    pin_tries_left: int = 3
    ep: Purse = field(default_factory=Purse)
    ed: Purse = field(default_factory=Purse)
    log: list[bytes] = field(default_factory=list)      # newest first
    proof: Proof | None = None
    pending_log: bytes | None = None
    fixed_random: bytes | None = None
    label: str = "SVCARD ED/EP"
    mac_failure_limit: int = DEFAULT_MAC_FAILURE_LIMIT
    # consecutive wrong MACs per key index; a key at the limit is locked
    purchase_mac_failures: dict[int, int] = field(default_factory=dict)
    load_mac_failures: dict[int, int] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"IepState(aid={self.aid.hex()}, ep={self.ep}, ed={self.ed})"

    def to_json(self) -> dict[str, Any]:
        return {
            "aid": self.aid.hex().upper(),
            "label": self.label,
            "public_data": self.public_data.hex().upper(),
            "holder_data": self.holder_data.hex().upper(),
            "currency_code": self.currency_code,
            "currency_exponent": self.currency_exponent,
            "balance_limit": self.balance_limit,
            "purchase_keys": [k.to_json() for k in self.purchase_keys.values()],
            "load_keys": [k.to_json() for k in self.load_keys.values()],
            "tac_key": self.tac_key.hex().upper(),
            "pin": self.pin,
            "pin_try_limit": self.pin_try_limit,
            "pin_tries_left": self.pin_tries_left,
            "ep": self.ep.to_json(),
            "ed": self.ed.to_json(),
            "log": [r.hex().upper() for r in self.log],
            "proof": self.proof.to_json() if self.proof else None,
            "pending_log": self.pending_log.hex().upper() if self.pending_log else None,
            "fixed_random": self.fixed_random.hex().upper() if self.fixed_random else None,
            "mac_failure_limit": self.mac_failure_limit,
            "purchase_mac_failures": _counts_to_json(self.purchase_mac_failures),
            "load_mac_failures": _counts_to_json(self.load_mac_failures),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IepState:
        def keys(items: list[dict[str, Any]]) -> dict[int, KeyEntry]:
            entries = [KeyEntry.from_json(i) for i in items]
            return {e.index: e for e in entries}

        state = cls(
            aid=bytes.fromhex(d["aid"]),
            label=str(d.get("label", "SVCARD ED/EP")),
            public_data=bytes.fromhex(d["public_data"]),
            holder_data=bytes.fromhex(d["holder_data"]),
            currency_code=int(d["currency_code"]),
            currency_exponent=int(d["currency_exponent"]),
            balance_limit=int(d["balance_limit"]),
            purchase_keys=keys(d["purchase_keys"]),
            load_keys=keys(d["load_keys"]),
            tac_key=bytes.fromhex(d["tac_key"]),
            pin=d.get("pin"),
            pin_try_limit=int(d.get("pin_try_limit", 3)),
            pin_tries_left=int(d.get("pin_tries_left", 3)),
            ep=Purse.from_json(d["ep"]),
            ed=Purse.from_json(d["ed"]),
            log=[bytes.fromhex(r) for r in d.get("log", [])],
            proof=Proof.from_json(d["proof"]) if d.get("proof") else None,
            pending_log=bytes.fromhex(d["pending_log"]) if d.get("pending_log") else None,
            fixed_random=bytes.fromhex(d["fixed_random"]) if d.get("fixed_random") else None,
            # images written before the MAC-failure counters load with none counted
            mac_failure_limit=int(d.get("mac_failure_limit", DEFAULT_MAC_FAILURE_LIMIT)),
            purchase_mac_failures=_counts_from_json(d.get("purchase_mac_failures")),
            load_mac_failures=_counts_from_json(d.get("load_mac_failures")),
        )
        if not 1 <= state.mac_failure_limit <= 255:
            raise ValueError("mac_failure_limit is 1..255")
        if len(state.public_data) != 30 or len(state.holder_data) != 55:
            raise ValueError("EF 0x15 has 30 bytes and EF 0x16 has 55")
        if len(state.tac_key) != 16:
            raise ValueError("the TAC key has 16 bytes")
        return state


def _counts_to_json(counts: dict[int, int]) -> dict[str, int]:
    return {str(index): n for index, n in sorted(counts.items()) if n}


def _counts_from_json(raw: Any) -> dict[int, int]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError("MAC failure counters are an object {key index: count}")
    out = {int(k): int(v) for k, v in raw.items()}
    if any(not 0 <= k <= 255 or v < 0 for k, v in out.items()):
        raise ValueError("a MAC failure counter has a key index 0..255 and a count >= 0")
    return out


def unlock_keys(state: IepState) -> None:
    """The issuer's unlock, at re-personalisation: every key's MAC-failure counter to 0."""
    state.purchase_mac_failures.clear()
    state.load_mac_failures.clear()


@dataclass(slots=True)
class _Session:
    """An INITIALIZE waiting for its CREDIT or DEBIT (volatile)."""

    kind: int              # P1 of INITIALIZE
    purse_id: int          # P2
    txn_type: int
    key: KeyEntry
    amount: int
    terminal_id: bytes
    random: bytes
    counter: int
    balance: int
    session_key: bytes = b""


_LOAD_TYPES = {P.PURSE_ED: P.TYPE_ED_LOAD, P.PURSE_EP: P.TYPE_EP_LOAD}
_PURCHASE_TYPES = {P.PURSE_ED: P.TYPE_ED_PURCHASE, P.PURSE_EP: P.TYPE_EP_PURCHASE}


def encode_pin(pin: str) -> bytes:
    """A PIN of 4..12 digits as BCD, an odd count padded with F."""
    if not (pin.isdigit() and 4 <= len(pin) <= 12):
        raise ValueError("a PIN has 4 to 12 digits")
    text = pin + ("F" if len(pin) % 2 else "")
    return bytes.fromhex(text)


class Iep(TableApplication):
    """The purse application. ``persist`` is called at every write point."""

    def __init__(self, state: IepState, persist: Callable[[], None] | None = None) -> None:
        self.state = state
        self.aid = state.aid
        self.persist: Callable[[], None] = persist or (lambda: None)
        self._fci: bytes | None = None
        self._session: _Session | None = None
        self._pin_ok = False
        self.handlers = {
            (P.CLA_PBOC, P.INS_INITIALIZE): self._initialize,
            (P.CLA_PBOC, P.INS_CREDIT_FOR_LOAD): self._credit_for_load,
            (P.CLA_PBOC, P.INS_DEBIT): self._debit,
            (P.CLA_PBOC, P.INS_GET_BALANCE): self._get_balance,
            (P.CLA_PBOC, P.INS_GET_TRANSACTION_PROVE): self._get_transaction_prove,
            (P.CLA_PBOC, P.INS_CHANGE_PIN): self._change_pin,
            (P.CLA_PBOC, P.INS_GET_DATA): self._get_data,
            (P.CLA_ISO, P.INS_VERIFY): self._verify,
            (P.CLA_ISO, P.INS_READ_BINARY): self._read_binary,
            (P.CLA_ISO, P.INS_READ_RECORD): self._read_record,
        }
        self.keep_pending = (self._credit_for_load, self._debit)

    # --- application plumbing ---------------------------------------------------------------
    def fci(self) -> bytes:
        if self._fci is None:  # built once: nothing in it changes after personalisation
            s = self.state
            self._fci = P.Fci(s.aid, s.label, s.currency_code, s.currency_exponent,
                              s.public_data).build()
        return self._fci


    def on_select(self) -> None:
        self._session = None
        self._pin_ok = False

    def on_deselect(self) -> None:
        self.on_select()

    def to_state(self) -> dict[str, Any]:
        return self.state.to_json()

    def recover(self) -> bool:
        """Finish a log write that a power cut interrupted. True if anything was written."""
        s = self.state
        if s.pending_log is None:
            return False
        self._append_log(s.pending_log)
        s.pending_log = None
        self.persist()
        return True

    def end_pending(self) -> None:
        self._session = None

    # --- helpers ----------------------------------------------------------------------------
    def _purse(self, p2: int) -> Purse:
        if p2 == P.PURSE_EP:
            return self.state.ep
        if p2 == P.PURSE_ED:
            if not self._pin_ok:
                raise CardError(SW.SECURITY_STATUS)
            return self.state.ed
        raise CardError(SW.WRONG_P1P2)

    def _random(self) -> bytes:
        return self.state.fixed_random or os.urandom(4)

    def _failures(self, session: _Session) -> dict[int, int]:
        s = self.state
        return s.load_mac_failures if session.kind == P.INIT_LOAD else s.purchase_mac_failures

    def _check_not_locked(self, failures: dict[int, int], key: KeyEntry) -> None:
        if failures.get(key.index, 0) >= self.state.mac_failure_limit:
            raise CardError(KEY_LOCKED)

    def _mac_failed(self, session: _Session) -> CardError:
        """Count a wrong MAC against the session's key, persisted before the card answers."""
        failures = self._failures(session)
        failures[session.key.index] = min(failures.get(session.key.index, 0) + 1,
                                          self.state.mac_failure_limit)
        self.persist()
        return CardError(SW.MAC_INVALID)

    def _mac_ok(self, session: _Session) -> None:
        """A right MAC: the key's count of consecutive failures restarts (written together
        with the value the MAC moves, write 1 of :meth:`_commit_value`)."""
        self._failures(session).pop(session.key.index, None)

    def _append_log(self, record: bytes) -> None:
        self.state.log.insert(0, record)
        del self.state.log[P.LOG_RECORDS:]

    def _commit_value(self, purse: Purse, new_balance: int, counter_attr: str, proof: Proof,
                      record: bytes) -> None:
        """Write 1 (balance, counter, proof, pending log together), then write 2 (the log)."""
        s = self.state
        purse.balance = new_balance
        setattr(purse, counter_attr, getattr(purse, counter_attr) + 1)
        s.proof = proof
        s.pending_log = record
        self.persist()
        self._append_log(record)
        s.pending_log = None
        self.persist()

    @staticmethod
    def _need_data(cmd: CommandAPDU, size: int) -> None:
        if len(cmd.data) != size:
            raise CardError(SW.WRONG_LENGTH)

    # --- INITIALIZE FOR LOAD / PURCHASE / CASH WITHDRAWAL -------------------------------------
    def _initialize(self, cmd: CommandAPDU) -> bytes:
        if cmd.p1 not in (P.INIT_LOAD, P.INIT_PURCHASE, P.INIT_CASH_WITHDRAWAL):
            raise CardError(SW.WRONG_P1P2)
        if cmd.p2 not in (P.PURSE_ED, P.PURSE_EP):
            raise CardError(SW.WRONG_P1P2)
        if cmd.p1 == P.INIT_CASH_WITHDRAWAL and cmd.p2 != P.PURSE_ED:
            raise CardError(SW.WRONG_P1P2)
        self._need_data(cmd, 11)
        req = P.InitializeData.parse(cmd.data)
        purse = self._purse(cmd.p2)
        s = self.state
        random = self._random()
        if cmd.p1 == P.INIT_LOAD:
            key = s.load_keys.get(req.key_index)
            if key is None:
                raise CardError(SW.KEY_INDEX_NOT_SUPPORTED)
            self._check_not_locked(s.load_mac_failures, key)
            if purse.online_counter >= MAX_COUNTER:
                raise CardError(SW.COUNTER_AT_MAXIMUM)
            if purse.balance + req.amount > s.balance_limit:
                raise CardError(SW.CONDITIONS_NOT_SATISFIED)
            txn_type = _LOAD_TYPES[cmd.p2]
            counter = purse.online_counter
            sk = crypto.load_session_key(key.key, random, counter)
            mac1 = crypto.mac(sk, crypto.load_mac1_input(purse.balance, req.amount, txn_type,
                                                          req.terminal_id))
            self._session = _Session(cmd.p1, cmd.p2, txn_type, key, req.amount, req.terminal_id,
                                     random, counter, purse.balance, sk)
            return P.InitForLoadAnswer.build({
                "balance": purse.balance, "online_counter": purse.online_counter,
                "key_version": key.version, "algorithm_id": key.algorithm,
                "random": random, "mac1": mac1})
        key = s.purchase_keys.get(req.key_index)
        if key is None:
            raise CardError(SW.KEY_INDEX_NOT_SUPPORTED)
        self._check_not_locked(s.purchase_mac_failures, key)
        if purse.offline_counter >= MAX_COUNTER:
            raise CardError(SW.COUNTER_AT_MAXIMUM)
        if req.amount > purse.balance:
            raise CardError(SW.INSUFFICIENT_FUNDS)
        txn_type = (P.TYPE_ED_CASH_WITHDRAWAL if cmd.p1 == P.INIT_CASH_WITHDRAWAL
                    else _PURCHASE_TYPES[cmd.p2])
        self._session = _Session(cmd.p1, cmd.p2, txn_type, key, req.amount, req.terminal_id,
                                 random, purse.offline_counter, purse.balance)
        return P.InitForPurchaseAnswer.build({
            "balance": purse.balance, "offline_counter": purse.offline_counter,
            "overdraft_limit": purse.overdraft_limit, "key_version": key.version,
            "algorithm_id": key.algorithm, "random": random})

    # --- CREDIT FOR LOAD --------------------------------------------------------------------
    def _credit_for_load(self, cmd: CommandAPDU) -> bytes:
        session, self._session = self._session, None
        if cmd.p1 != 0 or cmd.p2 != 0:
            raise CardError(SW.WRONG_P1P2)
        if session is None or session.kind != P.INIT_LOAD:
            raise CardError(SW.CONDITIONS_NOT_SATISFIED)
        self._need_data(cmd, 11)
        req = P.CreditForLoadData.parse(cmd.data)
        if not (P.valid_date(req.date) and P.valid_time(req.time)):
            raise CardError(SW.INCORRECT_DATA)
        mac2_input = crypto.load_mac2_input(session.amount, session.txn_type,
                                            session.terminal_id, req.date, req.time)
        if not hmac.compare_digest(crypto.mac(session.session_key, mac2_input), req.mac2):
            raise self._mac_failed(session)
        self._mac_ok(session)
        purse = self.state.ed if session.purse_id == P.PURSE_ED else self.state.ep
        new_balance = session.balance + session.amount
        tac = crypto.tac(self.state.tac_key, crypto.load_tac_input(
            new_balance, session.counter, session.amount, session.txn_type,
            session.terminal_id, req.date, req.time))
        record = P.LogRecord.build({
            "counter": session.counter, "overdraft_limit": purse.overdraft_limit,
            "amount": session.amount, "txn_type": session.txn_type,
            "terminal_id": session.terminal_id, "date": req.date, "time": req.time})
        proof = Proof(session.txn_type, session.counter, req.mac2, tac)
        self._commit_value(purse, new_balance, "online_counter", proof, record)
        return tac

    # --- DEBIT FOR PURCHASE / CASH WITHDRAWAL -------------------------------------------------
    def _debit(self, cmd: CommandAPDU) -> bytes:
        session, self._session = self._session, None
        if cmd.p1 != 0x01 or cmd.p2 != 0x00:
            raise CardError(SW.WRONG_P1P2)
        if session is None or session.kind == P.INIT_LOAD:
            raise CardError(SW.CONDITIONS_NOT_SATISFIED)
        self._need_data(cmd, 15)
        req = P.DebitForPurchaseData.parse(cmd.data)
        if not (P.valid_date(req.date) and P.valid_time(req.time)):
            raise CardError(SW.INCORRECT_DATA)
        sk = crypto.purchase_session_key(session.key.key, session.random, session.counter,
                                         req.terminal_txn_number)
        mac1_input = crypto.purchase_mac1_input(session.amount, session.txn_type,
                                                session.terminal_id, req.date, req.time)
        if not hmac.compare_digest(crypto.mac(sk, mac1_input), req.mac1):
            raise self._mac_failed(session)
        self._mac_ok(session)
        purse = self.state.ed if session.purse_id == P.PURSE_ED else self.state.ep
        mac2 = crypto.mac(sk, crypto.purchase_mac2_input(session.amount))
        tac = crypto.tac(self.state.tac_key, crypto.purchase_tac_input(
            session.amount, session.txn_type, session.terminal_id, req.terminal_txn_number,
            req.date, req.time))
        record = P.LogRecord.build({
            "counter": session.counter, "overdraft_limit": purse.overdraft_limit,
            "amount": session.amount, "txn_type": session.txn_type,
            "terminal_id": session.terminal_id, "date": req.date, "time": req.time})
        proof = Proof(session.txn_type, session.counter, mac2, tac)
        self._commit_value(purse, session.balance - session.amount, "offline_counter", proof,
                           record)
        return tac + mac2

    # --- queries ----------------------------------------------------------------------------
    def _get_balance(self, cmd: CommandAPDU) -> bytes:
        if cmd.p1 != 0:
            raise CardError(SW.WRONG_P1P2)
        if cmd.data:
            raise CardError(SW.WRONG_LENGTH)
        if cmd.le is not None and cmd.le not in (4, 256):
            raise CardError(0x6C04)
        return self._purse(cmd.p2).balance.to_bytes(4, "big")

    def _get_transaction_prove(self, cmd: CommandAPDU) -> bytes:
        if cmd.p1 != 0 or cmd.p2 not in P.TYPE_NAMES:
            raise CardError(SW.WRONG_P1P2)
        self._need_data(cmd, 2)
        counter = int.from_bytes(cmd.data, "big")
        proof = self.state.proof
        if proof is None or proof.txn_type != cmd.p2 or proof.counter != counter:
            raise CardError(SW.NO_SUCH_PROOF)
        return proof.mac + proof.tac

    def _get_data(self, cmd: CommandAPDU) -> bytes:
        """GET DATA ``80 CA 9F 77``: the purse's balance limit as TLV ``9F77 04 limit``, so a
        bank can work out the largest load (seed step 872) before the card is asked for S1."""
        if (cmd.p1 << 8) | cmd.p2 != P.TAG_BALANCE_LIMIT:
            raise CardError(SW.DATA_NOT_FOUND)
        if cmd.data:
            raise CardError(SW.WRONG_LENGTH)
        value = self.state.balance_limit.to_bytes(4, "big")
        return P.TAG_BALANCE_LIMIT.to_bytes(2, "big") + bytes([len(value)]) + value

    # --- PIN --------------------------------------------------------------------------------
    def _check_pin(self, candidate: bytes) -> None:
        s = self.state
        if s.pin is None:
            raise CardError(SW.CONDITIONS_NOT_SATISFIED)
        if s.pin_tries_left <= 0:
            raise CardError(SW.PIN_BLOCKED)
        if hmac.compare_digest(candidate, encode_pin(s.pin)):
            if s.pin_tries_left != s.pin_try_limit:
                s.pin_tries_left = s.pin_try_limit
                self.persist()
            self._pin_ok = True
            return
        s.pin_tries_left -= 1
        self._pin_ok = False
        self.persist()
        if s.pin_tries_left == 0:
            raise CardError(SW.PIN_BLOCKED)
        raise CardError(0x63C0 | s.pin_tries_left)

    def _verify(self, cmd: CommandAPDU) -> bytes:
        if cmd.p1 != 0 or cmd.p2 != 0:
            raise CardError(SW.WRONG_P1P2)
        s = self.state
        if not cmd.data:  # ask for the retry counter
            if s.pin_tries_left <= 0:
                raise CardError(SW.PIN_BLOCKED)
            if self._pin_ok:
                return b""
            raise CardError(0x63C0 | s.pin_tries_left)
        if not 2 <= len(cmd.data) <= 6:
            raise CardError(SW.WRONG_LENGTH)
        self._check_pin(cmd.data)
        return b""

    def _change_pin(self, cmd: CommandAPDU) -> bytes:
        """CHANGE PIN (80 5E 01 00): old PIN || FF || new PIN, both BCD."""
        if cmd.p1 != 0x01 or cmd.p2 != 0x00:
            raise CardError(SW.WRONG_P1P2)
        old, sep, new = cmd.data.partition(b"\xff")
        if not sep or not 2 <= len(old) <= 6 or not 2 <= len(new) <= 6:
            raise CardError(SW.WRONG_LENGTH)
        text = new.hex().upper().rstrip("F")
        if not (text.isdigit() and 4 <= len(text) <= 12):
            raise CardError(SW.INCORRECT_DATA)
        self._check_pin(old)
        self.state.pin = text
        self.persist()
        return b""

    # --- files ------------------------------------------------------------------------------
    def _read_binary(self, cmd: CommandAPDU) -> bytes:
        return read_binary_sfi(cmd, {P.SFI_PUBLIC_DATA: self.state.public_data,
                                     P.SFI_HOLDER_DATA: self.state.holder_data})

    def _read_record(self, cmd: CommandAPDU) -> bytes:
        if cmd.p2 & 0x07 != 0x04 or cmd.p1 == 0:
            raise CardError(SW.WRONG_P1P2)
        if cmd.data:
            raise CardError(SW.WRONG_LENGTH)
        if cmd.p2 >> 3 != P.SFI_LOG:
            raise CardError(SW.FILE_NOT_FOUND)
        if cmd.le is not None and cmd.le not in (P.LOG_RECORD_SIZE, 256):
            raise CardError(0x6C00 | P.LOG_RECORD_SIZE)
        if cmd.p1 > len(self.state.log):
            raise CardError(SW.RECORD_NOT_FOUND)
        return self.state.log[cmd.p1 - 1]
