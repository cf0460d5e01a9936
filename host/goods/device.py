"""The communication device of seed 000 (claims 1, 23, 24): a phone or PC with a card module.

It registers its key with the authentication server, waits for first messages (a long poll),
checks each one's signature (the authentication server's key, given to the device), shows it,
asks the customer to authorise and for the card's PIN, reads the card's identification and
sends authorisation, card id and the PIN sealed for the institution back; it then writes the
good it gets onto the card and says how the card answered.

Round trips once the device has the first message: TWO. The device asks the card for a
challenge (GET CHALLENGE) *before* it sends the authorisation, and the card then waits: the
answer to the authorisation carries the fulfilment server's write for that challenge, which the
card takes as its very next command (1); the card's status word goes back (2). A card pulled
or a write torn in between leaves the good pending at the fulfilment server: :meth:`pickup` at
the card's next contact writes it (goods the card already holds are only marked written).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from ...protocols import goods as G
from ...protocols import purse as P
from ...reader import Reader
from ..terminal import apdus
from ..terminal.capp import read_goods
from ..terminal.purse import Declined, call, card_uid, prove, read_log_info, select_purse
from . import wire as W
from .server.auth import MAX_OFFERED, digest
from .server.common import REPLY
from .server.payment import DIGITAL_FIELDS

FIRST_FIELDS: dict[str, W.Checker] = {
    **{k: DIGITAL_FIELDS[k] for k in ("order", "merchant", "name", "kind", "amount",
                                      "currency", "device", "record")},
    "seal_key": W.KEY, "terminal": W.TERMINAL_OR_NONE, "auth": W.IDENT, "created": W.SECONDS}
MAX_PICKUPS = 16
# a poll answers up to MAX_OFFERED signed first messages, each at most MAX_MESSAGE bytes: its
# answer is bounded by their sum (a full poll of 16 was over MAX_MESSAGE and was refused)
POLL_LIMIT = MAX_OFFERED * (W.MAX_MESSAGE + 256) + 1024
GOODS_WRITES = (b"\x04\xdc", b"\x04\xe2")   # secure-messaging UPDATE / APPEND RECORD
CAPP_CACHE = b"\x84\xde"                       # UPDATE CAPP DATA CACHE, MAC'd
CAPP_DEBIT = b"\x80\x54\x01\x00\x0f"            # DEBIT FOR CAPP PURCHASE


class DeviceError(Exception):
    """A server's refusal, an answer that is not signed, or a card that refused. ``status``:
    the authentication server's HTTP status (0 when there was none)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status

    @property
    def final(self) -> bool:
        """A definite refusal (a 4xx other than 429): asking again gets the same answer; a
        502/503, a 429, a lost link or a card error may go otherwise another time."""
        return 400 <= self.status < 500 and self.status != 429


@dataclass(frozen=True)
class FirstMessage:
    text: str
    fields: Mapping[str, Any]

    @property
    def order(self) -> str:
        return str(self.fields["order"])

    def show(self) -> str:
        f = self.fields
        return (f"order {f['order']} from {f['merchant']}: {f['name']} ({f['kind']}), "
                f"{f['amount']} minor units of currency {f['currency']}")


@dataclass
class Outcome:
    order: str | None
    paid: bool
    written: bool = False
    sw: int | None = None
    reason: str = ""


