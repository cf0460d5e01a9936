"""The PSAM: the merchant terminal's purchase security module (PBOC PSAM plus svcard extensions).

PBOC commands: READ BINARY of the terminal id (``00 B0 96 00 06``), INIT SAM FOR PURCHASE
(``80 70 00 00 1C``, or ``24`` with the issuer id as a second diversification level) answering
terminal transaction number and MAC1, CREDIT SAM FOR PURCHASE (``80 72 00 00 04`` MAC2; our
``08`` form adds the card's TAC for the collection record).

Each issuer's MAC-scheme profile (protocols/mac_schemes.py) makes the session key, MAC1 and
MAC2; a profile whose MAC1 takes the card's UID (``changsha-metro``: 9 bytes) needs them after
the INIT SAM data (``80 70 00 00 25`` or ``2D``). A UID for an issuer whose profile takes none,
or none where it takes one, is ``6700`` and changes nothing. The card's algorithm id must be
one the issuer maps to the key's algorithm (``9403`` otherwise).

Persistence: every change of a purchase (the INIT SAM record with the TTN and previous
signature, CREDIT SAM's rewrite of it) and of the blocked list is handed to ``persist_change``
as one small change, which a card image appends to its journal (card/storage.py); the whole
state is persisted (``persist``) only when a batch closes. So a purchase costs the same with
100,000 records in the open batch as with none.

A change that cannot be made persistent (a disk error: ``6F00``) is undone in memory too, so
the PSAM's memory never runs ahead of its image and journal.

Every purchase is recorded at INIT SAM, before the card answers: a record with no TAC and
status 1 (not credited by this PSAM). In the PBOC form the session then stays pending; CREDIT
SAM with the expected MAC2 rewrites *that* record in place (same TTN, still in the open batch)
to status 0 with the card's TAC. A wrong MAC2 ends the session and changes no record. If the
session is lost first (any other command, a power cut, a host that gave up waiting), the record
stays without TAC: the payment server, which compared the card's MAC2 with the expected one,
hands the card's TAC with the batch ("proofs") or later (late proofs). So a purchase the PSAM
signed for is never missing from its batch, whatever happens between INIT and CREDIT SAM.

svcard extensions (CLA 80):

* ``80 70 01 00`` INIT SAM FOR PURCHASE, early release: the answer adds the *expected card MAC2*
  and the purchase is recorded at once (seed FIG. 6-8: the PSAM is free before the card answers);
* ``80 76 P1 00 08`` blocked-card list: P1 01 adds the card serial, 02 removes it;
* ``80 78 00 00`` previous signature: TTN, MAC1, expected MAC2 and state of the last INIT SAM;
* ``80 7A 00 00`` per-issuer totals of the open batch: (issuer id 8, count 4, amount 8) each;
* ``80 7C 00 00 05`` read a batch record: batch (0 open, 1 last closed) and index (4, from 0);
* ``80 7E 00 00`` close the batch: header (terminal id, batch number, count, total) and a MAC
  over the header and every record under the PSAM's batch key (3DES CBC-MAC); ``80 7E 01 00``
  answers the last closed batch again.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..protocols import crypto
from ..protocols import mac_schemes as M
from ..protocols import purse as P
from ..protocols import sw as SW
from ..protocols.apdu import CommandAPDU
from .keys import DEFAULT_SCHEME, IssuerScheme
from .psam_batch import BatchCommands
from .runtime import CardError, TableApplication, read_binary_sfi

MAX_TTN = 0xFFFFFFFF
UID_SIZES = sorted({s.uid_size for s in M.SCHEMES.values()})
_FORMS_1C = {0x1C + n for n in UID_SIZES}   # INIT SAM data, with the card's UID if any
_FORMS_24 = {0x24 + n for n in UID_SIZES}
assert not _FORMS_1C & _FORMS_24, "a UID size makes the INIT SAM forms ambiguous"


@dataclass(frozen=True, slots=True)
class IssuerKey:
    """A purchase master key of one issuer, as the PSAM holds it."""

    issuer_id: bytes
    version: int
    algorithm: int
    key: bytes

    def __repr__(self) -> str:
        return f"IssuerKey(issuer={self.issuer_id.hex()}, version={self.version})"

    def to_json(self) -> dict[str, Any]:
        return {"issuer_id": self.issuer_id.hex().upper(), "version": self.version,
                "algorithm": self.algorithm, "key": self.key.hex().upper()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IssuerKey:
        key = bytes.fromhex(d["key"])
        issuer = bytes.fromhex(d["issuer_id"])
        if len(key) != 16 or len(issuer) != 8:
            raise ValueError("a PSAM issuer key has a 16-byte key and an 8-byte issuer id")
        return cls(issuer, int(d["version"]), int(d.get("algorithm", 0)), key)


@dataclass(slots=True)
class Signature:
    ttn: int = 0
    mac1: bytes = bytes(4)
    expected_mac2: bytes = bytes(4)
    state: int = P.SIGNATURE_NONE

    def to_json(self) -> dict[str, Any]:
        return {"ttn": self.ttn, "mac1": self.mac1.hex(), "expected_mac2":
                self.expected_mac2.hex(), "state": self.state}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Signature:
        return cls(int(d["ttn"]), bytes.fromhex(d["mac1"]), bytes.fromhex(d["expected_mac2"]),
                   int(d["state"]))


class Records:
    """The PSAM's purchase records, with their hex form kept alongside so that an image write
    does not re-encode the whole batch each time."""

    __slots__ = ("_hex", "_raw")

    def __init__(self, raw: list[bytes] | None = None) -> None:
        self._raw: list[bytes] = list(raw or [])
        self._hex: list[str] = [r.hex().upper() for r in self._raw]

    def append(self, record: bytes) -> int:
        """Add a record; its index."""
        self._raw.append(record)
        self._hex.append(record.hex().upper())
        return len(self._raw) - 1

    def pop(self) -> None:
        """Drop the last record (a change that could not be made persistent)."""
        self._raw.pop()
        self._hex.pop()

    def replace(self, index: int, record: bytes) -> None:
        self._raw[index] = record
        self._hex[index] = record.hex().upper()

    def hex_at(self, index: int) -> str:
        return self._hex[index]

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, index: int) -> bytes:
        return self._raw[index]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._raw)

    def as_list(self) -> list[bytes]:
        return list(self._raw)

    def hex_list(self) -> list[str]:
        return list(self._hex)

    @classmethod
    def from_hex(cls, items: list[str]) -> Records:
        out = cls()
        out._raw = [bytes.fromhex(h) for h in items]
        out._hex = [h.upper() for h in items]
        return out


@dataclass(slots=True)
class PsamState:
    aid: bytes
    terminal_id: bytes
    psam_serial: bytes
    default_issuer: bytes
    keys: list[IssuerKey]
    batch_key: bytes
    currency_code: int
    currency_exponent: int
    next_ttn: int = 1
    blocked: set[bytes] = field(default_factory=set)
    batch_number: int = 1
    records: Records = field(default_factory=Records)
    closed_records: Records = field(default_factory=Records)
    previous: Signature = field(default_factory=Signature)
    label: str = "SVCARD PSAM"
    schemes: dict[bytes, IssuerScheme] = field(default_factory=dict)  # by issuer id

    def scheme_for(self, issuer: bytes) -> IssuerScheme:
        """The issuer's algorithm ids and MAC-scheme profile (PBOC, exact ids if not given)."""
        return self.schemes.get(issuer, DEFAULT_SCHEME)

    def __repr__(self) -> str:
        return f"PsamState(terminal_id={self.terminal_id.hex()}, next_ttn={self.next_ttn})"

    def to_json(self) -> dict[str, Any]:
        return {
            "aid": self.aid.hex().upper(), "label": self.label,
            "terminal_id": self.terminal_id.hex().upper(),
            "psam_serial": self.psam_serial.hex().upper(),
            "default_issuer": self.default_issuer.hex().upper(),
            "keys": [k.to_json() for k in self.keys],
            "batch_key": self.batch_key.hex().upper(),
            "currency_code": self.currency_code, "currency_exponent": self.currency_exponent,
            "next_ttn": self.next_ttn,
            "blocked": sorted(b.hex().upper() for b in self.blocked),
            "batch_number": self.batch_number,
            "records": self.records.hex_list(),
            "closed_records": self.closed_records.hex_list(),
            "previous": self.previous.to_json(),
            **({"issuer_schemes": {i.hex().upper(): sc.to_json()
                                   for i, sc in sorted(self.schemes.items())}}
               if self.schemes else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PsamState:
        state = cls(
            aid=bytes.fromhex(d["aid"]), label=str(d.get("label", "SVCARD PSAM")),
            terminal_id=bytes.fromhex(d["terminal_id"]),
            psam_serial=bytes.fromhex(d["psam_serial"]),
            default_issuer=bytes.fromhex(d["default_issuer"]),
            keys=[IssuerKey.from_json(k) for k in d["keys"]],
            batch_key=bytes.fromhex(d["batch_key"]),
            currency_code=int(d["currency_code"]), currency_exponent=int(d["currency_exponent"]),
            next_ttn=int(d["next_ttn"]),
            blocked={bytes.fromhex(b) for b in d.get("blocked", [])},
            batch_number=int(d["batch_number"]),
            records=Records.from_hex(d.get("records", [])),
            closed_records=Records.from_hex(d.get("closed_records", [])),
            previous=Signature.from_json(d["previous"]),
            schemes={bytes.fromhex(i): IssuerScheme.from_json(sc)
                     for i, sc in d.get("issuer_schemes", {}).items()},
        )
        if len(state.terminal_id) != 6 or len(state.batch_key) != 16:
            raise ValueError("a PSAM has a 6-byte terminal id and a 16-byte batch key")
        return state


@dataclass(slots=True)
class _Pending:
    ttn: int
    session_key: bytes
    expected_mac2: bytes
    issuer_id: bytes
    card_serial: bytes
    card_counter: int
    amount: int
    txn_type: int
    date: bytes
    time: bytes
    index: int = -1    # where INIT SAM put its record in the open batch


class Psam(BatchCommands, TableApplication):
    def __init__(self, state: PsamState, persist: Callable[[], None] | None = None) -> None:
        self.state = state
        self.aid = state.aid
        self.persist: Callable[[], None] = persist or (lambda: None)
        # one purchase's change (card/journal_file.py): a card image appends it to its journal
        # (card/image.py sets this); otherwise the whole state is persisted
        self.persist_change: Callable[[dict[str, Any]], None] = lambda change: self.persist()
        self._fci: bytes | None = None
        self._pending: _Pending | None = None
        self.handlers = {
            (P.CLA_ISO, P.INS_READ_BINARY): self._read_binary,
            (P.CLA_PBOC, P.INS_INIT_SAM_FOR_PURCHASE): self._init_sam,
            (P.CLA_PBOC, P.INS_CREDIT_SAM_FOR_PURCHASE): self._credit_sam,
            (P.CLA_PBOC, P.INS_SAM_BLOCKED_LIST): self._blocked_list,
            (P.CLA_PBOC, P.INS_SAM_PREVIOUS_SIGNATURE): self._previous_signature,
            (P.CLA_PBOC, P.INS_SAM_GET_TOTALS): self._totals,
            (P.CLA_PBOC, P.INS_SAM_READ_BATCH_RECORD): self._read_batch_record,
            (P.CLA_PBOC, P.INS_SAM_CLOSE_BATCH): self._close_batch_kept,
        }
        self.keep_pending = (self._credit_sam, self._previous_signature)

    def fci(self) -> bytes:
        if self._fci is None:  # built once: nothing in it changes after personalisation
            s = self.state
            self._fci = P.Fci(s.aid, s.label, s.currency_code, s.currency_exponent).build()
        return self._fci


    def to_state(self) -> dict[str, Any]:
        return self.state.to_json()

    def end_pending(self) -> None:
        self._pending = None

    def _read_binary(self, cmd: CommandAPDU) -> bytes:
        s = self.state
        return read_binary_sfi(cmd, {
            P.SFI_PSAM_TERMINAL_ID: s.terminal_id,
            P.SFI_PUBLIC_DATA: s.psam_serial + b"\x01\x01\x01\x00",
            P.SFI_PSAM_CURRENCY: P.PsamCurrency.build(
                {"currency_code": s.currency_code, "exponent": s.currency_exponent}),
        })

    def _find_key(self, issuer: bytes, version: int, algorithm: int) -> IssuerKey:
        """The issuer's key of that version, if the issuer knows the card's algorithm id as
        the key's algorithm; 9403 otherwise."""
        scheme = self.state.scheme_for(issuer)
        same = [k for k in self.state.keys if k.issuer_id == issuer and k.version == version]
        # a key personalised with exactly this id first: with an algorithm-id table, two keys
        # of one version (ids 00 and 01, both 3des) must not be taken for each other
        for k in sorted(same, key=lambda k: k.algorithm != algorithm):
            if scheme.accepts(k.algorithm, algorithm):
                return k
        raise CardError(SW.KEY_INDEX_NOT_SUPPORTED)

    def _init_sam(self, cmd: CommandAPDU) -> bytes:
        if cmd.p1 not in (0x00, 0x01) or cmd.p2 != 0:
            raise CardError(SW.WRONG_P1P2)
        size = len(cmd.data)
        if size in _FORMS_1C:
            req = P.InitSamForPurchaseData.parse(cmd.data[:0x1C])
            issuer, two_level, uid = self.state.default_issuer, False, cmd.data[0x1C:]
        elif size in _FORMS_24:
            req = P.InitSamForPurchaseData24.parse(cmd.data[:0x24])
            issuer, two_level, uid = req.issuer_id, True, cmd.data[0x24:]
        else:
            raise CardError(SW.WRONG_LENGTH)
        scheme = M.scheme(self.state.scheme_for(issuer).mac_scheme)
        if len(uid) != scheme.uid_size:  # a UID where the issuer's scheme has none, or none
            raise CardError(SW.WRONG_LENGTH)
        if req.txn_type not in (P.TYPE_EP_PURCHASE, P.TYPE_ED_PURCHASE,
                                P.TYPE_ED_CASH_WITHDRAWAL, P.TYPE_COMPOSITE_PURCHASE):
            raise CardError(SW.INCORRECT_DATA)
        if not (P.valid_date(req.date) and P.valid_time(req.time)):
            raise CardError(SW.INCORRECT_DATA)
        s = self.state
        if req.card_serial in s.blocked:
            raise CardError(SW.CONDITIONS_NOT_SATISFIED)
        if s.next_ttn > MAX_TTN:
            raise CardError(SW.COUNTER_AT_MAXIMUM)
        master = self._find_key(issuer, req.key_version, req.algorithm_id)
        dpk = crypto.card_key(master.key, req.card_serial, issuer if two_level else None)
        ttn = s.next_ttn
        sk = M.purchase_session_key(scheme, dpk, req.random, req.offline_counter, ttn)
        mac1 = M.purchase_mac1(scheme, sk, req.amount, req.txn_type, s.terminal_id, req.date,
                               req.time, uid)
        mac2 = M.purchase_mac2(scheme, sk, req.amount)
        pending = _Pending(ttn, sk, mac2, issuer, req.card_serial, req.offline_counter,
                           req.amount, req.txn_type, req.date, req.time)
        s.next_ttn = ttn + 1
        kept_previous = s.previous
        early = cmd.p1 == 0x01
        s.previous = Signature(ttn, mac1, mac2,
                               P.SIGNATURE_RELEASED if early else P.SIGNATURE_PENDING)
        # recorded now, in both forms: a purchase this PSAM signed for is in its batch even if
        # CREDIT SAM never comes (the host proves it later with the card's TAC)
        pending.index = s.records.append(self._record(pending, bytes(4), status=1))
        try:
            self.persist_change({"append": {"records": [s.records.hex_at(pending.index)]},
                                 "set": {"next_ttn": s.next_ttn,
                                         "previous": s.previous.to_json()}})
        except Exception:  # not persistent: answered 6F00, and nothing changed
            s.records.pop()
            s.next_ttn, s.previous = ttn, kept_previous
            raise
        if early:
            return P.InitSamAnswerEarly.build(
                {"terminal_txn_number": ttn, "mac1": mac1, "expected_mac2": mac2})
        self._pending = pending
        return P.InitSamAnswer.build({"terminal_txn_number": ttn, "mac1": mac1})

    def _record(self, p: _Pending, tac: bytes, status: int) -> bytes:
        return P.PsamRecord.build({
            "terminal_txn_number": p.ttn, "issuer_id": p.issuer_id, "card_serial": p.card_serial,
            "card_counter": p.card_counter, "amount": p.amount, "txn_type": p.txn_type,
            "terminal_id": self.state.terminal_id, "date": p.date, "time": p.time, "tac": tac,
            "status": status})

    def _credit_sam(self, cmd: CommandAPDU) -> bytes:
        pending, self._pending = self._pending, None
        if cmd.p1 != 0 or cmd.p2 != 0:
            raise CardError(SW.WRONG_P1P2)
        if pending is None:
            raise CardError(SW.CONDITIONS_NOT_SATISFIED)
        if len(cmd.data) == 4:
            mac2, tac = cmd.data, bytes(4)
        elif len(cmd.data) == 8:
            mac2, tac = cmd.data[:4], cmd.data[4:]
        else:
            raise CardError(SW.WRONG_LENGTH)
        if not hmac.compare_digest(mac2, pending.expected_mac2):
            raise CardError(SW.MAC_INVALID)
        s = self.state
        index = pending.index
        if not (0 <= index < len(s.records)
                and P.PsamRecord.parse(s.records[index]).terminal_txn_number == pending.ttn):
            raise CardError(SW.CONDITIONS_NOT_SATISFIED)  # the batch moved on: cannot happen
        kept_record, kept_previous = s.records[index], s.previous
        s.records.replace(index, self._record(pending, tac, status=0))
        s.previous = Signature(pending.ttn, s.previous.mac1, pending.expected_mac2,
                               P.SIGNATURE_CREDITED)
        try:
            self.persist_change({"put": {"records": [[index, s.records.hex_at(index)]]},
                                 "set": {"previous": s.previous.to_json()}})
        except Exception:
            s.records.replace(index, kept_record)
            s.previous = kept_previous
            raise
        return b""

    def _blocked_list(self, cmd: CommandAPDU) -> bytes:
        if cmd.p1 not in (0x01, 0x02) or cmd.p2 != 0:
            raise CardError(SW.WRONG_P1P2)
        if len(cmd.data) != 8:
            raise CardError(SW.WRONG_LENGTH)
        blocked = self.state.blocked
        was = cmd.data in blocked
        if cmd.p1 == 0x01:
            blocked.add(cmd.data)
        else:
            blocked.discard(cmd.data)
        try:
            self.persist_change({"add" if cmd.p1 == 0x01 else "remove": {
                "blocked": [cmd.data.hex().upper()]}})
        except Exception:
            (blocked.add if was else blocked.discard)(cmd.data)
            raise
        return b""

    def _close_batch_kept(self, cmd: CommandAPDU) -> bytes:
        """CLOSE BATCH (card/psam_batch.py), and if the closed batch could not be made
        persistent (6F00), the batch open again as it was: the host closes it again, and no
        batch is closed in memory that the host never got (the next close would drop it)."""
        s = self.state
        kept = s.records, s.closed_records, s.batch_number
        try:
            return self._close_batch(cmd)
        except Exception:
            s.records, s.closed_records, s.batch_number = kept
            raise

    def _previous_signature(self, cmd: CommandAPDU) -> bytes:
        if cmd.p1 or cmd.p2:
            raise CardError(SW.WRONG_P1P2)
        if cmd.data:
            raise CardError(SW.WRONG_LENGTH)
        p = self.state.previous
        return P.PreviousSignature.build({"terminal_txn_number": p.ttn, "mac1": p.mac1,
                                          "expected_mac2": p.expected_mac2, "state": p.state})
