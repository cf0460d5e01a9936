"""Differential testing of two IEP cards: the same random APDU sequence to both, every answer
(data and status word) compared.

The reference is the Python card (``svcard.card.iep``); the other is the Java Card applet in
jCardSim, or a second Python card (to test this harness). A run is a series of episodes: each
one personalises both cards from the same random image (balances, limits, counters near their
maximum, PIN and tries, MAC-failure limit, a fixed card random so both answer the same MACs),
then plays random operations on them:

- valid commands with random fields (purchases and loads with right MACs, computed here the
  plain way from the image's keys and the reference's INITIALIZE answer; queries; PIN);
- the same with wrong MACs, wrong dates, fields changed after the MAC, wrong lengths,
  truncations, extra bytes, random CLA/INS/P1/P2, random bodies;
- commands out of order (completions without or after the wrong INITIALIZE), power cycles.

The first differing answer raises :class:`Mismatch` naming the seed, the step, the APDU, both
answers and the exchanges before it; ``run(count, seed)`` replays exactly.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from conftest import demo_image
from plain import plain_mac, tdes_encrypt_block

from svcard.card.image import card_from_image
from svcard.protocols import mac_schemes

AID = bytes.fromhex("F05356434152440101")
RESET = None          # an operation yields this to power-cycle both cards

# what the applet leaves out of the Python card (a prefix here is not sent): GET CHALLENGE and
# the secure-messaging goods writes (04 DC / 04 E2; 00 DC / 00 E2 answer 6982), issue 12, not
# in the applet yet; likewise the composite (CAPP) purchase's INITIALIZE (80 50 03) and UPDATE
# CAPP DATA CACHE (80 DC, and the MAC'd 84 DE), and the goods files (the Python card of an
# episode has none, so its READ RECORD of SFI 11-14 answers 6A82 as the applet does)
# every CLA 04 (secure messaging) APDU: the IEP handles that class itself, the applet leaves it
# to the platform (6882)
APPLET_LEFT_OUT: tuple[bytes, ...] = (b"\x00\x84", b"\x04", b"\x00\xdc", b"\x00\xe2",
                                      b"\x80\x50\x03", b"\x80\xdc", b"\x84\xde")

# an operation: yields (label, APDU or RESET), receives the reference's answer
Op = Generator[tuple[str, bytes | None], bytes, None]


class CardLike(Protocol):
    def transmit(self, apdu: bytes) -> bytes: ...


@dataclass
class Side:
    """One card of the pair: how to talk to it, power-cycle it and let it go. ``platform``
    (optional) knows the card's platform: APDUs not to send and differences that are not the
    application's (see :class:`JCardSimRuntime`)."""

    name: str
    transmit: Callable[[bytes], bytes]
    reset: Callable[[], None]
    close: Callable[[], None] = lambda: None
    platform: JCardSimRuntime | None = None


class JCardSimRuntime:
    """What jCardSim's runtime (``SimulatorRuntime.transmitCommand``, commit b6218da) answers
    or does itself, before or instead of the applet - not the applet's behaviour:

    - an APDU with CLA ``000000xx``, INS A4, P1 04 and P2 ``000xxx00`` is a selection: with no
      data (case 1/2) it selects the first applet, with an AID that matches ours (whole or
      partial) it selects the applet; the Python card selects only with CLA 00, P2 00/0C and
      1..16 bytes of AID, and answers the others 6700/6A86/6E00 keeping its session. Those
      other forms are not sent (the two cards would go on from different states);
    - with no applet selected the runtime answers every command 6986, and a SELECT of an AID it
      does not know 6999 (the Python card: 6985 / 6A82 and its CLA checks);
    - an extended-length APDU is refused 6700 (the applet is not ExtendedLength), and one too
      short for its length bytes makes jCardSim raise ArrayIndexOutOfBoundsException.

    ``left_out``: APDU prefixes of commands the applet does not implement (not sent).
    """

    def __init__(self, aid: bytes, left_out: tuple[bytes, ...] = ()) -> None:
        self.aid = aid
        self.left_out = left_out
        self.selected = False

    def _selection(self, apdu: bytes) -> bool:
        return (len(apdu) >= 4 and apdu[0] & 0xFC == 0 and apdu[1] == 0xA4 and apdu[2] == 4
                and apdu[3] & 0xE3 == 0 and not _extended(apdu))

    def _selects(self, apdu: bytes) -> bool:
        if not self._selection(apdu):
            return False
        if len(apdu) <= 5:
            return True                         # case 1/2: the first applet
        data = apdu[5:5 + apdu[4]]
        return bool(data) and self.aid.startswith(data) if len(data) <= len(self.aid) \
            else False

    def skip(self, apdu: bytes) -> str | None:
        """Why ``apdu`` is not sent, or None."""
        if any(apdu.startswith(prefix) for prefix in self.left_out):
            return "a command the applet leaves out"
        plain = (apdu[:1] == b"\x00" and len(apdu) > 5 and apdu[3] in (0x00, 0x0C)
                 and 1 <= apdu[4] <= 16 and len(apdu) in (5 + apdu[4], 6 + apdu[4]))
        if self._selection(apdu) and not plain:
            return "a SELECT form jCardSim's runtime handles itself"
        return None

    def excuse(self, apdu: bytes, answer: bytes | str) -> str | None:
        """Why the difference is the runtime's, or None (an application difference)."""
        if isinstance(answer, str):
            # an exception out of transmitCommand is the runtime's (the applet's become 6F00)
            if _extended(apdu) and "ArrayIndexOutOfBoundsException" in answer:
                return "malformed extended length: jCardSim raises"
            return None
        if not self.selected and answer in (b"\x69\x86", b"\x69\x99"):
            return "no applet selected: jCardSim answers 6986/6999"
        if _extended(apdu) and answer == b"\x67\x00":
            return "extended length: jCardSim answers 6700"
        return None

    def after(self, apdu: bytes) -> None:
        if self._selects(apdu):
            self.selected = True

    def reset(self) -> None:
        self.selected = False


