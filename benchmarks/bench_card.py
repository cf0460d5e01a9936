#!/usr/bin/env python3
"""Card-level speed: purchases per second in memory and persisted, GET BALANCE APDUs per
second, and the raw crypto floor of one purchase, all in one run.

    python benchmarks/bench_card.py            # the figures
    python benchmarks/bench_card.py --smoke    # a short run for CI (figures not meaningful)

A "purchase" is the whole local-terminal flow of ``svcard terminal purchase``: SELECT card and
PSAM, READ BINARY of the terminal id, INITIALIZE FOR PURCHASE, INIT SAM FOR PURCHASE, DEBIT
FOR PURCHASE and CREDIT SAM FOR PURCHASE through the virtual reader (the APDU count is
measured and printed). The crypto floor
is the DES work those APDUs need, done directly with ``cryptography``: PSAM key
diversification (2 blocks), PSAM session key, MAC1 and MAC2; card session key, MAC1 check,
MAC2 and TAC. Target: an in-memory purchase costs at most 3x its crypto floor.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, modes

from svcard.card.image import card_from_image, open_card, save_new_image
from svcard.card.personalise import image_from_profile
from svcard.fixtures import fixture_path
from svcard.host.terminal import apdus
from svcard.host.terminal import purse as T
from svcard.reader import VirtualReader

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES

WHEN = dt.datetime(2027, 3, 14, 15, 9, 26)


def rate(fn: Callable[[], object], seconds: float, rounds: int = 5) -> tuple[float, float]:
    """Best and median operations per second over ``rounds`` timed rounds."""
    fn()
    n = 1
    while True:  # calibrate a batch size of about seconds/rounds
        t = time.perf_counter()
        for _ in range(n):
            fn()
        took = time.perf_counter() - t
        if took >= seconds / rounds / 4 or n > 1 << 20:
            break
        n *= 2
    per_round = max(1, int(n * (seconds / rounds) / max(took, 1e-9)))
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(per_round):
            fn()
        rates.append(per_round / (time.perf_counter() - t))
    return max(rates), statistics.median(rates)


def interleaved_ratio(slow: Callable[[], object], fast: Callable[[], object],
                      seconds: float, rounds: int = 15) -> tuple[float, float, float]:
    """Median, min and max of per-round cost ratios slow/fast, the two run alternately so
    that machine-wide drift hits both alike."""
    per = max(seconds / rounds / 2, 0.01)
    ratios = []
    for _ in range(rounds):
        costs = []
        for fn in (slow, fast):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < per:
                fn()
                n += 1
            costs.append((time.perf_counter() - t0) / n)
        ratios.append(costs[0] / costs[1])
    return statistics.median(ratios), min(ratios), max(ratios)


class Counting(VirtualReader):
    """A virtual reader that counts the APDUs sent through it."""

    sent = 0

    def transmit(self, apdu: bytes) -> bytes:
        Counting.sent += 1
        return super().transmit(apdu)


def crypto_floor() -> Callable[[], None]:
    mk, dpk, dtk = bytes(range(16)), bytes(range(16, 32)), bytes(range(32, 48))
    serial = bytes(8)
    block8 = bytes(8)
    mac_data = bytes(24)     # 19-byte MAC1 input padded: 3 blocks
    tac_data = bytes(32)     # 27-byte TAC input padded: 4 blocks
    amount = bytes(8)        # 4-byte MAC2 input padded: 1 block
    k3 = dpk + dpk[:8]
    mk3 = mk + mk[:8]

    def one_purchase() -> None:
        # PSAM: DPK = 3DES_MPK(D || ~D), session key, MAC1, MAC2
        Cipher(TripleDES(mk3), modes.ECB()).encryptor().update(serial + serial)
        sk = Cipher(TripleDES(k3), modes.ECB()).encryptor().update(block8)
        Cipher(TripleDES(sk * 3), modes.CBC(block8)).encryptor().update(mac_data)
        Cipher(TripleDES(sk * 3), modes.CBC(block8)).encryptor().update(amount)
        # card: session key, MAC1 check, MAC2, TAC
        sk = Cipher(TripleDES(k3), modes.ECB()).encryptor().update(block8)
        Cipher(TripleDES(sk * 3), modes.CBC(block8)).encryptor().update(mac_data)
        Cipher(TripleDES(sk * 3), modes.CBC(block8)).encryptor().update(amount)
        tk = bytes(a ^ b for a, b in zip(dtk[:8], dtk[8:], strict=True))
        Cipher(TripleDES(tk * 3), modes.CBC(block8)).encryptor().update(tac_data)

    return one_purchase


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="a short run, for CI")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per figure")
    args = parser.parse_args()
    seconds = 0.2 if args.smoke else args.seconds

    iep_image = image_from_profile(fixture_path("iep-demo.toml"))
    iep_image["app"]["ep"]["balance"] = 100_000
    psam_image = image_from_profile(fixture_path("psam-demo.toml"))

    # in memory
    card = Counting(card_from_image(iep_image))
    psam = Counting(card_from_image(psam_image))
    card.connect()
    psam.connect()

    def purchase() -> None:
        T.purchase(card, psam, 0, when=WHEN)

    purchase()
    Counting.sent = 0
    purchase()
    apdus_per_purchase = Counting.sent
    mem_best, mem_med = rate(purchase, seconds)

    # GET BALANCE through the virtual reader
    T.select_purse(card)
    get_balance = apdus.get_balance(2)
    bal_best, bal_med = rate(lambda: card.transmit(get_balance), seconds)

    # persisted: both images on disk, every write atomic and fsynced
    with tempfile.TemporaryDirectory() as tmp:
        save_new_image(Path(tmp) / "iep.json", iep_image)
        save_new_image(Path(tmp) / "psam.json", psam_image)
        dcard = open_card(Path(tmp) / "iep.json")
        dpsam = open_card(Path(tmp) / "psam.json")
        card_d, psam_d = VirtualReader(dcard), VirtualReader(dpsam)
        card_d.connect()
        psam_d.connect()
        disk_best, disk_med = rate(lambda: T.purchase(card_d, psam_d, 0, when=WHEN),
                                   seconds, rounds=3)
        dcard.close()
        dpsam.close()

    floor = crypto_floor()
    floor_best, floor_med = rate(floor, seconds)
    ratio, ratio_lo, ratio_hi = interleaved_ratio(purchase, floor, 3 * seconds)

    print("svcard card benchmark" + (" (smoke run: figures not meaningful)" if args.smoke
                                     else ""))
    print(f"  in-memory purchase ({apdus_per_purchase} APDUs, IEP + PSAM):  {mem_med:9,.0f}/s  "
          f"(best {mem_best:,.0f}/s)  {1e6 / mem_med:7.1f} us each")
    print(f"  persisted purchase (images fsynced):       {disk_med:9,.0f}/s  "
          f"(best {disk_best:,.0f}/s)  {1e6 / disk_med:7.1f} us each")
    print(f"  GET BALANCE APDUs (virtual reader):        {bal_med:9,.0f}/s  "
          f"(best {bal_best:,.0f}/s)  {1e6 / bal_med:7.1f} us each")
    print(f"  crypto floor of one purchase (8 DES ops):  {floor_med:9,.0f}/s  "
          f"(best {floor_best:,.0f}/s)  {1e6 / floor_med:7.1f} us each")
    print(f"  in-memory purchase / crypto floor:         {ratio:9.2f}x  (interleaved rounds: "
          f"{ratio_lo:.2f}..{ratio_hi:.2f}; target <= 3x)")


if __name__ == "__main__":
    main()
