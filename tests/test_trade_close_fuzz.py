"""Randomised faults in the records both sides send the mediating agent (seed 004 FIG. 3):
honest sessions with real session keys, PayWord chains and signed orders; in about half of
them one side's report is made to lie, the lying side re-computing its hash, count and total
so the record is consistent in itself: a purchase dropped, duplicated, altered (item, units or
signature) or two reordered; a merchant claiming more than its last link; a forged or
shortened link; a commitment or order not signed by the session key. The comparison must
flag every faulty session (100 %) and no honest one, and the amount cleared is always what
the merchant's own evidence proves, never more than the honest amount.

Count: SVCARD_TRADE_CLOSE_FAULTS (default 200 faulty sessions; the long run in the report
used 5,000); seed: SVCARD_TRADE_CLOSE_SEED (printed)."""

from __future__ import annotations

import os
import random
import secrets
from collections import Counter
from typing import Any

from svcard.host.trade import closing as K
from svcard.host.trade import signing as S
from svcard.host.trade.payword import Commitment, chain, order_payload

FAULTS = ("dropped", "duplicated", "altered-item", "altered-units", "altered-signature",
          "reordered", "over-claim", "forged-link", "short-link", "unsigned-commitment",
          "unsigned-order", "hash-only")
MERCHANT_ONLY = {"over-claim", "forged-link", "short-link", "unsigned-commitment",
                 "unsigned-order"}


def honest_session(rng: random.Random, n: int) -> dict[str, Any]:
    session = f"am1.{n}"
    key, public = S.new_key()
    unit, length = rng.choice([1, 5, 10]), rng.randint(8, 40)
    links = chain(rng.randbytes(32), length)
    c = Commitment(session, "shop", links[0], length, unit, "JPY", 2**40)
    entries: list[dict[str, Any]] = []
    index, last_order = 0, b""
    while index < length and (len(entries) < 2 or rng.random() < 0.7):
        units = rng.randint(1, min(4, length - index))
        if index + units > length:
            break
        index += units
        item = f"item{rng.randint(0, 9)}"
        order = S.canonical(order_payload(session, index, item, units))
        entries.append(K.entry(index, item, units, S.sign(key, S.ORDER, order)))
        last_order = order
    if len(entries) < 2:
        return honest_session(rng, n)
    evidence = {"index": index, "link": links[index].hex(),
                "commitment": c.body().decode(),
                "commitment_signature": S.sign(key, S.COMMITMENT, c.body()),
                "order": last_order.decode(),
                "order_signature": entries[-1]["signature"]}
    return {"row": {"session": session, "merchant": "shop", "currency_merchant": "JPY",
                    "deposit_merchant": unit * length, "session_key": public.hex()},
            "key": key, "unit": unit, "entries": entries, "evidence": evidence,
            "links": links, "index": index}


def record(s: dict[str, Any], side: str, entries: list[dict[str, Any]],
           evidence: dict[str, Any] | None) -> dict[str, Any]:
    return K.make_record(s["row"]["session"], side, "shop" if side == "merchant" else "p1",
                         "terminated", "JPY", s["unit"], entries, K.record_key(
                             b"k" * 32, s["row"]["session"], side), 1, evidence)


def lie(rng: random.Random, s: dict[str, Any], fault: str, side: str
        ) -> tuple[dict[str, Any], dict[str, Any]]:
    entries = [dict(e) for e in s["entries"]]
    ev = dict(s["evidence"])
    i = rng.randrange(len(entries) - 1)
    if fault == "dropped":
        del entries[i]
    elif fault == "duplicated":
        entries.insert(i, dict(entries[i]))
    elif fault == "altered-item":
        entries[i]["item"] += "z"
    elif fault == "altered-units":
        entries[i]["units"] += 1
    elif fault == "altered-signature":
        entries[i]["signature"] = secrets.token_hex(64)
    elif fault == "reordered":
        entries[i], entries[i + 1] = entries[i + 1], entries[i]
    elif fault == "forged-link":
        ev["link"] = secrets.token_hex(32)
    elif fault == "short-link":      # an earlier real link presented as the last one
        ev["link"] = s["links"][s["index"] - 1].hex()
    elif fault == "unsigned-commitment":
        ev["commitment_signature"] = S.sign(S.new_key()[0], S.COMMITMENT,
                                            ev["commitment"].encode())
    elif fault == "unsigned-order":
        ev["order_signature"] = S.sign(S.new_key()[0], S.ORDER, ev["order"].encode())
    lying = record(s, side, entries, ev if side == "merchant" else None)
    if fault == "over-claim":
        lying["index"] += rng.randint(1, 5)
        lying["total"] = lying["index"] * s["unit"]
    if fault == "hash-only":
        lying["list_hash"] = secrets.token_hex(32)
    honest = record(s, "customer" if side == "merchant" else "merchant", s["entries"],
                    s["evidence"] if side == "customer" else None)
    return (lying, honest) if side == "merchant" else (honest, lying)


def test_every_fault_is_flagged_and_no_honest_session() -> None:
    faults = int(os.environ.get("SVCARD_TRADE_CLOSE_FAULTS", "200"))
    seed = int(os.environ.get("SVCARD_TRADE_CLOSE_SEED", str(secrets.randbits(32))))
    print(f"seed {seed} (replay: SVCARD_TRADE_CLOSE_SEED={seed})")
    rng = random.Random(seed)
    injected: Counter[str] = Counter()
    caught: Counter[str] = Counter()
    honest, flagged_honest, n = 0, 0, 0
    while sum(injected.values()) < faults:
        n += 1
        s = honest_session(rng, n)
        fair = s["index"] * s["unit"]
        if rng.random() < 0.5:
            honest += 1
            d = K.compare(s["row"], record(s, "merchant", s["entries"], s["evidence"]),
                          record(s, "customer", s["entries"], None))
            flagged_honest += d.outcome != "agreed"
            assert d.amount == fair
            continue
        fault = rng.choice(FAULTS)
        side = "merchant" if fault in MERCHANT_ONLY else rng.choice(["merchant", "customer"])
        merchant, customer = lie(rng, s, fault, side)
        d = K.compare(s["row"], merchant, customer)
        injected[fault] += 1
        caught[fault] += d.outcome == "disputed"
        assert d.outcome == "disputed", (seed, fault, side)
        assert d.amount <= fair and d.amount == d.index * s["unit"]
    print(f"{sum(injected.values())} faults, {sum(caught.values())} flagged; {honest} honest "
          f"sessions, {flagged_honest} flagged; by fault: {dict(injected)}")
    assert caught == injected and flagged_honest == 0
