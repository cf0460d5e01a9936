"""APDU fuzzing of the IEP and the PSAM, shared by the hypothesis tests and
``scripts/fuzz_cards.py``.

A :class:`FuzzTarget` holds a selected IEP (with value) and a selected PSAM in memory and checks
after every command that: the answer is at least a status word; the status word is a valid ISO
7816 one and never 6F00 (an exception inside the card); no purse balance or counter moved
(the fuzzer never knows a key, so it can never send a valid MAC), and no goods record
was written (UPDATE CAPP DATA CACHE only caches; its DEBIT needs a valid MAC1); the PSAM recorded no
credited purchase (that needs the card's MAC2); no key's count of wrong MACs passes the card's
``mac_failure_limit``, and a locked key is refused at INITIALIZE (``6983``, a valid ISO 7816
status word: authentication method blocked). The fuzzer's wrong MACs lock keys quickly; every
power cycle the issuer unlocks them (:func:`unlock_keys`) so the MAC paths stay reachable.
The purse card also holds a loyalty programme's ADF (card/loyalty.py), which the seeds SELECT;
its points, counters and log never move either.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field
from pathlib import Path

from conftest import demo_image, with_balance

from svcard.card.iep_commands.lockout import unlock_keys
from svcard.card.image import card_from_image
from svcard.card.loyalty import CardFacts, IssuerKeys, LoyaltyProfile, programmes_from_profile
from svcard.protocols import sw as SW

GOODS_TICKET = ("0101" + "4D45524348414E54" + "0000000000000009" + "20260101" + "20281231"
                + "000005DC" + "534541542D313241" + "0000")
FUZZ_GOODS_KEY = {"index": 1, "version": 1, "algorithm": 0,
                  "key": "00112233445566778899AABBCCDDEEFF"}   # the fuzzer never uses it
FUZZ_PROGRAMME_AID = "F05356434152440401"   # a loyalty programme's ADF beside the purse
IEP_SEEDS = [bytes.fromhex(h) for h in (
    "00A4040009F05356434152440101",
    # the programme: SELECT it (then every seed below goes to it until the purse is selected
    # again), a programme the card lacks, a partial AID
    "00A4040009" + FUZZ_PROGRAMME_AID, "00A4040009F05356434152440409", "00A4040008F053564341524404",
    "805C000204", "805C000104", "00B201C417", "00B0950000", "00B0960000",
    "0020000003123456", "00200000", "805E0100071234 56FF654321".replace(" ", ""),
    "805000020B0100000064112233445566", "805001020B0100000064112233445566",
    "805002010B0100000064112233445566", "805001010B0100000064112233445566",
    "805200000B202703141509260102030404", "805401000F00000001202703141509260102030408",
    "805A0006020000", "805A0002020000", "00C0000008", "80CA000000",
    # goods by secure messaging: GET CHALLENGE, then a ticket by UPDATE RECORD (by number, by
    # tag) and APPEND RECORD, each with a MAC the fuzzer cannot know
    "0084000004", "0084000008",
    "04DC018C2C" + GOODS_TICKET + "01020304", "04DC01882C" + GOODS_TICKET + "01020304",
    "04E200882C" + GOODS_TICKET + "01020304",
    # the composite (CAPP) purchase: INITIALIZE, a ticket cached by number and by tag, a goods
    # record read, DEBIT FOR CAPP PURCHASE
    "805003020B0100000064112233445566",
    "80DC018C28" + "0101" + "4D45524348414E54" + "0000000000000001" + "20260101" + "20281231"
    + "000005DC" + "534541542D313241" + "0000",
    "80DC018828" + "0101" + "4D45524348414E54" + "0000000000000002" + "20260101" + "20281231"
    + "000005DC" + "534541542D313241" + "0000",
    "00B2018C28", "00B2019C28",
    # the MAC'd UPDATE CAPP DATA CACHE (84 DE), by number and by tag, with a MAC the fuzzer
    # cannot know: a CAPP cache takes no record without its goods key's MAC
    "84DE018C2C" + GOODS_TICKET + "01020304", "84DE01882C" + GOODS_TICKET + "01020304",
)]
PSAM_SEEDS = [bytes.fromhex(h) for h in (
    "00A4040009F05356434152440201",
    "00B0960006", "00B0970003",
    "807000001C" + "01020304" + "0005" + "0000012C" + "06" + "20270314" + "150926" + "0100"
    + "0000000000000001" + "08",
    "807001001C" + "01020304" + "0005" + "0000012C" + "06" + "20270314" + "150926" + "0100"
    + "0000000000000001" + "0C",
    "8072000004DEADBEEF", "8072000008DEADBEEF01020304", "8078000000", "807A000000",
    "807C0000050000000000", "807E000000", "807E010000", "80760100080000000000000001",
)]


def fuzz_programme(points: int) -> dict[str, object]:
    """A loyalty programme's image entry (card/loyalty.py) with ``points``; the fuzzer never
    knows its keys."""
    keys = {"tac": "00" * 16, "purchase": [{"index": 1, "key": "11" * 16}],
            "load": [{"index": 1, "key": "22" * 16}]}
    entry = LoyaltyProfile.model_validate({
        "programme": "fuzzmiles", "aid": FUZZ_PROGRAMME_AID, "issuer_id": "2000000000000001",
        "keys": keys, "points": points, "mac_failure_limit": 3})
    facts = CardFacts(bytes.fromhex("F05356434152440101"), bytes(10), dt.date(2026, 1, 1),
                      dt.date(2031, 12, 31), None, None)
    return programmes_from_profile([entry], facts, Path("fuzz.toml"), _no_issuer, ValueError)[0]


def _no_issuer(path: Path) -> IssuerKeys:
    raise ValueError(f"{path}: the fuzzer's programme has explicit keys")


def mutate(seed: bytes, rng: random.Random) -> bytes:
    """One random mutation of a seed command, or plain random bytes."""
    choice = rng.randrange(9)
    data = bytearray(seed)
    if choice == 0:
        return rng.randbytes(rng.randrange(0, 40))
    if choice == 1 and data:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif choice == 2 and data:
        data[rng.randrange(len(data))] = rng.randrange(256)
    elif choice == 3:
        del data[rng.randrange(len(data) + 1):]
    elif choice == 4:
        data += rng.randbytes(rng.randrange(1, 8))
    elif choice == 5 and len(data) > 4:
        data[4] = rng.randrange(256)  # Lc / Le
    elif choice == 6 and len(data) > 3:
        data[rng.randrange(4)] = rng.randrange(256)  # header
    elif choice == 7 and len(data) > 5:
        data[5:] = rng.randbytes(len(data) - 5)  # same shape, random body
    return bytes(data)


@dataclass
class FuzzTarget:
    iep_balance: int = 10_000
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        image = with_balance(demo_image("iep", goods_key=FUZZ_GOODS_KEY), self.iep_balance, 500)
        image["loyalty"] = [fuzz_programme(self.iep_balance)]
        self.iep = card_from_image(image)
        self.psam = card_from_image(demo_image("psam"))
        self.iep.transmit(IEP_SEEDS[0])
        self.psam.transmit(PSAM_SEEDS[0])
        self._value = self._iep_value()

    def _iep_value(self) -> tuple[object, ...]:
        s = self.iep.apps[0].state  # type: ignore[attr-defined]
        points = self.iep.apps[1].state  # type: ignore[attr-defined]   # the programme
        return (s.ep.balance, s.ep.online_counter, s.ep.offline_counter,
                s.ed.balance, s.ed.online_counter, s.ed.offline_counter, s.proof, len(s.log),
                tuple(s.goods.goods()),   # a cached goods record never lands without a DEBIT
                points.ep.balance, points.ep.online_counter, points.ep.offline_counter,
                points.proof, len(points.log))

    def send(self, which: str, apdu: bytes) -> bytes:
        card = self.iep if which == "iep" else self.psam
        locked = which == "iep" and self._locked_initialize(apdu)
        out = card.transmit(apdu)
        if locked:
            assert out[-2:] != b"\x90\x00", f"{apdu.hex()}: INITIALIZE with a locked key"
        assert isinstance(out, bytes) and len(out) >= 2, f"{apdu.hex()}: answer {out!r}"
        sw = int.from_bytes(out[-2:], "big")
        assert SW.is_valid(sw), f"{apdu.hex()}: invalid status word {sw:04X}"
        assert sw != SW.NO_PRECISE_DIAGNOSIS, f"{apdu.hex()}: the card raised inside"
        key = f"{sw:04X}"
        self.counts[key] = self.counts.get(key, 0) + 1
        return out

    def check(self) -> None:
        assert self._iep_value() == self._value, "purse value moved without a valid MAC"
        s = self.iep.apps[0].state  # type: ignore[attr-defined]
        assert not any(True for _ in s.goods.goods()), "a good was written without its MAC"
        for counts in (s.purchase_mac_failures, s.load_mac_failures, s.goods_mac_failures):
            assert all(0 <= n <= s.mac_failure_limit for n in counts.values()), \
                "a MAC failure counter went past the card's limit"
        p = self.iep.apps[1].state  # type: ignore[attr-defined]
        for counts in (p.purchase_mac_failures, p.load_mac_failures):
            assert all(0 <= n <= p.mac_failure_limit for n in counts.values()), \
                "a programme's MAC failure counter went past its limit"
        for raw in self.psam.apps[0].state.records:  # type: ignore[attr-defined]
            assert raw[-1] == 1, "the PSAM credited a purchase without the card's MAC2"

    def _locked_initialize(self, apdu: bytes) -> bool:
        """True if ``apdu`` is an INITIALIZE naming a key that is locked."""
        if len(apdu) < 6 or apdu[0] != 0x80 or apdu[1] != 0x50 or apdu[2] > 2:
            return False
        s = self.iep.selected.state  # type: ignore[union-attr]   # the purse or the programme
        counts = s.load_mac_failures if apdu[2] == 0 else s.purchase_mac_failures
        return bool(counts.get(apdu[5], 0) >= s.mac_failure_limit)

    def power_cycle(self) -> None:
        unlock_keys(self.iep.apps[0].state)  # type: ignore[attr-defined]
        unlock_keys(self.iep.apps[1].state)  # type: ignore[attr-defined]
        self.iep.reset()
        self.psam.reset()
        self.iep.transmit(IEP_SEEDS[0])
        self.psam.transmit(PSAM_SEEDS[0])


def run(count: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    target = FuzzTarget()
    for n in range(count):
        if rng.random() < 0.5:
            target.send("iep", mutate(rng.choice(IEP_SEEDS), rng))
        else:
            target.send("psam", mutate(rng.choice(PSAM_SEEDS), rng))
        if n % 64 == 0:
            target.check()
        if rng.random() < 0.002:
            target.power_cycle()
    target.check()
    return target.counts
