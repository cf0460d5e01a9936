#!/usr/bin/env python3
"""Reader speed through the real PC/SC stack, all in one run on one pcscd + Debian vpcd:

* our served card (``svcard card serve``) answering GET BALANCE;
* a bare responder written here that answers 9000 to everything (the transport floor: the same
  vpcd framing, TCP_NODELAY and TCP_QUICKACK, no card logic);
* Debian's ``vicc -t iso7816`` answering GET CHALLENGE (run with this interpreter, its
  ``PYTHONPATH`` and pycryptodome, when installed);
* and the in-process virtual reader, for scale.

    python benchmarks/bench_readers.py [--seconds 3] [--smoke]

It starts its own pcscd (private vpcd ports) and stops it at the end; a pcscd already running
must be stopped first. Targets: our card >= half the transport floor and >= 100x vicc.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pcsc_env import READER_0, Pcscd, free_port_pair, pcscd_running, wait_for

from svcard.card.image import card_from_image, save_new_image
from svcard.card.personalise import image_from_profile
from svcard.fixtures import fixture_path
from svcard.reader import VirtualReader
from svcard.reader.pcsc import PcscReader, list_readers

VICC = Path("/usr/bin/vicc")
VICC_LIB = Path("/usr/lib/python3/site-packages/virtualsmartcard")
SELECT = bytes.fromhex("00A4040009F05356434152440101")
GET_BALANCE = bytes.fromhex("805C000204")
GET_CHALLENGE = bytes.fromhex("0084000008")

BARE_RESPONDER = r"""
import socket, sys
port = int(sys.argv[1])
quick = getattr(socket, "TCP_QUICKACK", None)
while True:
    try:
        s = socket.create_connection(("127.0.0.1", port))
    except OSError:
        continue
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def read(n):
        buf = b""
        while len(buf) < n:
            if quick is not None:
                s.setsockopt(socket.IPPROTO_TCP, quick, 1)
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise SystemExit(0)
            buf += chunk
        return buf
    while True:
        payload = read(int.from_bytes(read(2), "big"))
        if len(payload) == 1:
            if payload[0] == 4:
                s.sendall(b"\x00\x02\x3b\x00")
            continue
        s.sendall(b"\x00\x02\x90\x00")
"""


def measure(reader: PcscReader, apdu: bytes, seconds: float) -> tuple[float, float]:
    """APDUs per second and median round trip (ms) of ``apdu``, repeated for ``seconds``."""
    for _ in range(20):
        reader.transmit(apdu)
    times = []
    end = time.perf_counter() + seconds
    while True:
        t = time.perf_counter()
        reader.transmit(apdu)
        done = time.perf_counter()
        times.append(done - t)
        if done > end:
            break
    return len(times) / sum(times), statistics.median(times) * 1000


def run_subject(name: str, cmd: list[str], env: dict[str, str] | None, apdu: bytes,
                seconds: float, setup: bytes | None = None) -> tuple[float, float] | None:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def present() -> bool:
            if proc.poll() is not None:
                return True
            states = {r.name: r.card_present for r in list_readers()}
            return bool(states.get(READER_0))
        wait_for(present, f"{name} to appear in {READER_0}", timeout=30)
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-500:] if proc.stderr else ""
            print(f"  {name}: exited at start ({err.strip().splitlines()[-1] if err else '?'})")
            return None
        reader = PcscReader(READER_0)
        reader.connect()
        try:
            if setup:
                reader.transmit(setup)
            return measure(reader, apdu, seconds)
        finally:
            reader.disconnect()
    finally:
        proc.kill()
        proc.wait()
        wait_for(lambda: not {r.name: r.card_present for r in list_readers()}.get(READER_0),
                 f"{name} to leave the reader", timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--smoke", action="store_true", help="a short run, for CI")
    args = parser.parse_args()
    seconds = 0.3 if args.smoke else args.seconds
    if pcscd_running():
        print("a pcscd is already running; stop it so the benchmark can run its own")
        return 2
    results: dict[str, tuple[float, float] | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        image = image_from_profile(fixture_path("iep-demo.toml"))
        save_new_image(Path(tmp) / "iep.json", image)
        daemon = Pcscd(Path(tmp), free_port_pair())
        daemon.start()
        try:
            exe = Path(sys.executable).parent / "svcard"
            results["svcard served card, GET BALANCE"] = run_subject(
                "svcard card serve", [str(exe), "card", "serve", "--quiet",
                                      str(Path(tmp) / "iep.json"), "--vpcd",
                                      f"127.0.0.1:{daemon.port}"],
                None, GET_BALANCE, seconds, setup=SELECT)
            results["bare 9000 responder (transport floor)"] = run_subject(
                "bare responder", [sys.executable, "-c", BARE_RESPONDER, str(daemon.port)],
                None, GET_BALANCE, seconds)
            if VICC.exists() and VICC_LIB.exists():
                vicc_env = {**os.environ, "PYTHONPATH": str(VICC_LIB)}
                results["Debian vicc -t iso7816, GET CHALLENGE"] = run_subject(
                    "vicc", [sys.executable, str(VICC), "-t", "iso7816", "-P",
                             str(daemon.port)], vicc_env, GET_CHALLENGE, max(seconds, 2.0))
            else:
                results["Debian vicc -t iso7816, GET CHALLENGE"] = None
        finally:
            daemon.stop()
    card = VirtualReader(card_from_image(image))
    card.connect()
    card.transmit(SELECT)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        card.transmit(GET_BALANCE)
        n += 1
    virtual = n / (time.perf_counter() - t0)

    print("svcard reader benchmark" + (" (smoke run: figures not meaningful)" if args.smoke
                                       else ""))
    for name, value in results.items():
        if value is None:
            print(f"  {name:<42} not run (not installed or failed to start)")
        else:
            print(f"  {name:<42} {value[0]:9,.0f} APDUs/s   median round trip {value[1]:7.3f} ms")
    print(f"  {'in-process virtual reader, GET BALANCE':<42} {virtual:9,.0f} APDUs/s")
    ours = results.get("svcard served card, GET BALANCE")
    floor = results.get("bare 9000 responder (transport floor)")
    vicc = results.get("Debian vicc -t iso7816, GET CHALLENGE")
    if ours and floor:
        print(f"  ours / transport floor: {ours[0] / floor[0]:.2f}  (target >= 0.5)")
    if ours and vicc:
        print(f"  ours / vicc:            {ours[0] / vicc[0]:.0f}x  (target >= 100x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