def _extended(apdu: bytes) -> bool:
    """An extended-length APDU, as jCardSim's ApduCase sees it (byte 5 is 00, more follows)."""
    return len(apdu) > 5 and apdu[4] == 0


Opener = Callable[[dict[str, Any]], Side]


class Mismatch(AssertionError):
    """The two cards answered one APDU differently."""


def python_side(image: dict[str, Any], name: str = "python") -> Side:
    card = card_from_image(copy.deepcopy(image))

    def reset() -> None:
        card.reset()

    return Side(name, card.transmit, reset)


# --- random images -----------------------------------------------------------------------------

def _pick(rng: random.Random, *choices: Any) -> Any:
    return rng.choice(choices)


def random_image(rng: random.Random) -> dict[str, Any]:
    """The demo IEP image with random balances, limit, counters, PIN state and lockout limit."""
    image = demo_image("iep")
    app = image["app"]
    app["goods"] = {"files": []}   # no goods files: the applet has none yet (APPLET_LEFT_OUT)
    limit = _pick(rng, 100_000, 100_000, 5_000, 0xFFFFFFFF, 0x7FFFFFFF)
    app["balance_limit"] = limit
    for purse in ("ep", "ed"):
        app[purse]["balance"] = _pick(rng, 0, 1, rng.randrange(0, min(limit, 100_000) + 1),
                                      limit, max(limit - 1, 0), min(limit, 20_000))
        app[purse]["online_counter"] = _pick(rng, 0, 0, 0, 0, rng.randrange(0x10000), 0xFFFE,
                                             0xFFFF)
        app[purse]["offline_counter"] = _pick(rng, 0, 0, 0, 0, rng.randrange(0x10000), 0xFFFE,
                                              0xFFFF)
    pin = "".join(rng.choice("0123456789") for _ in range(rng.choice((4, 5, 6, 6, 6, 12))))
    app["pin"] = pin
    app["pin_try_limit"] = _pick(rng, 3, 3, 1, 5)
    app["pin_tries_left"] = _pick(rng, *[app["pin_try_limit"]] * 5, 1, 0)
    app["mac_failure_limit"] = _pick(rng, 15, 15, 1, 2, 3)
    app["fixed_random"] = rng.randbytes(4).hex().upper()
    if rng.random() < 0.5:
        _random_extras(rng, app)
    return image


