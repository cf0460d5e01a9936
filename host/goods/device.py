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

from ...reader import Reader
from ..terminal import apdus
from ..terminal.capp import read_goods
from ..terminal.purse import Declined, call, select_purse
from . import wire as W
from .server.auth import digest
from .server.common import REPLY
from .server.payment import DIGITAL_FIELDS

FIRST_FIELDS: dict[str, W.Checker] = {
    **{k: DIGITAL_FIELDS[k] for k in ("order", "merchant", "name", "kind", "amount",
                                      "currency", "device", "record")},
    "seal_key": W.KEY, "auth": W.IDENT, "created": W.SECONDS}
MAX_PICKUPS = 16
GOODS_WRITES = (b"\x04\xdc", b"\x04\xe2")   # secure-messaging UPDATE / APPEND RECORD


class DeviceError(Exception):
    """A server's refusal, an answer that is not signed, or a card that refused."""


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

    @property
    def id(self) -> str:
        return W.device_id(W.public_of(self.key))

    # --- talking to the authentication server ---------------------------------------------------
    def _post(self, path: str, domain: bytes, payload: dict[str, Any], *,
              signed_answer: bool = True) -> dict[str, Any]:
        body, headers = W.signed(self.key, self.id, domain, payload)
        try:
            answer = self.http.post(f"{self.auth_url}{path}", content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DeviceError(f"{self.auth_url}: {type(exc).__name__}: {exc}") from exc
        if answer.status_code != 200:
            raise DeviceError(f"the authentication server refused ({answer.status_code}): "
                              f"{_reason(answer)}")
        if signed_answer and (answer.headers.get(W.SIGNER) != self.auth_id or not W.verify(
                self.auth_public, REPLY + domain, answer.content,
                answer.headers.get(W.SIGNATURE))):
            raise DeviceError("the answer is not signed by the authentication server")
        try:
            return W.canonical_load(answer.content)
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
                                              "created": _now()}, signed_answer=False)
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

    def pickup(self, card: Reader) -> list[Outcome]:
        """The card's next contact: every good paid for it and not yet on it is written."""
        out: list[Outcome] = []
        for _ in range(MAX_PICKUPS):
            info = select_purse(card)
            held = sorted({e.record[2:18].hex().upper() for e in read_goods(card)})
            select_purse(card)
            challenge = call(card, apdus.get_challenge(4), "GET CHALLENGE")
            answer = self._post("/v1/pickups", W.PICKUP, {
                "device": self.id, "card": info.app_serial, "issuer": info.issuer_id,
                "challenge": challenge.hex().upper(), "held": held[:64], "created": _now()})
            self.round_trips += 1
            order = answer.get("order")
            if not isinstance(order, str) or answer.get("apdu") is None:
                break
            out.append(self._write(card, order, info.app_serial, answer.get("apdu")))
            if out[-1].sw != 0x9000:
                break
        return out


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
