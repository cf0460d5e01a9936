"""FIG. 4 through the servers at random: customers buy digital products and the test sends a
random mix of honest acceptances, replays of any acceptance seen so far (to its own order or
aimed at another), acceptances signed by another session's key, and stale ones. Every answer
is compared with a model: K2 is released exactly once per order, to the first honest
acceptance, the same acceptance again gets the same bytes, and everything else is refused.
``SVCARD_TRADE_DELIVERY_STEPS`` (default 60) and ``SVCARD_TRADE_DELIVERY_SEED`` (printed)."""

from __future__ import annotations

import base64
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from svcard.host.kit.db import first_row
from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade.stack import start_trade
from svcard.host.trade.trust import delivery as V

PRODUCTS = {"song": b"a song " * 400, "film": b"a film " * 900, "book": b"a book " * 50}


@dataclass
class Order:
    session: C.Session
    index: int
    item: str
    offer: V.Offer | None = None
    accepted: bytes | None = None        # the acceptance that released K2
    answer: bytes | None = None
    k1: dict[bytes, bytes] = field(default_factory=dict)   # acceptance -> K1 private


def test_random_acceptances_release_each_key_once(tmp_path: Path) -> None:
    seed = int(os.environ.get("SVCARD_TRADE_DELIVERY_SEED", random.randrange(2**32)))
    steps = int(os.environ.get("SVCARD_TRADE_DELIVERY_STEPS", "60"))
    print(f"FIG. 4 random seed {seed}, {steps} steps "
          f"(replay: SVCARD_TRADE_DELIVERY_SEED={seed})")
    rng = random.Random(seed)
    stack = start_trade(tmp_path / "trade")
    for item, data in PRODUCTS.items():
        (tmp_path / item).write_bytes(data)
    stack.merchants["shop"].config.products = {i: (tmp_path / i, f"the {i}")
                                               for i in PRODUCTS}
    orders: list[Order] = []
    seen: list[tuple[Order, bytes]] = []          # every acceptance made, and its order
    outcomes: dict[str, int] = {}
    try:
        with httpx.Client(timeout=30) as http:
            sessions = [stack.open(http, stack.customer(f"c{n}", 10**7), 50_00, unit=10)
                        for n in range(3)]
            for _ in range(steps):
                kind = rng.choice(["buy", "offer", "honest", "honest", "replay", "replay",
                                   "foreign", "stale"])
                if kind == "buy" or not orders:
                    s = rng.choice(sessions)
                    item = rng.choice([*PRODUCTS, "tea"])
                    got = C.buy(http, s, item, rng.randint(1, 3))
                    if item in PRODUCTS:
                        orders.append(Order(s, got["index"], item))
                    continue
                o = rng.choice(orders)
                base = (f"{o.session.merchant_url}/v1/sessions/{o.session.session}/purchases/"
                        f"{o.index}")
                if o.offer is None or kind == "offer":
                    r = http.get(f"{base}/offer", params={"pseudonym": o.session.pseudonym})
                    assert r.status_code == 200, r.text
                    offer = V.Offer(r.json()["description"].encode(), r.json()["signature"],
                                    base64.b64decode(r.json()["ciphertext"]))
                    assert o.offer is None or offer == o.offer     # the same offer again
                    o.offer = offer
                    continue
                now = int(time.time())
                if kind in ("honest", "stale", "foreign"):
                    k1, k1_pub = V.new_exchange_key()
                    key = o.session.session_key if kind != "foreign" else \
                        rng.choice([s for s in sessions if s is not o.session]).session_key
                    body = V.accept(key, o.offer, k1_pub, now - (400 if kind == "stale" else 0))
                    o.k1[body] = k1
                    if kind == "honest":
                        seen.append((o, body))
                else:
                    if not seen:
                        continue
                    own = [pair for pair in seen if pair[0] is o]
                    owner, body = rng.choice(own if own and rng.random() < 0.5 else seen)
                    kind = "replay-own" if owner is o else (
                        "replay-same-session" if owner.session is o.session else
                        "replay-other-session")
                r = http.post(f"{base}/accept", content=body)
                outcomes[f"{kind}:{r.status_code}"] = outcomes.get(
                    f"{kind}:{r.status_code}", 0) + 1
                if kind == "honest" and o.accepted is None:
                    assert r.status_code == 200, r.text
                    o.accepted, o.answer = body, r.content
                elif kind == "replay-own" and body == o.accepted:
                    assert r.status_code == 200 and r.content == o.answer
                elif kind in ("honest", "replay-own"):
                    assert r.status_code == 409, (kind, r.status_code)
                elif kind == "replay-same-session":
                    assert r.status_code == 403, (kind, r.status_code)
                else:            # foreign, replay-other-session, stale
                    assert r.status_code == 401, (kind, r.status_code)
        print("outcomes", dict(sorted(outcomes.items())))
        for o in orders:
            if o.offer is None:
                continue
            row = first_row(stack.acquirer.engine, D.acq_deliveries,
                            session=o.session.session,
                            order_digest=json.loads(o.offer.description)["order"])
            assert row is not None
            if o.accepted is None:
                assert row["accepted"] is None and row["answer"] is None
                continue
            assert row["acceptance"] == o.accepted.decode()
            assert o.answer is not None and json.loads(o.answer)["sealed"] == row["answer"]
            k2 = V.open_key(o.k1[o.accepted], bytes.fromhex(row["answer"]), o.accepted,
                            o.offer)
            assert V.decrypt(o.offer, k2) == PRODUCTS[o.item]
    finally:
        stack.close()
