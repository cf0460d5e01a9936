#!/usr/bin/env python3
"""Digital goods per second through the goods system (seed 000), paid from a bank account and
written onto the card by secure messaging (or, ``--pay purse``, paid by the card's purse in
one composite purchase with the good), and what each costs.

    python benchmarks/bench_goods.py [--seconds 10] [--devices 1,4,8] [--sku coupon]
                                     [--procs N] [--count N] [--no-pin] [--profile DIR]
                                     [--pay bank|purse] [--psams N] [--smoke]

``--pay purse``: the payment server runs with ``--psams`` PSAMs (``--psam``), each card's EP
holds the money, and one good is INITIALIZE FOR CAPP PURCHASE, round trip 1 (the PSAM's MAC1
and the fulfilment server's MAC'd ``84 DE`` record), the record and DEBIT to the card, round
trip 2 (the card's MAC2 and TAC pay the order); done when the payment server has it paid.

The five parties run as processes (``svcard serve goods-merchant|payment|auth|bank|fulfil``,
each with its own SQLite database and key, from ``svcard goods init``'s files). The generator
(``loadgen.py``'s processes) runs ``--devices`` communication devices as threads, each its own
Ed25519 key registered with the authentication server, its own bank account and its own card
image (virtual reader, every image write fsynced; the card's goods files widened to 254
records so the run never fills them). One good, as the seed's flow: the customer orders at the
merchant naming the device, the device's poll gets the signed first message, the device
verifies the PIN on the card, reads its id and a challenge and sends the authorisation (round
trip 1: the institution debits, the fulfilment server answers the UPDATE RECORD ``04 DC`` for
that challenge), the card stores it, its status word goes back (round trip 2). A good is done
when the fulfilment server has it ``written``.

Printed per case: goods per second, p50/p99 of the whole flow (order to written), the device's
round trips per good once it has the first message (goal <= 2), and over the same window each
server's CPU ms and fsyncs per good and the generator's CPU ms per good (it runs the devices
AND their cards). ``--count N`` stops each case after about N goods; ``--smoke`` is CI's short
run (2 devices, 20 goods; figures not meaningful).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

from loadgen import (
    GeneratorRun,
    Measured,
    Placement,
    Result,
    fsync_method,
    measure,
    running,
    split_cpus,
    start_server,
)

from svcard.host.kit.serving import wait_http

SVCARD = str(Path(sys.executable).parent / "svcard")
ROLES = ("merchant", "payment", "auth", "bank", "fulfil")
PIN = "123456"
GOODS_RECORDS = 254
FIRST_SERIAL = 71_000_001


def worker(args: tuple[dict[str, str], list[tuple[str, str]], str, float, int, str],
           start: Any) -> GeneratorRun:
    """One generator process: its devices (key hex, card image), one thread each, buying
    goods in a loop for ``seconds`` or until the process bought ``count`` (0: no count). Each
    device buys one good first (not counted); then the generators and the parent meet twice
    at ``start`` (ready, go) and the measured window begins."""
    auth, devices, sku, seconds, count, pay = args
    import httpx

    from svcard.host.goods.device import Device
    from svcard.host.terminal.reader_specs import open_reader

    results: list[Result] = []
    lock = threading.Lock()
    warmed = threading.Barrier(len(devices) + 1)
    go = threading.Event()
    end = [0.0]
    left = [count or -1]

    def one(device: Device, card: Any, http: httpx.Client) -> tuple[bool, int]:
        ordered = http.post(f"{auth['merchant']}/v1/orders",
                            json={"sku": sku, "device": device.id, "customer_ref": "bench"})
        if ordered.status_code != 200:
            return False, 0
        order = ordered.json()["order"]
        firsts = [f for f in device.poll(wait=10) if f.order == order]
        if not firsts:
            return False, 0
        before = device.round_trips
        out = (device.pay_with_purse(card, firsts[0]) if pay == "purse"
               else device.authorise(card, firsts[0], PIN))
        ok = out.paid and out.written
        if not ok and os.environ.get("SVCARD_BENCH_DEBUG"):
            print(f"{device.id[:8]}: {out}", file=sys.stderr)
        return ok, device.round_trips - before

    def run_device(key_hex: str, card_path: str) -> None:
        with httpx.Client(timeout=60) as http, open_reader(f"virtual:{card_path}") as card:
            device = Device(auth["url"], auth["id"], bytes.fromhex(auth["public_key"]),
                            bytes.fromhex(key_hex), http=http)
            try:
                device.register("bench")
                one(device, card, http)   # warm up: connections, caches
            except BaseException:
                warmed.abort()
                raise
            warmed.wait()
            go.wait()
            mine: list[Result] = []
            while time.monotonic() < end[0]:
                with lock:
                    if left[0] == 0:
                        break
                    left[0] -= 1
                began = time.perf_counter()
                try:
                    done, trips = one(device, card, http)
                except Exception as exc:   # a refusal or a card error: counted as refused
                    if os.environ.get("SVCARD_BENCH_DEBUG"):
                        print(f"{device.id[:8]}: {exc}", file=sys.stderr)
                    done, trips = False, 0
                mine.append((time.perf_counter() - began, trips, done))
            with lock:
                results.extend(mine)

    threads = [threading.Thread(target=run_device, args=d, daemon=True) for d in devices]
    for t in threads:
        t.start()
    warmed.wait(timeout=180)
    start.wait(timeout=180)   # every generator is ready
    start.wait(timeout=180)   # the parent has begun measuring
    cpu0, wall0 = time.process_time(), time.perf_counter()
    end[0] = time.monotonic() + seconds
    go.set()
    for t in threads:
        t.join()
    return GeneratorRun(results, time.process_time() - cpu0, time.perf_counter() - wall0)


def write_case(case: Path, devices: int, price: int, goods: int, psams: int = 0,
               ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The system's files, the accounts, the cards (their EPs holding the money too) and
    ``psams`` PSAM images; (goods.toml, [(device key, card)])."""
    from svcard.host.goods import wire as W
    from svcard.host.goods.db import make_engine
    from svcard.host.goods.server.bank import add_account
    from svcard.host.goods.stack import make_card, psam_images, write_system

    path = write_system(case)   # a device here buys faster than a person: no per-minute cap
    path.write_text("orders_per_device = 1000000\n" + path.read_text())
    doc = tomllib.loads(path.read_text())
    psam_images(case, psams)
    engine = make_engine(_db(case, doc, "bank"), "bank")
    out = []
    try:
        for i in range(devices):
            serial = FIRST_SERIAL + i
            card = make_card(case / "cards", serial, ep=price * (goods + 10))
            image = json.loads(card.read_text())
            for f in image["app"]["goods"]["files"]:
                f["records"] = GOODS_RECORDS
            card.write_text(json.dumps(image))
            add_account(engine, f"bench{i:03d}", f"{serial:020d}", PIN, price * (goods + 10),
                        int(doc["currency_code"]), int(time.time() * 1000))
            out.append((W.new_key().hex(), str(card)))
    finally:
        engine.dispose()
    return doc, out


