"""FIG. 4 with the servers as real processes from their TOML files (the merchant's product in
a ``[[product]]`` entry): the mediating agent, the trusted party holding K2, SIGKILLed before
the merchant could lodge K2 and again between the lodge and the release. Its state is in its
database: after each restart the key is lodged once and released once, to the customer's
acceptance only, and the same acceptance again gets the same answer."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from test_trade_serve import Party

from svcard.host.trade import customer as C
from svcard.host.trade import db as D
from svcard.host.trade.money import Amount
from svcard.host.trade.server.account import add_customer
from svcard.host.trade.trust import buyer
from svcard.host.trade.trust import delivery as V

SONG = b"a song worth its deposit " * 500


@pytest.fixture
def parties(tmp_path: Path) -> Iterator[dict[str, Party]]:
    am = Party(tmp_path, "am1", "account-manager")
    acq = Party(tmp_path, "acq1", "acquirer")
    shop = Party(tmp_path, "shop", "merchant")
    (tmp_path / "song.bin").write_bytes(SONG)
    am.write(f'[[operator]]\nid = "op1"\nacquirer = "acq1"\nurl = "{acq.url}"\n'
             f'public_key = "{acq.public.hex()}"\n')
    acq.write(f'[[account_manager]]\nid = "am1"\npublic_key = "{am.public.hex()}"\n'
              f'[[merchant]]\nid = "shop"\nurl = "{shop.url}"\n'
              f'public_key = "{shop.public.hex()}"\ncurrency = "KWD"\n'
              '[table]\nissuer = "bank-m"\nbase = "EUR"\nissued = 2020-01-01T00:00:00Z\n'
              'expires = 2099-01-01T00:00:00Z\nrates = { KWD = "0.3312", JPY = "158.2345" }\n')
    shop.write(f'currency = "KWD"\n[acquirer]\nid = "acq1"\nurl = "{acq.url}"\n'
               f'public_key = "{acq.public.hex()}"\n'
               '[[product]]\nid = "song"\nfile = "song.bin"\ntext = "A song, 3 minutes"\n')
    found = {"am1": am, "acq1": acq, "shop": shop}
    yield found
    for p in found.values():
        p.kill()


def rows(db: str) -> list[dict[str, object]]:
    engine = D.acq_engine(db)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(D.acq_deliveries)).all()]
    finally:
        engine.dispose()


def offers(db: str) -> int:
    engine = D.ma_engine(db)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(D.ma_offers)).scalar_one())
    finally:
        engine.dispose()


def test_the_trusted_party_killed_between_lodge_and_release(parties: dict[str, Party]) -> None:
    am, acq, shop = parties["am1"], parties["acq1"], parties["shop"]
    for p in (am, acq, shop):
        p.start()
    private, public = C.S.new_key()
    engine = D.am_engine(am.db)
    add_customer(engine, "alice", public, "EUR", 50_00)
    engine.dispose()
    with httpx.Client(timeout=30) as http:
        s = C.open_session(http, am.url, "am1", am.public, "alice", private, "shop", shop.url,
                           "op1", Amount(10_00, "EUR"), unit=10)
        C.buy(http, s, "song", 3)
        base = f"{shop.url}/v1/sessions/{s.session}/purchases/3"
        # 1. the trusted party down when the merchant lodges: no offer yet (503), kept
        acq.kill()
        got = http.get(f"{base}/offer", params={"pseudonym": s.pseudonym})
        assert got.status_code == 503 and offers(shop.db) == 0   # its key was never fetched
        acq.start()
        first = http.get(f"{base}/offer", params={"pseudonym": s.pseudonym})
        assert first.status_code == 200
        lodged = rows(acq.db)
        assert len(lodged) == 1 and lodged[0]["accepted"] is None
        # 2. SIGKILL between the lodge and the release
        acq.kill()
        offer = V.Offer(first.json()["description"].encode(), first.json()["signature"],
                        base64.b64decode(first.json()["ciphertext"]))
        k1, k1_pub = V.new_exchange_key()
        acceptance = V.accept(s.session_key, offer, k1_pub, int(time.time()))
        refused = http.post(f"{base}/accept", content=acceptance)
        assert refused.status_code == 503
        assert rows(acq.db)[0]["accepted"] is None          # nothing released while down
        acq.start()
        # the lodged key survived the kill: released once, to this acceptance
        answer = http.post(f"{base}/accept", content=acceptance)
        assert answer.status_code == 200
        k2 = V.open_key(k1, bytes.fromhex(answer.json()["sealed"]), acceptance, offer)
        assert V.decrypt(offer, k2) == SONG
        acq.kill()
        acq.start()
        again = http.post(f"{base}/accept", content=acceptance)   # the same, after a restart
        assert again.status_code == 200 and again.json() == answer.json()
        other = V.accept(s.session_key, offer, k1_pub, int(time.time()))
        assert http.post(f"{base}/accept", content=other).status_code == 409
        with pytest.raises(C.TradeError, match="409"):     # the library: a new acceptance
            buyer.fetch(http, s)
        released = rows(acq.db)
        assert len(released) == 1 and released[0]["accepted"] == \
            json.loads(acceptance)["acceptance"]["unique"]
        assert offers(shop.db) == 1