def _random_extras(rng: random.Random, app: dict[str, Any]) -> None:
    """Other keys (indexes, versions, algorithm ids), a used log, a proof, counted MAC failures,
    overdraft limits, label, currency, files and UID."""
    def keys(count: int) -> list[dict[str, Any]]:
        indexes = rng.sample([1, 1, 2, 3, 0, 7, 255, rng.randrange(256)], count)
        return [{"index": i, "version": rng.randrange(256), "algorithm": _pick(rng, 0, 1, 2),
                 "key": rng.randbytes(16).hex().upper()} for i in dict.fromkeys(indexes)]

    app["purchase_keys"] = keys(rng.randrange(1, 5))
    app["load_keys"] = keys(rng.randrange(1, 4))
    app["tac_key"] = rng.randbytes(16).hex().upper()
    limit = app["mac_failure_limit"]
    for name, kind in (("purchase_mac_failures", "purchase_keys"),
                       ("load_mac_failures", "load_keys")):
        app[name] = {str(k["index"]): rng.randrange(limit + 1) for k in app[kind]
                     if rng.random() < 0.3}
    for purse in ("ep", "ed"):
        app[purse]["overdraft_limit"] = _pick(rng, 0, 0, rng.randrange(0x1000000), 0xFFFFFF)
    records = [bytes([rng.randrange(256), rng.randrange(256)]) + rng.randbytes(3)
               + rng.randbytes(4) + bytes([_pick(rng, 1, 2, 4, 5, 6)]) + rng.randbytes(13)
               for _ in range(rng.randrange(0, 13))]
    app["log"] = [r.hex().upper() for r in records[:10]]
    if records and rng.random() < 0.7:
        app["proof"] = {"txn_type": records[0][9], "counter": int.from_bytes(records[0][:2],
                        "big"), "mac": rng.randbytes(4).hex(), "tac": rng.randbytes(4).hex()}
    app["label"] = "".join(rng.choice("ABCDEFGHIJ XYZ/-09") for _ in range(rng.randrange(1, 17)))
    app["currency_code"] = _pick(rng, 156, 344, 840, 978, rng.randrange(1000))
    app["currency_exponent"] = _pick(rng, 2, 0, 3)
    app["public_data"] = rng.randbytes(30).hex().upper()
    app["holder_data"] = rng.randbytes(55).hex().upper()
    app["uid"] = _pick(rng, None, rng.randbytes(9).hex().upper(), rng.randbytes(4).hex().upper())
    app["unload_keys"] = keys(rng.randrange(0, 3))
    app["update_keys"] = keys(rng.randrange(0, 3))
    for name, kind in (("unload_mac_failures", "unload_keys"),
                       ("update_mac_failures", "update_keys")):
        app[name] = {str(k["index"]): rng.randrange(limit + 1) for k in app[kind]
                     if rng.random() < 0.3}
    app["log_counter"] = _pick(rng, "before", "after")
    if rng.random() < 0.3:
        app["mac_scheme"], app["uid"] = "changsha-metro", rng.randbytes(9).hex().upper()


# --- the operations ----------------------------------------------------------------------------

def _u4(v: int) -> bytes:
    return (v & 0xFFFFFFFF).to_bytes(4, "big")


@dataclass
class Model:
    """What the generator knows: the image's keys and PIN, and the reference's answers."""

    rng: random.Random
    image: dict[str, Any]
    pin: str = ""
    balance: dict[int, int] = field(default_factory=dict)
    counters: list[int] = field(default_factory=lambda: [0])
    last_value: tuple[int, int] | None = None   # (type, counter) of the last value change

    def __post_init__(self) -> None:
        app = self.image["app"]
        self.pin = app["pin"]
        self.purchase_keys = {k["index"]: bytes.fromhex(k["key"]) for k in app["purchase_keys"]}
        self.load_keys = {k["index"]: bytes.fromhex(k["key"]) for k in app["load_keys"]}
        self.unload_keys = {k["index"]: bytes.fromhex(k["key"])
                            for k in app.get("unload_keys") or []}
        self.update_keys = {k["index"]: bytes.fromhex(k["key"])
                            for k in app.get("update_keys") or []}
        self.scheme = mac_schemes.scheme(app.get("mac_scheme") or "pboc")
        self.uid = bytes.fromhex(app["uid"]) if app.get("uid") else None
        self.tac_key = bytes.fromhex(app["tac_key"])
        self.balance = {2: app["ep"]["balance"], 1: app["ed"]["balance"]}

    # random fields
    def amount(self, purse: int) -> int:
        have = max(self.balance.get(purse, 0), 0)    # a hint: the last balance seen
        r = self.rng
        if r.random() < 0.7:
            return r.randrange(0, min(have, 5000) + 1)
        return int(_pick(r, 0, 1, have, have + 1, max(have - 1, 0), r.randrange(0, 0x100000000),
                         0xFFFFFFFF)) & 0xFFFFFFFF

    def key_index(self) -> int:
        if self.rng.random() < 0.8:
            return int(self.rng.choice(list(self.purchase_keys)))
        return int(_pick(self.rng, 1, 2, 0, 3, self.rng.randrange(256)))

    def purse(self) -> int:
        return int(_pick(self.rng, *[2] * 14, *[1] * 5, 0, 3))

    def tid(self) -> bytes:
        return _pick(self.rng, bytes.fromhex("112233445566"), self.rng.randbytes(6))

    def date_time(self) -> tuple[bytes, bytes]:
        """A random date and time, one in four at or just past a calendar edge."""
        r = self.rng
        date = f"{r.randrange(1900, 2100):04d}{r.randrange(1, 13):02d}{r.randrange(1, 29):02d}"
        time = f"{r.randrange(24):02d}{r.randrange(60):02d}{r.randrange(60):02d}"
        if r.random() < 0.25:
            edge_dates = ("20000229", "21000229", "19000229", "20240229", "20250229", "20271231",
                          "20000229", "21000229", "19000229",
                          "20271232", "20270431", "20270430", "20271399", "20270001", "20270100",
                          "2027AB01", "0000010A", "99991231", "20270230")
            edge_times = ("235959", "240000", "236000", "235960", "000000", "2359FA", "0A0000",
                          "000060", "235960")
            if r.random() < 0.6:
                date = r.choice(edge_dates)
            else:
                time = r.choice(edge_times)
        return bytes.fromhex(date), bytes.fromhex(time)

    def pin_bytes(self, pin: str) -> bytes:
        return bytes.fromhex(pin + ("F" if len(pin) % 2 else ""))

    def corrupt(self, apdu: bytes) -> tuple[str, bytes]:
        """A malformed or changed copy of a valid APDU."""
        r = self.rng
        data = bytearray(apdu)
        how = r.randrange(10)
        if how == 8:   # the same header with command data it does not take (or other data)
            body = r.randbytes(r.randrange(1, 12))
            le = bytes([data[4]]) if len(data) == 5 else b""
            return "data added", bytes(data[:4]) + bytes([len(body)]) + body + le
        if how == 9 and len(data) > 5:   # the data dropped, the Le kept
            return "data dropped", bytes(data[:4]) + bytes([data[-1]])
        if how == 0:
            return "truncated", bytes(data[: r.randrange(len(data))])
        if how == 1:
            return "extra byte", bytes(data) + r.randbytes(1)
        if how == 2 and len(data) > 4:
            data[4] = (data[4] + r.choice((-1, 1, 2, -2))) & 0xFF
            return "wrong Lc", bytes(data)
        if how == 3 and len(data) > 5:
            return "Le dropped", bytes(data[:-1])
        if how == 4:
            data[r.randrange(4)] = r.randrange(256)
            return "header byte", bytes(data)
        if how == 5 and len(data) > 5:
            i = r.randrange(5, len(data))
            data[i] ^= 1 << r.randrange(8)
            return "bit flip", bytes(data)
        if how == 6 and len(data) > 5:
            return "Le changed", bytes(data[:-1]) + bytes([r.randrange(256)])
        return "random body", bytes(data[:5]) + r.randbytes(max(len(data) - 5, 0))

    def maybe(self, label: str, apdu: bytes, p: float = 0.15) -> tuple[str, bytes]:
        if self.rng.random() < p:
            how, bad = self.corrupt(apdu)
            return f"{label} ({how})", bad
        return label, apdu