def _db(case: Path, doc: dict[str, Any], role: str) -> str:
    url = str(doc["parties"][role]["db"])
    return url if url.startswith("sqlite:////") else url.replace("sqlite:///",
                                                                 f"sqlite:///{case}/", 1)


def run_case(folder: Path, devices: int, sku: str, seconds: float, procs: int,
             placement: Placement, method: str | None, count: int = 0,
             profile: Path | None = None, pay: str = "bank", psams: int = 1) -> Measured:
    case = Path(tempfile.mkdtemp(dir=folder))
    from svcard.host.goods.stack import DEMO_ITEMS

    price = next(i.price for i in DEMO_ITEMS if i.sku == sku)
    budget = count or int(seconds * 40) + 50
    doc, keys = write_case(case, devices, price, budget, psams if pay == "purse" else 0)
    config = case / "goods.toml"
    extra = {"payment": [a for i in range(psams) for a in (
        "--psam", f"virtual:{case / f'goods-psam{i + 1}.json'}")] if pay == "purse" else []}
    servers = [start_server([SVCARD, "serve", f"goods-{r}", "--config", str(config),
                             *extra.get(r, []), "--log-level", "error"], placement)
               for r in ROLES]
    with running(servers):
        for r in ROLES:
            wait_http(f"{doc['parties'][r]['url']}/v1/health", timeout=120)
        auth = {"url": doc["parties"]["auth"]["url"], "id": doc["parties"]["auth"]["id"],
                "public_key": doc["parties"]["auth"]["public_key"],
                "merchant": doc["parties"]["merchant"]["url"]}
        per = max(1, -(-devices // procs))
        groups = [keys[i:i + per] for i in range(0, devices, per)]
        window = seconds if not count else 600.0
        return measure(worker, [(auth, g, sku, window, -(-count // len(groups)) if count else 0,
                                 pay) for g in groups],
                       dict(zip(ROLES, (s.pid for s in servers), strict=True)), placement,
                       window, profile / f"{devices}devices" if profile else None, method)


def line(devices: int, m: Measured) -> str:
    r = m.summary
    return (f"  {devices:2d} devices: {r['rate']:6.1f} goods/s  p50 {r['p50']:6.1f} ms  p99 "
            f"{r['p99']:6.1f} ms  round trips/good after the first message "
            f"{r['trips']:.2f}  ({r['done']:.0f} goods, {r['refused']:.0f} refused)\n"
            + "\n".join(m.cost_lines("good")))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--count", type=int, default=0,
                        help="stop each case after about this many goods (not --seconds)")
    parser.add_argument("--devices", default="1,4,8", help="devices buying at once, per case")
    parser.add_argument("--sku", default="coupon",
                        choices=("ticket", "coupon", "airtime", "rides10"))
    parser.add_argument("--procs", type=int, default=0,
                        help="generator processes (default: one per generator CPU)")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the servers and the generator to different CPUs")
    parser.add_argument("--profile", type=Path, help="py-spy each server into this folder")
    parser.add_argument("--pay", choices=("bank", "purse"), default="bank",
                        help="who pays: a bank account, or the card's purse (composite purchase)")
    parser.add_argument("--psams", type=int, default=1,
                        help="--pay purse: the payment server's PSAMs")
    parser.add_argument("--smoke", action="store_true", help="a short run, for CI")
    args = parser.parse_args()
    cases = (2,) if args.smoke else tuple(int(d) for d in args.devices.split(","))
    count = 20 if args.smoke else args.count
    placement = split_cpus(not args.no_pin)
    procs = args.procs or len(placement.generator or ()) or 2
    method = fsync_method()
    print("svcard goods benchmark (seed 000, " + (
        f"paid by the purse: composite purchase, {args.psams} PSAM(s)" if args.pay == "purse"
        else "paid by a bank account, secure-messaging write") + ")"
          + (" (smoke run: figures not meaningful)" if args.smoke else ""))
    print(f"  {placement.note}; 5 servers as processes, SQLite; devices in {procs} generator "
          f"process(es), sku {args.sku}; load average before: {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs; fsyncs counted by "
          f"{method or 'nothing (neither perf nor strace here)'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for devices in cases:
            m = run_case(Path(tmp), devices, args.sku, args.seconds, min(procs, devices),
                         placement, method, count, args.profile, args.pay, args.psams)
            print(line(devices, m), flush=True)
            if args.smoke and (m.summary["done"] == 0 or m.summary["trips"] > 2):
                print("  no good went through, or more than 2 round trips a good",
                      file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
