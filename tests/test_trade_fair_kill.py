"""FIG. 4's fair exchange with the servers as real processes: the trusted party (the mediating
agent) SIGKILLed while it releases a fairly bought product's K2 and link, at a delay drawn
from a seed (``SVCARD_TRADE_FAIR_SEED``, printed), so the kill lands before, inside or after
the release's step. Whatever the kill hit, after the restart the release happened exactly
once: the customer's same acceptance gets K2, the merchant gets the link (on its terminate),
and clearing pays the tea and the product."""

from __future__ import annotations

import base64
import json
import os
import random
import threading
import time

import httpx
import pytest
from sqlalchemy import select
from test_trade_serve import Party
from test_trade_trust_kill import parties  # noqa: F401  (the fixture: am1, acq1, shop)

from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade import signing as S
from svcard.host.trade.money import Amount
from svcard.host.trade.payword import link_at
from svcard.host.trade.server.account import add_customer
from svcard.host.trade.trust import buyer
from svcard.host.trade.trust import delivery as V

SONG = b"a song worth its deposit " * 500


def released(db: str) -> list[dict[str, object]]:
    engine = D.acq_engine(db)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(D.acq_links)).all()]
    finally:
        engine.dispose()


def held(db: str, session: str) -> int:
    engine = D.ma_engine(db)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(D.ma_sessions.c.held_index).where(
                D.ma_sessions.c.session == session)).scalar_one())
    finally:
        engine.dispose()


@pytest.mark.parametrize("run", range(int(os.environ.get("SVCARD_TRADE_FAIR_KILLS", "2"))))
def test_the_party_killed_during_a_fair_release(parties: dict[str, Party],  # noqa: F811
                                                run: int) -> None:
    seed = int(os.environ.get("SVCARD_TRADE_FAIR_SEED", str(random.randrange(1 << 30))))
    delay = random.Random(seed + run).uniform(0.0, 0.4)
    print(f"SVCARD_TRADE_FAIR_SEED={seed} run {run}: kill after {delay * 1000:.1f} ms")
    am, acq, shop = parties["am1"], parties["acq1"], parties["shop"]
    for p in (am, acq, shop):
        p.start()
    private, public = S.new_key()
    engine = D.am_engine(am.db)
    add_customer(engine, "alice", public, "EUR", 50_00)
    engine.dispose()
    with httpx.Client(timeout=30) as http:
        s = C.open_session(http, am.url, "am1", am.public, "alice", private, "shop", shop.url,
                           "op1", Amount(10_00, "EUR"), unit=10)
        assert s.opened["acquirer_url"] == acq.url
        C.buy(http, s, "tea", 1)
        buyer.buy_product(http, s, "song", 2)
        base = f"{shop.url}/v1/sessions/{s.session}/purchases/3"
        first = http.get(f"{base}/offer", params={"pseudonym": s.pseudonym}).json()
        offer = V.Offer(first["description"].encode(), first["signature"],
                        base64.b64decode(first["ciphertext"]))
        k1, k1_pub = V.new_exchange_key()
        acceptance = V.accept(s.session_key, offer, k1_pub, int(time.time()),
                              link_at(s.seed, s.length, 3))
        order = json.loads(offer.description)["order"]
        body = S.canonical({"session": s.session, "order": order,
                            "acceptance": acceptance.decode()})

        def send() -> None:
            try:
                with httpx.Client(timeout=10) as c:
                    c.post(f"{acq.url}/v1/deliveries/release", content=body)
            except httpx.HTTPError:
                pass                                 # the answer lost to the kill
        t = threading.Thread(target=send)
        t.start()
        time.sleep(delay)
        acq.kill()                                   # SIGKILL
        t.join(timeout=30)
        before = released(acq.db)
        assert len(before) == 1 and before[0]["link"] in (None, link_at(
            s.seed, s.length, 3).hex())              # released whole, or not at all
        print(f"  released before the kill: {before[0]['link'] is not None}")
        assert held(shop.db, s.session) == 1         # the merchant has no link yet
        acq.start()
        answer = http.post(f"{acq.url}/v1/deliveries/release", content=body)
        assert answer.status_code == 200, answer.text
        again = http.post(f"{acq.url}/v1/deliveries/release", content=body)
        assert again.content == answer.content       # the same answer, every time
        k2 = V.open_key(k1, bytes.fromhex(answer.json()["sealed"]), acceptance, offer)
        assert V.decrypt(offer, k2) == SONG
        assert answer.json()["link"] == link_at(s.seed, s.length, 3).hex()
        s.orders.append(s.pending)
        s.spent, s.pending = 3, {}
        c = C.close(http, s)                         # the terminate collects the link
        assert held(shop.db, s.session) == 3
        assert c["clearing"]["outcome"] == "agreed" and c["clearing"]["paid"] == 30, c