def op_plain_select(m: Model) -> Op:
    yield "select", b"\x00\xa4\x04\x00" + bytes([len(AID)]) + AID + b"\x00"


def op_select(m: Model) -> Op:
    r = m.rng
    choice = r.randrange(9)
    if choice == 0:
        yield "select partial", b"\x00\xa4\x04\x00" + bytes([5]) + AID[:5] + b"\x00"
    elif choice == 1:
        other = r.randbytes(r.randrange(1, 17))
        yield "select other", b"\x00\xa4\x04\x00" + bytes([len(other)]) + other + b"\x00"
    elif choice == 2:
        yield "select p2", b"\x00\xa4\x04" + bytes([r.choice((0x04, 0x0C, 0x02))]) + \
            bytes([len(AID)]) + AID + b"\x00"
    else:
        yield m.maybe("select", b"\x00\xa4\x04\x00" + bytes([len(AID)]) + AID + b"\x00", 0.1)


def op_query(m: Model) -> Op:
    r = m.rng
    choice = r.randrange(7)
    if choice == 0:
        yield m.maybe("get balance", bytes([0x80, 0x5C, _pick(r, 0, 0, 0, 1), m.purse(),
                                            _pick(r, 4, 4, 4, 0, 8, 2)]))
    elif choice == 1:
        sfi = _pick(r, 0x95, 0x96, 0x95, 0x96, 0x97, 0x98, 0x15, 0x80 | r.randrange(32),
                    r.randrange(256))
        yield m.maybe("read binary", bytes([0x00, 0xB0, sfi, _pick(r, 0, 0, r.randrange(60)),
                                            _pick(r, 0, 0, r.randrange(1, 60))]))
    elif choice == 2:
        p2 = _pick(r, 0xC4, 0xC4, 0xC4, 0xC0, 0xCC, 0xC5, r.randrange(256))
        yield m.maybe("read record", bytes([0x00, 0xB2, _pick(r, 1, 2, r.randrange(0, 13)),
                                            p2, _pick(r, 0x17, 0x17, 0, 0x10, 0x18)]))
    elif choice == 3:
        tag = _pick(r, (0x9F, 0x77), (0x9F, 0x77), (0x9F, 0x76), (0, 0), (0, 0),
                    (r.randrange(256), r.randrange(256)))
        yield m.maybe("get data", bytes([0x80, 0xCA, *tag, _pick(r, 0, 0, 7, 4)]))
    elif choice == 4:
        txn_type = _pick(r, 2, 6, 1, 5, 4, 2, 6, 0, 3, 7, 8, r.randrange(256))
        counter = _pick(r, *m.counters, 0, r.randrange(0x10000))
        if m.last_value and r.random() < 0.6:
            txn_type, counter = m.last_value
        yield m.maybe("get transaction prove", bytes([0x80, 0x5A, 0, txn_type, 2])
                      + counter.to_bytes(2, "big") + bytes([_pick(r, 8, 8, 0)]))
    elif choice == 5:
        yield m.maybe("get response", bytes([0x00, 0xC0, 0, 0, r.randrange(256)]))
    else:
        yield "verify tries", _pick(r, b"\x00\x20\x00\x00", b"\x00\x20\x00\x00\x00")


