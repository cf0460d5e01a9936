#!/usr/bin/env python3
"""The payment server's protocol work per purchase, in-process, in µs (no HTTP, no database).

    python benchmarks/bench_protocols.py [--rounds 2000] [--repeat 5]

``purchase`` replays what protocols/ does for one FIG. 7 purchase at the payment server: open
the draw envelope (parse it, derive DK, open the ETSK, parse the order ticket, open the body,
parse the draw request), build and seal debit result M, build the debit command, seal the
answer envelope; then open the proof envelope the same way, parse the debit response, seal the
answer. ``load`` does the same for a load at the load server and the bank. Each figure is the
best of ``--repeat`` runs of ``--rounds`` transactions, each on a new transaction id.

To compare with older code, run the same command with ``PYTHONPATH`` pointing at a view of the
older tree. Where protocols/codec.py exists, the table after it gives each message's construct
parse/build against its struct twin, in the same process.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from svcard.protocols import loadmsg as L
from svcard.protocols import messages as M
from svcard.protocols import purse as P
from svcard.protocols import secure

SHARED = bytes(range(32))
MERCHANT = b"MERCHANT"


def ticket(tsk: bytes) -> dict[str, Any]:
    return {"version": 1, "tsk": tsk, "amount": 1234, "currency_code": 156,
            "currency_exponent": 2, "variant": 7, "purpose": 0, "expires": 2 ** 40,
            "terminal_id": b"T00001"}


DRAW = {"issuer_id": b"ISSUER01", "card_serial": bytes(10), "algorithm_id": 0,
        "key_version": 1, "expiry_date": b"\x20\x30\x12\x31", "balance": 10_000,
        "currency_code": 156, "currency_exponent": 2, "purse": 2, "offline_counter": 7,
        "amount": 1234, "random": b"RAND", "txn_type": 6}


def client_envelope(txn: bytes, tsk: bytes, msg_type: int, body: bytes) -> bytes:
    etsk = M.seal_ticket(SHARED, MERCHANT, txn, ticket(tsk))
    return M.seal_envelope(msg_type, MERCHANT, txn, etsk, tsk, body)


def server_open(data: bytes) -> tuple[Any, bytes, Any, bytes]:
    """What host/kit/http.open_client_envelope does with protocols/."""
    env, header = M.split_envelope(data)
    dk = secure.derive_key(SHARED, env.merchant_id, env.txn_id)
    t = M.parse(M.OrderTicket, secure.open_sealed(dk, env.etsk, M.ticket_aad(
        env.merchant_id, env.txn_id), "ETSK"), "ticket")
    return env, dk, t, secure.open_sealed(t.tsk, env.body, header, "body")


def purchase(draw: bytes, proof: bytes) -> None:
    env, dk, t, plain = server_open(draw)
    d = M.parse(M.DrawRequest, plain, "draw")
    now = time.localtime()
    P.bcd_date(__import__("datetime").date(now.tm_year, now.tm_mon, now.tm_mday))
    result = {"version": 1, "status": 0, "variant": t.variant, "merchant_id": env.merchant_id,
              "txn_id": env.txn_id, "amount": t.amount, "currency_code": t.currency_code,
              "psam_id": bytes(10), "terminal_txn_number": 5, "card_serial": d.card_serial,
              "card_counter": d.offline_counter, "tac": bytes(4), "reason": ""}
    result_m = secure.seal(dk, M.build(M.DebitResult, result),
                           M.result_m_aad(env.merchant_id, env.txn_id))
    command = M.build(M.DebitCommand, {
        "psam_id": bytes(10), "terminal_id": b"T00001", "terminal_txn_number": 5,
        "date": b"\x20\x26\x11\x23", "time": b"\x12\x00\x00", "mac1": b"MAC1",
        "amount": t.amount, "expected_mac2": b"MAC2", "sealed_expected_mac2": b"",
        "result_m": result_m})
    M.seal_envelope(M.DEBIT_COMMAND, env.merchant_id, env.txn_id, env.etsk, t.tsk, command)
    env, dk, t, plain = server_open(proof)
    M.parse(M.DebitResponse, plain, "debit response")
    M.seal_envelope(M.PAYMENT_RESULT, env.merchant_id, env.txn_id, env.etsk, t.tsk, b"")


def load(request: bytes, result: bytes, txn: bytes) -> None:
    env, dk, t, plain = server_open(request)
    M.parse(L.LoadRequest, plain, "load request")
    M.seal_envelope(L.LOAD_COMMAND, env.merchant_id, env.txn_id, env.etsk, t.tsk, M.build(
        L.LoadCommand, {"amount": 500, "date": b"\x20\x26\x11\x23", "time": b"\x12\x00\x00",
                        "s2": b"S2S2"}))
    env, dk, t, plain = server_open(result)
    M.parse(L.LoadResult, plain, "load result")
    confirmation = secure.seal(dk, M.build(L.LoadConfirmation, {
        "version": 1, "outcome": 0, "bank_id": MERCHANT, "txn_id": txn, "amount": 500,
        "card_serial": bytes(10), "online_counter": 3, "s3": b"S3S3", "reason": ""}),
        L.confirmation_aad(MERCHANT, txn))
    M.seal_envelope(L.LOAD_ANSWER, env.merchant_id, env.txn_id, env.etsk, t.tsk, M.build(
        L.LoadAnswer, {"outcome": 0, "reason": "", "confirmation": confirmation}))
    L.open_confirmation(SHARED, MERCHANT, txn, confirmation)   # at the bank


def best(fn: Callable[[int], None], rounds: int, repeat: int) -> float:
    """µs per call, best of ``repeat``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(rounds)
        times.append((time.perf_counter() - start) / rounds * 1e6)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"protocols from {os.path.dirname(M.__file__)}")
    cases: list[tuple[bytes, ...]] = []
    for _ in range(args.rounds):
        txn, tsk = os.urandom(16), os.urandom(32)
        draw = client_envelope(txn, tsk, M.DRAW_REQUEST, M.build(M.DrawRequest, DRAW))
        proof = client_envelope(txn, tsk, M.DEBIT_PROOF, M.build(
            M.DebitResponse, {"card_sw": 0x9000, "tac": b"TAC0", "mac2": b"MAC2"}))
        cases.append((txn, draw, proof))

    def run_purchases(n: int) -> None:
        for _, draw, proof in cases[:n]:
            purchase(draw, proof)

    print(f"purchase (FIG. 7, payment server's protocols/ work): "
          f"{best(run_purchases, args.rounds, args.repeat):7.1f} µs")
    loads = []
    for _ in range(args.rounds):
        txn, tsk = os.urandom(16), os.urandom(32)
        request = client_envelope(txn, tsk, L.LOAD_REQUEST, M.build(L.LoadRequest, {
            "issuer_id": b"ISSUER01", "card_serial": bytes(10), "expiry_date": b"\x20\x30\x12\x31",
            "currency_code": 156, "amount": 500, "txn_type": 2, "algorithm_id": 0,
            "key_version": 1, "online_counter": 3, "balance": 100, "random": b"RAND",
            "s1": b"S1S1", "bank_time": 2 ** 31}))
        result = client_envelope(txn, tsk, L.LOAD_RESULT, M.build(L.LoadResult, {
            "result": 0, "card_sw": 0x9000, "s3": b"S3S3", "online_counter": 3, "balance": 600,
            "random": bytes(4), "s1": bytes(4)}))
        loads.append((txn, request, result))

    def run_loads(n: int) -> None:
        for txn, request, result in loads[:n]:
            load(request, result, txn)

    print(f"load (load server + bank protocols/ work):           "
          f"{best(run_loads, args.rounds, args.repeat):7.1f} µs")
    try:
        from svcard.protocols import codec
    except ImportError:
        return
    print("\nper message, µs: construct parse / twin parse, construct build / twin build")
    samples = {"Envelope": cases[0][1], "DrawRequest": M.build(M.DrawRequest, DRAW)}
    for name in ("Envelope", "OrderTicket", "DrawRequest", "DebitCommand", "DebitResult",
                 "DebitResponse"):
        layout = getattr(M, name)
        twin = codec.twin(layout)
        assert twin is not None
        data = samples.get(name) or layout.build(_fields_for(name))
        value = dict(layout.parse(data))
        n = args.rounds
        figures = [best(lambda k, f=f, a=a: [f(a) for _ in range(k)], n, args.repeat)
                   for f, a in ((layout.parse, data), (twin.parse, data),
                                (layout.build, value), (twin.build, value))]
        print(f"  {name:14s} {figures[0]:6.1f} / {figures[1]:5.1f}   "
              f"{figures[2]:6.1f} / {figures[3]:5.1f}")


def _fields_for(name: str) -> dict[str, Any]:
    if name == "OrderTicket":
        return ticket(bytes(32))
    if name == "DebitResponse":
        return {"card_sw": 0x9000, "tac": b"TAC0", "mac2": b"MAC2"}
    if name == "DebitCommand":
        return {"psam_id": bytes(10), "terminal_id": b"T00001", "terminal_txn_number": 5,
                "date": bytes(4), "time": bytes(3), "mac1": bytes(4), "amount": 1,
                "expected_mac2": bytes(4), "sealed_expected_mac2": b"", "result_m": bytes(60)}
    return {"version": 1, "status": 0, "variant": 7, "merchant_id": MERCHANT,
            "txn_id": bytes(16), "amount": 1, "currency_code": 156, "psam_id": bytes(10),
            "terminal_txn_number": 5, "card_serial": bytes(10), "card_counter": 1,
            "tac": bytes(4), "reason": "ok"}


if __name__ == "__main__":
    main()