@dataclass
class Device:
    auth_url: str
    auth_id: str
    auth_public: bytes
    key: bytes = field(repr=False)
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=60))
    round_trips: int = 0
    proved: set[tuple[str, int]] = field(default_factory=set)   # (card, counter) proofs sent

    @property
    def id(self) -> str:
        return W.device_id(W.public_of(self.key))

    # --- talking to the authentication server ---------------------------------------------------
    def _post(self, path: str, domain: bytes, payload: dict[str, Any], *,
              signed_answer: bool = True, limit: int = W.MAX_MESSAGE) -> dict[str, Any]:
        body, headers = W.signed(self.key, self.id, domain, payload)
        try:
            answer = self.http.post(f"{self.auth_url}{path}", content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DeviceError(f"{self.auth_url}: {type(exc).__name__}: {exc}") from exc
        if answer.status_code != 200:
            raise DeviceError(f"the authentication server refused ({answer.status_code}): "
                              f"{_reason(answer)}", answer.status_code)
        if signed_answer and (answer.headers.get(W.SIGNER) != self.auth_id or not W.verify(
                self.auth_public, REPLY + domain, answer.content,
                answer.headers.get(W.SIGNATURE))):
            raise DeviceError("the answer is not signed by the authentication server")
        try:
            return W.canonical_load(answer.content, limit)
        except ValueError:
            raise DeviceError("the answer is not a JSON object") from None

    def register(self, label: str = "device") -> str:
        self._post("/v1/devices", W.REGISTRATION, {
            "public_key": W.public_of(self.key).hex(), "label": label, "created": _now()})
        return self.id

    def poll(self, wait: int = 25) -> list[FirstMessage]:
        """The first messages waiting for this device (waiting up to ``wait`` s for one);
        a message whose signature does not verify is dropped."""
        got = self._post("/v1/poll", W.POLL, {"device": self.id, "wait": wait,
                                              "created": _now()}, signed_answer=False,
                         limit=POLL_LIMIT)
        out = []
        for m in got.get("messages", [])[:64]:
            first = self.check_first(m.get("message"), m.get("signature"))
            if first is not None:
                out.append(first)
        return out

    def check_first(self, text: object, signature: object) -> FirstMessage | None:
        if not isinstance(text, str) or not W.verify(self.auth_public, W.FIRST_MESSAGE,
                                                     text.encode(), signature):
            return None
        try:
            fields = W.parse(text.encode(), FIRST_FIELDS, "first message")
        except W.MessageError:
            return None
        if fields["device"] != self.id or fields["auth"] != self.auth_id:
            return None
        return FirstMessage(text, fields)

    # --- the card -------------------------------------------------------------------------------
    def authorise(self, card: Reader, first: FirstMessage, pin: str, *,
                  approve: bool = True) -> Outcome:
        """Authorise (or decline) ``first``: the card's id and a challenge, one round trip for
        the payment and the write, the write, one round trip for its status word."""
        info = select_purse(card)
        if approve:
            _verify_pin(card, pin)
        challenge = call(card, apdus.get_challenge(4), "GET CHALLENGE")
        answer = self._post("/v1/authorisations", W.AUTHORISATION, {
            "order": first.order, "device": self.id, "approve": approve,
            "card": info.app_serial, "issuer": info.issuer_id, "first": digest(first.text),
            "pin": W.seal_pin(bytes.fromhex(first.fields["seal_key"]), pin, first.order,
                              info.app_serial),
            "challenge": challenge.hex().upper(), "created": _now()})
        self.round_trips += 1
        if answer.get("order") != first.order:
            raise DeviceError("the answer is about another order")
        if answer.get("paid") is not True:
            return Outcome(first.order, False, reason=str(answer.get("reason", "")))
        return self._write(card, first.order, info.app_serial, answer.get("apdu"))

    def _write(self, card: Reader, order: str, serial: str, apdu: object) -> Outcome:
        if not isinstance(apdu, str) or not W.APDU(apdu):
            return Outcome(order, True, reason="paid; the good waits for a pick-up")
        if bytes.fromhex(apdu)[:2] not in GOODS_WRITES:   # the card gets a goods write only
            return Outcome(order, True, reason="paid; the answer held no goods write: the "
                                               "good waits for a pick-up")
        sw = card.exchange(bytes.fromhex(apdu)).sw
        done = self._post("/v1/written", W.WRITTEN, {"order": order, "device": self.id,
                                                     "card": serial, "sw": sw,
                                                     "created": _now()})
        self.round_trips += 1
        return Outcome(order, True, sw == 0x9000 and done.get("state") == "written", sw)

    # --- the purse pays -----------------------------------------------------------------------
    def pay_with_purse(self, card: Reader, first: FirstMessage, pin: str | None = None,
                       ) -> Outcome:
        """Pay ``first`` from the card's purse: the good's record and the debit in one
        composite purchase. INITIALIZE FOR CAPP PURCHASE, one round trip for the MAC'd record
        and the PSAM's DEBIT command, both sent to the card, one round trip for the card's
        MAC2 and TAC (the only thing that pays the order). The card commits the good and the
        debit together or neither; an answer lost after DEBIT is settled by :meth:`pickup`."""
        terminal = str(first.fields["terminal"])
        if not terminal:
            raise DeviceError("the payment server takes no purse payments for this order")
        info = select_purse(card)
        if info.currency_code not in (None, first.fields["currency"]):
            raise DeviceError(f"the card's currency {info.currency_code} is not the order's")
        if pin is not None:
            _verify_pin(card, pin)
        self._prove_last(card, info.app_serial)
        uid = card_uid(card)   # before INITIALIZE: any other command ends its session
        init = call(card, apdus.initialize(G.INIT_CAPP_PURCHASE, P.PURSE_EP, 1,
                                           int(first.fields["amount"]), bytes.fromhex(terminal)),
                    "INITIALIZE FOR CAPP PURCHASE")
        answer = self._post("/v1/purse/debits", W.PURSE_DEBIT, {
            "order": first.order, "device": self.id, "card": info.app_serial,
            "issuer": info.issuer_id, "first": digest(first.text), "init": init.hex().upper(),
            "uid": uid.hex().upper(), "created": _now()})
        self.round_trips += 1
        cache, debit = answer.get("cache"), answer.get("debit")
        if answer.get("order") != first.order or not (
                isinstance(cache, str) and W.APDU(cache) and isinstance(debit, str)
                and W.APDU(debit)):
            raise DeviceError("the answer holds no composite purchase for this order")
        cache_apdu, debit_apdu = bytes.fromhex(cache), bytes.fromhex(debit)
        if cache_apdu[:2] != CAPP_CACHE or debit_apdu[:5] != CAPP_DEBIT:
            raise DeviceError("the answer holds other commands than a composite purchase")
        sw = card.exchange(cache_apdu).sw
        if sw != 0x9000:   # the card dropped the session: nothing committed
            return Outcome(first.order, False, sw=sw, reason=f"the card refused the record "
                                                               f"({sw:04X}): nothing paid")
        done = card.exchange(debit_apdu)
        if not done.ok:
            return Outcome(first.order, False, sw=done.sw, reason=f"the card refused the "
                                                                  f"debit ({done.sw:04X})")
        proof = P.DebitForPurchaseAnswer.parse(done.data)
        counter = P.InitForPurchaseAnswer.parse(init).offline_counter
        paid = self._prove(info.app_serial, counter, proof.mac2, proof.tac)
        self.proved.add((info.app_serial, counter))
        return Outcome(first.order, paid.get("paid") is True, paid.get("paid") is True,
                       done.sw, "paid by the purse, good written with the debit")

    def _prove(self, serial: str, counter: int, mac2: bytes, tac: bytes) -> dict[str, Any]:
        answer = self._post("/v1/purse/proofs", W.PURSE_PROOF, {
            "device": self.id, "card": serial, "counter": counter, "mac2": mac2.hex().upper(),
            "tac": tac.hex().upper(), "created": _now()})
        self.round_trips += 1
        return answer

    def _prove_last(self, card: Reader, serial: str) -> None:
        """Before a new purchase: the card's last transaction, if a composite purchase whose
        proof this device has not sent (its answer was lost), is proved first: GET TRANSACTION
        PROVE answers for the last transaction only, so after this purchase it could not be."""
        answer = card.exchange(apdus.read_record(1))
        if not answer.ok or len(answer.data) != P.LOG_RECORD_SIZE:
            return
        last = P.LogRecord.parse(answer.data)
        if last.txn_type != P.TYPE_COMPOSITE_PURCHASE or (serial, last.counter) in self.proved:
            return
        proof = prove(card, P.TYPE_COMPOSITE_PURCHASE, last.counter)
        if proof is not None:
            try:
                self._prove(serial, last.counter, *proof)
            except DeviceError as exc:   # 409: no order's purchase (another terminal's),
                if not _no_such_purchase(exc):   # passed on by the authentication server;
                    raise   # else not decided: no new purchase over a proof still to give
        self.proved.add((serial, last.counter))

    def settle_purse(self, card: Reader) -> Outcome | None:
        """The card's last transaction, if a composite purchase, proved to the payment server
        (GET TRANSACTION PROVE: the card's MAC2 and TAC): a purchase whose answer was lost
        is paid now, once. None when there is nothing to prove or nobody's order matches."""
        info, log = read_log_info(card)
        if not log or log[0].txn_type != P.TYPE_COMPOSITE_PURCHASE:
            return None
        proof = prove(card, P.TYPE_COMPOSITE_PURCHASE, log[0].counter)
        if proof is None:
            return None
        try:
            answer = self._prove(info.app_serial, log[0].counter, *proof)
        except DeviceError:   # no order of ours at that counter (409): nothing to settle
            return None
        self.proved.add((info.app_serial, log[0].counter))
        order = answer.get("order")
        return Outcome(order if isinstance(order, str) else None, answer.get("paid") is True,
                       answer.get("paid") is True, 0x9000, "settled from the card's proof")

    def pickup(self, card: Reader) -> list[Outcome]:
        """The card's next contact: a composite purchase whose answer was lost is proved;
        every good paid for it and not yet on it is written."""
        out: list[Outcome] = []
        settled = self.settle_purse(card)
        if settled is not None:
            out.append(settled)
        for _ in range(MAX_PICKUPS):
            info = select_purse(card)
            held = "".join(sorted({e.record[2:18].hex().upper()
                                   for e in read_goods(card)})[:W.MAX_HELD])
            select_purse(card)
            challenge = call(card, apdus.get_challenge(4), "GET CHALLENGE")
            answer = self._post("/v1/pickups", W.PICKUP, {
                "device": self.id, "card": info.app_serial, "issuer": info.issuer_id,
                "challenge": challenge.hex().upper(), "held": held, "created": _now()})
            self.round_trips += 1
            order = answer.get("order")
            if not isinstance(order, str) or answer.get("apdu") is None:
                break
            out.append(self._write(card, order, info.app_serial, answer.get("apdu")))
            if out[-1].sw != 0x9000:
                break
        return out


def _no_such_purchase(exc: DeviceError) -> bool:
    """Whether a proof was refused for good (no order's purchase answered with that MAC2: the
    payment server's 409, passed on by the authentication server with its status), not
    because a server did not answer."""
    return exc.final


def _verify_pin(card: Reader, pin: str) -> None:
    """The card checks its PIN (security information): a wrong one stops here; a card
    without a PIN check for its EP answers something else, and only the institution checks."""
    if not (pin.isdigit() and 4 <= len(pin) <= 12):
        raise DeviceError("a PIN is 4 to 12 digits")
    try:
        call(card, apdus.verify_pin(pin), "VERIFY PIN")
    except Declined as exc:
        if exc.sw & 0xFFF0 == 0x63C0 or exc.sw == 0x6983:
            raise DeviceError(str(exc)) from None


def _reason(answer: httpx.Response) -> str:
    try:
        data = answer.json()
        return str(data.get("reason", ""))[:200] if isinstance(data, dict) else ""
    except ValueError:
        return answer.text[:200]


def _now() -> int:
    return int(time.time())
