"""The IEP: a PBOC ED/EP purse application (EP purse, PIN-protected ED passbook, log).

This module holds the purse's state (:class:`IepState`, what its non-volatile memory keeps) and
the application (:class:`Iep`), which routes each command to its group in
:mod:`svcard.card.iep_commands` (load, purchase, PIN, log and proof, queries) and owns the
writes every value transaction makes.

Persistent writes of a value transaction, in order (each one an atomic image write):

1. balance and counter, together with the transaction's proof (for GET TRANSACTION PROVE) and
   the log record waiting to be written;
2. the log record moved into the cyclic log.

A card that loses power after write 1 finishes write 2 when it is next powered (see
:meth:`Iep.recover`), so balance, counter, proof and log always agree.

MAC failures lock a key after ``mac_failure_limit`` consecutive wrong MACs: see
:mod:`svcard.card.iep_commands.lockout`. Goods records are also written alone, by the
secure-messaging record writes (CLA 04) under the goods key, each MAC chained from the
challenge GET CHALLENGE answered just before: see :mod:`svcard.card.iep_commands.secure_write`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeAlias

from ..protocols import goods as G
from ..protocols import mac_schemes
from ..protocols import purse as P
from ..protocols import sw as SW
from ..protocols.apdu import CommandAPDU
from .goods import GoodsFiles, Write
from .iep_commands import capp_purchase as capp
from .iep_commands import load, overdraft, pin, purchase, queries, records, secure_write, unload
from .iep_commands.lockout import DEFAULT_MAC_FAILURE_LIMIT
from .iep_commands.records import LOG_COUNTER_BEFORE, Proof, append_log, log_counter_as
from .iep_commands.session import Session
from .keys import KeyEntry
from .runtime import CardError, TableApplication

MAX_AMOUNT = 0xFFFFFFFF


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
    mac_scheme: str = mac_schemes.DEFAULT   # the issuer's MAC-scheme profile
    uid: bytes | None = None   # answered to GET DATA 00 00; MAC1 data in some profiles
    # consecutive wrong MACs per key index; a key at the limit is locked
    purchase_mac_failures: dict[int, int] = field(default_factory=dict)
    load_mac_failures: dict[int, int] = field(default_factory=dict)
    # unload (DULK) and overdraft-limit update (DUK) keys: optional, ED only
    unload_keys: dict[int, KeyEntry] = field(default_factory=dict)
    update_keys: dict[int, KeyEntry] = field(default_factory=dict)
    unload_mac_failures: dict[int, int] = field(default_factory=dict)
    update_mac_failures: dict[int, int] = field(default_factory=dict)
    log_counter: str = LOG_COUNTER_BEFORE   # the log record's counter: "before" or "after"
    # the key of secure-messaging goods writes (04 DC / 04 E2); optional
    goods_key: KeyEntry | None = None
    goods_mac_failures: dict[int, int] = field(default_factory=dict)
    goods: GoodsFiles = field(default_factory=GoodsFiles)   # goods record files (card/goods.py)
    # whether the plain UPDATE CAPP DATA CACHE (80 DC, no MAC) may write goods records; by
    # default only the MAC'd 84 DE may (capp_purchase.py)
    capp_plain_update: bool = False

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
            "mac_scheme": self.mac_scheme,
            "uid": self.uid.hex().upper() if self.uid else None,
            "purchase_mac_failures": _counts_to_json(self.purchase_mac_failures),
            "load_mac_failures": _counts_to_json(self.load_mac_failures),
            "unload_keys": [k.to_json() for k in self.unload_keys.values()],
            "update_keys": [k.to_json() for k in self.update_keys.values()],
            "unload_mac_failures": _counts_to_json(self.unload_mac_failures),
            "update_mac_failures": _counts_to_json(self.update_mac_failures),
            "log_counter": self.log_counter,
            "goods_key": self.goods_key.to_json() if self.goods_key else None,
            "goods_mac_failures": _counts_to_json(self.goods_mac_failures),
            "goods": self.goods.to_json(),
            "capp_plain_update": self.capp_plain_update,
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
            mac_scheme=str(d.get("mac_scheme", mac_schemes.DEFAULT)),
            uid=bytes.fromhex(d["uid"]) if d.get("uid") else None,
            purchase_mac_failures=_counts_from_json(d.get("purchase_mac_failures")),
            load_mac_failures=_counts_from_json(d.get("load_mac_failures")),
            # images written before unload / update keys load without them (9403)
            unload_keys=keys(d.get("unload_keys") or []),
            update_keys=keys(d.get("update_keys") or []),
            unload_mac_failures=_counts_from_json(d.get("unload_mac_failures")),
            update_mac_failures=_counts_from_json(d.get("update_mac_failures")),
            log_counter=log_counter_as(d.get("log_counter", LOG_COUNTER_BEFORE)),
            # images written before the goods key load without it (secure writes: 6982)
            goods_key=KeyEntry.from_json(d["goods_key"]) if d.get("goods_key") else None,
            goods_mac_failures=_counts_from_json(d.get("goods_mac_failures")),
            # images written before goods files load with the default files, empty
            goods=GoodsFiles.from_json(d.get("goods")),
            # an image without the setting takes only the MAC'd cache update (84 DE)
            capp_plain_update=_flag(d.get("capp_plain_update", False), "capp_plain_update"),
        )
        if not 1 <= state.mac_failure_limit <= 255:
            raise ValueError("mac_failure_limit is 1..255")
        scheme = mac_schemes.scheme(state.mac_scheme)   # an unknown profile: ValueError
        if scheme.uid_size:
            mac_schemes.check_uid(scheme, state.uid)
        if len(state.public_data) != 30 or len(state.holder_data) != 55:
            raise ValueError("EF 0x15 has 30 bytes and EF 0x16 has 55")
        if len(state.tac_key) != 16:
            raise ValueError("the TAC key has 16 bytes")
        if state.fixed_random is not None and len(state.fixed_random) != 4:
            raise ValueError("fixed_random has 4 bytes")   # an INITIALIZE's random
        return state


def _flag(raw: Any, name: str) -> bool:
    if not isinstance(raw, bool):
        raise ValueError(f"{name} is true or false")
    return raw


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


class Iep(TableApplication):
    """The purse application. ``persist`` is called at every write point."""

    # 04: the goods writes check their MAC (a loyalty programme has none: card/loyalty.py)
    # 84: the MAC'd UPDATE CAPP DATA CACHE (84 DE) only; any other 84 command answers 6882
    secure_messaging_classes: tuple[int, ...] = (secure_write.CLA_SM, capp.CLA_SM_CAPP)

    def __init__(self, state: IepState, persist: Callable[[], None] | None = None) -> None:
        self.state = state
        self.aid = state.aid
        self.persist: Callable[[], None] = persist or (lambda: None)
        self._fci: bytes | None = None
        self.session: Session | None = None   # the INITIALIZE waiting for its completion
        self.pin_ok = False                   # VERIFY passed since the purse was selected
        self.challenge: bytes | None = None   # GET CHALLENGE's answer, for the next command
        self._offered: bytes | None = None    # the challenge the command being run may use
        self.handlers = {key: partial(command, self) for key, command in _COMMANDS.items()}
        self.keep_pending = tuple(self.handlers[key] for key in _COMPLETIONS)

    # --- application plumbing ---------------------------------------------------------------
    def fci(self) -> bytes:
        if self._fci is None:  # built once: nothing in it changes after personalisation
            s = self.state
            self._fci = P.Fci(s.aid, s.label, s.currency_code, s.currency_exponent,
                              s.public_data).build()
        return self._fci

    def on_select(self) -> None:
        self.session = None
        self.pin_ok = False
        self.challenge = self._offered = None

    def process(self, cmd: CommandAPDU) -> bytes:
        if cmd.cla == capp.CLA_SM_CAPP and cmd.ins != capp.INS_UPDATE_CAPP_DATA_CACHE_SM:
            raise CardError(_SM_NOT_SUPPORTED)   # as the runtime answers it: nothing ends
        # a challenge serves the command right after GET CHALLENGE, and no other
        self._offered, self.challenge = self.challenge, None
        try:
            return super().process(cmd)
        finally:
            self._offered = None

    def take_challenge(self) -> bytes | None:
        """The challenge GET CHALLENGE answered just before this command, used up here."""
        challenge, self._offered = self._offered, None
        return challenge

    def on_deselect(self) -> None:
        self.on_select()

    def to_state(self) -> dict[str, Any]:
        return self.state.to_json()

    def recover(self) -> bool:
        """Finish a log write that a power cut interrupted. True if anything was written."""
        s = self.state
        if s.pending_log is None:
            return False
        append_log(s, s.pending_log)
        s.pending_log = None
        self.persist()
        return True

    def end_pending(self) -> None:
        self.session = None

    # --- what the command groups share ------------------------------------------------------
    def take_session(self) -> Session | None:
        """The INITIALIZE a CREDIT or DEBIT completes; it ends here, whatever the answer."""
        session, self.session = self.session, None
        return session

    def purse_for(self, p2: int) -> Purse:
        """The purse P2 names: the EP, or the ED once VERIFY has passed."""
        if p2 == P.PURSE_EP:
            return self.state.ep
        if p2 == P.PURSE_ED:
            if not self.pin_ok:
                raise CardError(SW.SECURITY_STATUS)
            return self.state.ed
        raise CardError(SW.WRONG_P1P2)

    def new_random(self) -> bytes:
        """The card's random for a session (a fixed one if the image sets it, for tests)."""
        return self.state.fixed_random or os.urandom(4)

    def commit_value(self, purse: Purse, new_balance: int, counter_attr: str, proof: Proof,
                     record: bytes, goods: tuple[Write, ...] = ()) -> None:
        """Write 1 (balance, counter, proof, pending log and the goods records of a composite
        purchase together), then write 2 (the log)."""
        s = self.state
        s.goods.apply_all(goods)
        purse.balance = new_balance
        setattr(purse, counter_attr, getattr(purse, counter_attr) + 1)
        if s.log_counter != LOG_COUNTER_BEFORE:   # the counter after the increment
            record = getattr(purse, counter_attr).to_bytes(2, "big") + record[2:]
        s.proof = proof
        s.pending_log = record
        self.persist()
        append_log(s, record)
        s.pending_log = None
        self.persist()

    def write_goods(self, writes: tuple[Write, ...]) -> None:
        """Goods records written without a value change (a secure-messaging write): all of
        them in one image write. Each was checked by ``GoodsFiles.check_write`` first."""
        self.state.goods.apply_all(writes)
        self.persist()

    # --- INITIALIZE: P1 picks the command group, P2 the purse -------------------------------
    def initialize(self, cmd: CommandAPDU) -> bytes:
        route = _INITIALIZE_ROUTES.get(cmd.p1)
        if route is None or cmd.p2 not in route[1]:
            raise CardError(SW.WRONG_P1P2)
        return route[0](self, cmd)

    def debit(self, cmd: CommandAPDU) -> bytes:
        """DEBIT ``80 54``: P1 01 completes a purchase / cash withdrawal, P1 03 an unload; a
        session of another kind is spent and refused (``6985``)."""
        if cmd.p1 == P.DEBIT_FOR_UNLOAD:
            return unload.debit_for_unload(self, cmd)
        if capp.is_capp(self.session):   # DEBIT FOR CAPP PURCHASE: the cached goods too
            return capp.debit_for_capp_purchase(self, cmd)
        if self.session is not None and self.session.kind not in (P.INIT_PURCHASE,
                                                                  P.INIT_CASH_WITHDRAWAL):
            self.session = None
            raise CardError(SW.CONDITIONS_NOT_SATISFIED)
        return purchase.debit(self, cmd)