def op_pin(m: Model) -> Op:
    r = m.rng
    choice = r.randrange(5)
    if choice <= 1:
        pin = m.pin if choice == 0 or r.random() < 0.5 else \
            "".join(r.choice("0123456789") for _ in range(r.randrange(4, 13)))
        body = m.pin_bytes(pin)
        yield m.maybe("verify", b"\x00\x20\x00\x00" + bytes([len(body)]) + body)
    elif choice == 2:
        body = r.randbytes(_pick(r, 0, 1, 2, 3, 6, 7, 8))
        yield "verify junk", b"\x00\x20\x00" + bytes([_pick(r, 0, 0, 1)]) + \
            (bytes([len(body)]) + body if body else b"")
    else:
        new = "".join(r.choice("0123456789") for _ in range(_pick(r, 4, 6, 6, 12, 3, 13)))
        old = m.pin if r.random() < 0.8 else "0000"
        body = m.pin_bytes(old) + b"\xff" + (m.pin_bytes(new) if len(new) <= 12 else
                                              bytes.fromhex(new[:12]) + b"\x1f")
        label, apdu = m.maybe("change pin", b"\x80\x5E\x01\x00" + bytes([len(body)]) + body)
        answer = yield label, apdu
        if label == "change pin" and answer[-2:] == b"\x90\x00":
            m.pin = new


def _verify(m: Model) -> Op:
    body = m.pin_bytes(m.pin)
    yield "verify", b"\x00\x20\x00\x00" + bytes([len(body)]) + body


def op_purchase(m: Model) -> Op:
    r = m.rng
    purse = m.purse()
    p1 = _pick(r, *[1] * 12, 2, 2, 2, 0x06)   # 06: no such INITIALIZE (03 is the CAPP one)
    if purse == 1 and r.random() < 0.7:
        yield from _verify(m)
    amount = m.amount(purse)
    key_index = m.key_index()
    tid = m.tid()
    init = bytes([0x80, 0x50, p1, purse, 0x0B, key_index]) + _u4(amount) + tid + b"\x0f"
    label, init = m.maybe("init purchase", init, 0.1)
    answer = yield label, init
    if r.random() < 0.15:   # something else in between, or the wrong completion
        yield from r.choice((op_query, op_select, op_credit_only))(m)
    ttn = r.randrange(0x100000000)
    date, time = m.date_time()
    txn_type = {(1, 2): 6, (1, 1): 5, (2, 1): 4}.get((p1, purse), 6)
    mac1 = bytes(4)
    if answer[-2:] == b"\x90\x00" and len(answer) == 17 and key_index in m.purchase_keys:
        random_, counter = answer[11:15], answer[4:6]
        m.balance[purse] = int.from_bytes(answer[0:4], "big")
        m.counters = [int.from_bytes(counter, "big")]
        fault = r.randrange(10)
        mac_amount = (amount + 1) & 0xFFFFFFFF if fault == 0 else amount
        mac_tid = r.randbytes(6) if fault == 1 else tid
        if m.scheme.uid_size:    # another MAC-scheme profile: svcard's own code makes MAC1
            sk = mac_schemes.purchase_session_key(m.scheme, m.purchase_keys[key_index], random_,
                                                  int.from_bytes(counter, "big"), ttn)
            mac1 = mac_schemes.purchase_mac1(m.scheme, sk, mac_amount, txn_type, mac_tid, date,
                                             time, m.uid)
        else:
            sk = tdes_encrypt_block(m.purchase_keys[key_index],
                                    random_ + counter + _u4(ttn)[2:])
            mac1 = plain_mac(sk, _u4(mac_amount) + bytes([txn_type]) + mac_tid + date + time)
        if fault == 2:
            mac1 = bytes([mac1[0] ^ 0x80]) + mac1[1:]
        if fault == 3:
            ttn ^= 1
    elif r.random() < 0.5:
        mac1 = r.randbytes(4)
    debit = b"\x80\x54" + (b"\x01\x00" if r.random() < 0.9 else r.choice(
        (b"\x00\x00", b"\x02\x00", b"\x01\x01", b"\x03\x00")))
    debit += b"\x0f" + _u4(ttn) + date + time + mac1 + b"\x08"
    label, debit = m.maybe("debit", debit, 0.1)
    answer = yield label, debit
    if answer[-2:] == b"\x90\x00" and label == "debit":
        m.balance[purse] = m.balance.get(purse, 0) - amount
        m.last_value = (txn_type, m.counters[0])