IepCommand: TypeAlias = Callable[[Iep, CommandAPDU], bytes]

# INITIALIZE by P1: the group's handler and the purses (P2) it may open
_INITIALIZE_ROUTES: dict[int, tuple[IepCommand, tuple[int, ...]]] = {
    P.INIT_LOAD: (load.initialize_for_load, (P.PURSE_ED, P.PURSE_EP)),
    P.INIT_PURCHASE: (purchase.initialize_for_purchase, (P.PURSE_ED, P.PURSE_EP)),
    P.INIT_CASH_WITHDRAWAL: (purchase.initialize_for_purchase, (P.PURSE_ED,)),
    P.INIT_UPDATE: (overdraft.initialize_for_update, (P.PURSE_ED,)),
    P.INIT_UNLOAD: (unload.initialize_for_unload, (P.PURSE_ED,)),
    G.INIT_CAPP_PURCHASE: (capp.initialize_for_capp_purchase, (P.PURSE_EP,)),
}

_COMMANDS: dict[tuple[int, int], IepCommand] = {
    (P.CLA_PBOC, P.INS_INITIALIZE): Iep.initialize,
    (P.CLA_PBOC, P.INS_CREDIT_FOR_LOAD): load.credit_for_load,
    (P.CLA_PBOC, P.INS_DEBIT): Iep.debit,
    (P.CLA_PBOC, P.INS_UPDATE_OVERDRAFT_LIMIT): overdraft.update_overdraft_limit,
    (P.CLA_PBOC, P.INS_GET_BALANCE): queries.get_balance,
    (P.CLA_PBOC, P.INS_GET_TRANSACTION_PROVE): records.get_transaction_prove,
    (P.CLA_PBOC, P.INS_CHANGE_PIN): pin.change_pin,
    (P.CLA_PBOC, P.INS_GET_DATA): purchase.get_data,   # 00 00: the UID; else queries
    (P.CLA_ISO, P.INS_VERIFY): pin.verify,
    (P.CLA_ISO, P.INS_READ_BINARY): queries.read_binary,
    (P.CLA_ISO, P.INS_READ_RECORD): records.read_record,
    (P.CLA_ISO, secure_write.INS_GET_CHALLENGE): secure_write.get_challenge,
    (secure_write.CLA_SM, secure_write.INS_UPDATE_RECORD): secure_write.update_record,
    (secure_write.CLA_SM, secure_write.INS_APPEND_RECORD): secure_write.append_record,
    (P.CLA_ISO, secure_write.INS_UPDATE_RECORD): secure_write.plain_write,
    (P.CLA_ISO, secure_write.INS_APPEND_RECORD): secure_write.plain_write,
    (P.CLA_PBOC, G.INS_UPDATE_CAPP_DATA_CACHE): capp.update_capp_data_cache,
    (capp.CLA_SM_CAPP, capp.INS_UPDATE_CAPP_DATA_CACHE_SM): capp.update_capp_data_cache_sm,
}

# the completions an INITIALIZE's session survives into (every other command ends it)
_COMPLETIONS = ((P.CLA_PBOC, P.INS_CREDIT_FOR_LOAD), (P.CLA_PBOC, P.INS_DEBIT),
                (P.CLA_PBOC, P.INS_UPDATE_OVERDRAFT_LIMIT),
                (P.CLA_PBOC, G.INS_UPDATE_CAPP_DATA_CACHE),
                (capp.CLA_SM_CAPP, capp.INS_UPDATE_CAPP_DATA_CACHE_SM))
_SM_NOT_SUPPORTED = 0x6882