def op_unload(m: Model) -> Op:
    """INITIALIZE FOR UNLOAD (80 50 05 01) and DEBIT FOR UNLOAD (80 54 03 00) with MAC2."""
    r = m.rng
    purse = _pick(r, *[1] * 8, 2)
    if r.random() < 0.8:
        yield from _verify(m)
    amount = m.amount(1)
    key_index = r.choice(list(m.unload_keys)) if m.unload_keys and r.random() < 0.85 else \
        _pick(r, 1, 2, r.randrange(256))
    tid = m.tid()
    label, init = m.maybe("init unload", bytes([0x80, 0x50, 0x05, purse, 0x0B, key_index])
                          + _u4(amount) + tid + b"\x10", 0.1)
    answer = yield label, init
    date, time = m.date_time()
    mac2 = r.randbytes(4)
    if answer[-2:] == b"\x90\x00" and len(answer) == 18 and key_index in m.unload_keys:
        random_, counter = answer[8:12], answer[4:6]
        sk = tdes_encrypt_block(m.unload_keys[key_index], random_ + counter + b"\x80\x00")
        fault = r.randrange(8)
        mac2 = plain_mac(sk, _u4(amount + (fault == 0)) + b"\x03" + tid + date + time)
        if fault == 1:
            mac2 = bytes([mac2[0] ^ 4]) + mac2[1:]
        m.counters = [int.from_bytes(counter, "big")]
    label, debit = m.maybe("debit unload", b"\x80\x54\x03\x00\x0b" + date + time + mac2
                           + b"\x04", 0.1)
    answer = yield label, debit
    if answer[-2:] == b"\x90\x00" and label == "debit unload":
        m.last_value = (3, m.counters[0])


def op_update(m: Model) -> Op:
    """INITIALIZE FOR UPDATE (80 50 04 01) and UPDATE OVERDRAFT LIMIT (80 58 00 00) with MAC2."""
    r = m.rng
    purse = _pick(r, *[1] * 8, 2)
    if r.random() < 0.8:
        yield from _verify(m)
    key_index = r.choice(list(m.update_keys)) if m.update_keys and r.random() < 0.85 else \
        _pick(r, 1, 2, r.randrange(256))
    tid = m.tid()
    label, init = m.maybe("init update", bytes([0x80, 0x50, 0x04, purse, 0x07, key_index])
                          + tid + b"\x13", 0.1)
    answer = yield label, init
    date, time = m.date_time()
    limit = _pick(r, 0, r.randrange(0x1000000), 0xFFFFFF, r.randrange(10_000))
    mac2 = r.randbytes(4)
    if answer[-2:] == b"\x90\x00" and len(answer) == 21 and key_index in m.update_keys:
        random_, counter = answer[11:15], answer[4:6]
        sk = tdes_encrypt_block(m.update_keys[key_index], random_ + counter + b"\x80\x00")
        fault = r.randrange(8)
        mac2 = plain_mac(sk, (limit ^ (fault == 0)).to_bytes(3, "big") + b"\x07" + tid + date
                         + time)
        if fault == 1:
            mac2 = bytes([mac2[0] ^ 4]) + mac2[1:]
        m.counters = [int.from_bytes(counter, "big")]
    label, update = m.maybe("update overdraft", b"\x80\x58\x00\x00\x0e"
                            + limit.to_bytes(3, "big") + date + time + mac2 + b"\x04", 0.1)
    answer = yield label, update
    if answer[-2:] == b"\x90\x00" and label == "update overdraft":
        m.last_value = (7, m.counters[0])


def op_credit_only(m: Model) -> Op:
    date, time = m.date_time()
    yield m.maybe("credit alone", b"\x80\x52\x00\x00\x0b" + date + time
                  + m.rng.randbytes(4) + b"\x04")


def op_load(m: Model) -> Op:
    r = m.rng
    purse = m.purse()
    if purse == 1 and r.random() < 0.7:
        yield from _verify(m)
    amount = m.amount(purse) if r.random() < 0.3 else r.randrange(0, 5000)
    if r.random() < 0.2:     # to the balance limit exactly, or one past it
        amount = (max(m.image["app"]["balance_limit"] - m.balance.get(purse, 0), 0)
                  + r.choice((0, 0, 1))) & 0xFFFFFFFF
    key_index = r.choice(list(m.load_keys)) if r.random() < 0.8 else \
        _pick(r, 1, 2, 0, r.randrange(256))
    tid = m.tid()
    init = bytes([0x80, 0x50, 0x00, purse, 0x0B, key_index]) + _u4(amount) + tid + b"\x10"
    label, init = m.maybe("init load", init, 0.1)
    answer = yield label, init
    if r.random() < 0.15:
        yield from r.choice((op_query, op_select, op_debit_only))(m)
    date, time = m.date_time()
    txn_type = 2 if purse == 2 else 1
    mac2 = r.randbytes(4)
    if answer[-2:] == b"\x90\x00" and len(answer) == 18 and key_index in m.load_keys:
        random_, counter = answer[8:12], answer[4:6]
        m.balance[purse] = int.from_bytes(answer[0:4], "big")
        m.counters = [int.from_bytes(counter, "big")]
        sk = tdes_encrypt_block(m.load_keys[key_index], random_ + counter + b"\x80\x00")
        fault = r.randrange(10)
        mac_amount = (amount + 1) & 0xFFFFFFFF if fault == 0 else amount
        mac_tid = r.randbytes(6) if fault == 1 else tid
        mac_type = txn_type ^ 3 if fault == 2 else txn_type
        mac2 = plain_mac(sk, _u4(mac_amount) + bytes([mac_type]) + mac_tid + date + time)
        if fault == 3:
            mac2 = mac2[:3] + bytes([mac2[3] ^ 1])
    credit = b"\x80\x52" + (b"\x00\x00" if r.random() < 0.9 else r.choice(
        (b"\x01\x00", b"\x00\x01", b"\x00\x02")))
    credit += b"\x0b" + date + time + mac2 + b"\x04"
    label, credit = m.maybe("credit", credit, 0.1)
    answer = yield label, credit
    if answer[-2:] == b"\x90\x00" and label == "credit":
        m.balance[purse] = m.balance.get(purse, 0) + amount
        m.last_value = (txn_type, m.counters[0])


def op_debit_only(m: Model) -> Op:
    date, time = m.date_time()
    yield m.maybe("debit alone", b"\x80\x54\x01\x00\x0f" + m.rng.randbytes(4) + date + time
                  + m.rng.randbytes(4) + b"\x08")


def op_junk(m: Model) -> Op:
    r = m.rng
    choice = r.randrange(4)
    if choice == 0:
        yield "random bytes", r.randbytes(r.randrange(0, 24))
    elif choice == 1:
        header = bytes([_pick(r, 0x00, 0x80, 0x84, 0x04, 0x90, 0xA0, 0xFF, r.randrange(256)),
                        r.randrange(256), r.randrange(256), r.randrange(256)])
        body = r.randbytes(r.randrange(0, 20))
        tail = (bytes([len(body)]) + body if body else b"") + \
            (bytes([r.randrange(256)]) if r.random() < 0.5 else b"")
        yield "random command", header + tail
    elif choice == 2:
        ins = r.choice((0x50, 0x52, 0x54, 0x58, 0x5A, 0x5C, 0x5E, 0xCA, 0x20, 0xB0, 0xB2, 0xA4,
                        0xC0))
        cla = _pick(r, 0x00, 0x80, 0x84, 0x0C, 0x90, 0x81, 0xE0)
        body = r.randbytes(r.randrange(0, 20))
        yield "known INS", bytes([cla, ins, r.randrange(256), r.randrange(256)]) + \
            (bytes([len(body)]) + body if body else b"") + bytes([r.randrange(256)])
    else:
        yield "power cycle", RESET
        if r.random() < 0.95:
            yield from op_plain_select(m)


def op_probe(m: Model) -> Op:
    """Everything APDUs show of the purse's state (so a hidden divergence comes out): both
    balances (the ED after the PIN), both purses' counters, the whole log, the last proof."""
    yield from op_plain_select(m)
    yield "get balance", b"\x80\x5C\x00\x02\x04"
    yield "verify tries", b"\x00\x20\x00\x00"
    yield from _verify(m)
    yield "get balance", b"\x80\x5C\x00\x01\x04"
    for purse in (1, 2):
        for p1 in (0, 1):
            key = min(m.load_keys if p1 == 0 else m.purchase_keys)
            yield "init probe", bytes([0x80, 0x50, p1, purse, 0x0B, key]) + bytes(4) + \
                bytes(6) + b"\x00"
    newest = b""
    for n in range(1, 12):
        answer = yield "read record", bytes([0x00, 0xB2, n, 0xC4, 0x17])
        if n == 1:
            newest = answer
    if len(newest) == 25:
        yield "get transaction prove", bytes([0x80, 0x5A, 0, newest[9], 2]) + newest[:2] + \
            b"\x08"


OPS: tuple[tuple[Callable[[Model], Op], int], ...] = (
    (op_select, 6), (op_query, 20), (op_pin, 8), (op_purchase, 24), (op_load, 16),
    (op_credit_only, 2), (op_debit_only, 2), (op_junk, 10), (op_probe, 2), (op_unload, 5),
    (op_update, 5),
)


def operations(m: Model) -> Iterator[Op]:
    funcs = [f for f, _ in OPS]
    weights = [w for _, w in OPS]
    yield op_plain_select(m)
    while True:
        yield m.rng.choices(funcs, weights)[0](m)


# --- the runner --------------------------------------------------------------------------------

@dataclass
class Stats:
    apdus: int = 0
    episodes: int = 0
    resets: int = 0
    status_words: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)    # not sent: the platform's forms
    excused: dict[str, int] = field(default_factory=dict)    # differences of the platform
    mismatches: list[str] = field(default_factory=list)      # with keep_going


def _show(answer: bytes | str) -> str:
    if isinstance(answer, str):
        return answer
    return f"{answer[:-2].hex().upper() or '-'} SW {answer[-2:].hex().upper()}"


def _exchange(side: Side, apdu: bytes) -> bytes | str:
    """The card's answer, or the text of what it raised (a simulator failing on an APDU)."""
    try:
        return side.transmit(apdu)
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}"


def run(open_reference: Opener, open_other: Opener, count: int, seed: int,
        episode: tuple[int, int] = (40, 300), keep_going: bool = False) -> Stats:
    """Send ``count`` APDUs (power cycles not counted) to both cards; raise :class:`Mismatch`
    at the first answer that differs, or with ``keep_going`` note it, end the episode (the
    cards' states may differ from there) and go on."""
    rng = random.Random(seed)
    stats = Stats()
    while stats.apdus < count:
        image = random_image(rng)
        model = Model(rng, image)
        ref, other = open_reference(image), open_other(image)
        stats.episodes += 1
        try:
            mismatch = _episode(ref, other, model, rng.randrange(*episode), count, seed, stats)
        finally:
            ref.close()
            other.close()
        if mismatch and not keep_going:
            raise Mismatch(mismatch)
        if mismatch:
            stats.mismatches.append(mismatch)
    return stats


def _episode(ref: Side, other: Side, model: Model, length: int, count: int, seed: int,
             stats: Stats) -> str | None:
    """Play ``length`` APDUs on one personalisation; the first mismatch's text, or None."""
    history: list[str] = []
    platform = other.platform
    ops = operations(model)
    sent = 0
    probed = False
    while stats.apdus < count and not probed:
        if sent >= length:
            op, probed = op_probe(model), True      # every episode ends with the state shown
        else:
            op = next(ops)
        try:
            label, apdu = next(op)
            while True:
                if apdu is RESET:
                    ref.reset()
                    other.reset()
                    if platform:
                        platform.reset()
                    stats.resets += 1
                    history.append(f"  {label}")
                    label, apdu = next(op)
                    continue
                if stats.apdus >= count:
                    break
                why = platform.skip(apdu) if platform else None
                if why:
                    stats.skipped[why] = stats.skipped.get(why, 0) + 1
                    label, apdu = op.send(b"\x6f\x00")
                    continue
                a, b = _exchange(ref, apdu), _exchange(other, apdu)
                stats.apdus += 1
                sent += 1
                why = platform.excuse(apdu, b) if platform and a != b else None
                if why:
                    stats.excused[why] = stats.excused.get(why, 0) + 1
                elif a != b:
                    return (f"seed {seed}, APDU {stats.apdus} (episode {stats.episodes}, "
                            f"step {sent}) [{label}]\n  APDU  {apdu.hex().upper()}\n"
                            f"  {ref.name:6} {_show(a)}\n  {other.name:6} {_show(b)}\n"
                            f"replay: --diff-seed {seed} --diff-count {stats.apdus}\n"
                            "before it (the reference's answers):\n" + "\n".join(history[-12:]))
                if isinstance(a, str):
                    return f"seed {seed}, APDU {stats.apdus}: both cards failed on " \
                           f"{apdu.hex().upper()}: {a}"
                if platform:
                    platform.after(apdu)
                history.append(f"  {apdu.hex().upper() or '(empty)'} -> {_show(a)}  [{label}]")
                sw = a[-2:].hex().upper()
                stats.status_words[sw] = stats.status_words.get(sw, 0) + 1
                kind = label.split(" (")[0]
                stats.labels[kind] = stats.labels.get(kind, 0) + 1
                label, apdu = op.send(a)
        except StopIteration:
            pass
    return None
