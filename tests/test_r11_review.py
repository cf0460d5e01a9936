"""R-11's attacker's review of issue 11: each break found, as the attacker's client, refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from svcard.card.image import save_new_image
from svcard.card.personalise import image_from_profile
from svcard.card.storage import read_image
from svcard.fixtures import fixture_path
from svcard.host.load import client as LC
from svcard.host.load.bank import db as BD
from svcard.host.load.stack import LoadStack, start_load_stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.online import PaymentRefused
from svcard.host.terminal.reader_specs import open_reader

ISSUER = "1000000000000001"        # the demo card's issuer: the bank loads its cards to 20,000
RICH_ISSUER = "2000000000000002"   # another issuer, configured with a far bigger limit


@pytest.fixture
def loads(tmp_path: Path) -> Iterator[LoadStack]:
    s = start_load_stack(tmp_path / "load")
    s.bank_server.config.issuer_limits = {bytes.fromhex(ISSUER): 20_000,
                                          bytes.fromhex(RICH_ISSUER): 900_000}
    s.account("bob", 100_000, "pw")
    yield s
    s.close()


def demo_card(folder: Path, ep: int = 1_000) -> Path:
    card = folder / "card.json"
    image = image_from_profile(fixture_path("iep-demo.toml"))
    image["app"]["ep"]["balance"] = ep
    save_new_image(card, image)
    return card


def ep_balance(card: Path) -> int:
    return int(read_image(card)["app"]["ep"]["balance"])


def account_balance(loads: LoadStack, name: str = "bob") -> int:
    row = loads.bank_server.db.account(name)
    assert row is not None
    return int(row["balance"])


class RepeatsStartAs(httpx.Client):
    """The attacker's client: its bank start goes first naming ``issuer`` (a richer one,
    whose limit lets the bank debit more), then again with the same request_id naming the
    card's own issuer, as a retry of a lost answer; the load goes on with the second answer's
    ticket. The rest of the load is the honest client's."""

    def __init__(self, issuer: str) -> None:
        super().__init__(timeout=30)
        self.issuer = issuer
        self.first: httpx.Response | None = None

    def post(self, url: Any, **kwargs: Any) -> httpx.Response:
        body = kwargs.get("json")
        if body is not None and str(url).endswith("/v1/load/start") and self.first is None:
            self.first = super().post(url, **{**kwargs, "json": {
                **body, "card": {**body["card"], "issuer_id": self.issuer}}})
        return super().post(url, **kwargs)


def test_a_repeated_bank_start_cannot_name_another_issuer(loads: LoadStack,
                                                          tmp_path: Path) -> None:
    """F1's gap: the bank start priced for the richer issuer (50,000 fits its limit), then
    repeated with the same request_id naming the card's own issuer. The repeat must not get a
    ticket for the card's issuer: that loaded 50,000 onto a card the bank loads to 20,000."""
    card = demo_card(tmp_path)
    with (RepeatsStartAs(RICH_ISSUER) as http, open_reader(f"virtual:{card}") as reader,
          pytest.raises(PaymentRefused, match="another load")):
        LC.load(loads.bank_url, reader, account="bob", secret="pw", amount=50_000,
                journal=Journal(tmp_path / "j.jsonl"), http=http)
    assert http.first is not None and http.first.status_code == 200
    assert ep_balance(card) == 1_000
    assert loads.load_server.db.rows() == []
    # the first start's debit stays for the ticket it got (the richer issuer's, which no card
    # of the demo issuer can use: "not loaded" and refunded once its client reports)
    assert account_balance(loads) == 50_000
    [row] = loads.bank_server.db.loads()
    assert (row["issuer_id"], row["state"]) == (RICH_ISSUER.lower(), "debited")


def test_a_repeated_bank_start_naming_the_same_issuer_is_the_same_load(
        loads: LoadStack, tmp_path: Path) -> None:
    """The honest retry (same request_id, same issuer) still answers the same load, once."""
    card = demo_card(tmp_path)
    with (RepeatsStartAs(ISSUER) as http, open_reader(f"virtual:{card}") as reader):
        out = LC.load(loads.bank_url, reader, account="bob", secret="pw", amount=5_000,
                      journal=Journal(tmp_path / "j.jsonl"), http=http)
    assert out.outcome == "loaded"
    assert ep_balance(card) == 6_000 and account_balance(loads) == 95_000
    assert len(loads.bank_server.db.loads()) == 1


def test_a_bank_database_of_schema_1_is_upgraded_with_the_issuer_column(
        tmp_path: Path) -> None:
    """A bank database made before the issuer column opens upgraded (schema 2, its loads
    kept with no issuer); a repeated start of such a load is priced again for the issuer it
    names, as a new start would be."""
    url = f"sqlite:///{tmp_path / 'bank.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(
            "CREATE TABLE bank_loads (txn_id VARCHAR(32) PRIMARY KEY, request_id VARCHAR(64) "
            "UNIQUE, account_id VARCHAR(32) NOT NULL, amount BIGINT NOT NULL, card_serial "
            "VARCHAR(20) NOT NULL, state VARCHAR(16) NOT NULL, reason VARCHAR(200) NOT NULL, "
            "created BIGINT NOT NULL, updated BIGINT NOT NULL)"))
        conn.execute(text(
            "INSERT INTO bank_loads VALUES ('aa', 'req-old-0001', 'bob', 500, '00', "
            "'debited', '', 1, 1)"))
    engine.dispose()
    db = BD.BankDb(BD.make_engine(url))
    try:
        [row] = db.loads()
        assert row["issuer_id"] is None and row["amount"] == 500
        with db.engine.connect() as conn:
            version = conn.execute(text(
                "SELECT version FROM svcard_schema WHERE component = 'bank'")).scalar()
        assert version == BD.SCHEMA.version == 2
    finally:
        db.engine.dispose()


def test_a_repeated_start_of_a_load_made_before_the_issuer_column_is_priced_again(
        loads: LoadStack) -> None:
    from svcard.protocols import loadmsg as L
    from svcard.protocols import messages as M
    from svcard.protocols import secure
    serial = "00" * 9 + "01"
    for request_id, amount in (("req-old-big", 50_000), ("req-old-small", 5_000)):
        loads.bank_server.db.debit_for_load("bob", request_id.encode().hex()[:32], amount,
                                            serial, request_id, RICH_ISSUER.lower())
    with loads.bank_server.db.engine.begin() as conn:   # as a schema-1 row reads after upgrade
        conn.execute(text("UPDATE bank_loads SET issuer_id = NULL"))
    start = loads.bank_url + "/start"

    def repeat(request_id: str, amount: int) -> httpx.Response:
        return httpx.post(start, timeout=30, json={
            "account": "bob", "secret": "pw", "amount": amount, "request_id": request_id,
            "card": {"serial": serial, "issuer_id": ISSUER, "balance": 1_000,
                     "currency_code": 156}})

    refused = repeat("req-old-big", 50_000)
    assert refused.status_code == 400 and "at most 19000 more" in refused.text
    ok = repeat("req-old-small", 5_000)
    assert ok.status_code == 200, ok.text
    params = ok.json()
    bank_id, txn_id = bytes.fromhex(params["bank_id"]), bytes.fromhex(params["txn_id"])
    ticket = M.parse(L.LoadTicket, secure.open_sealed(
        loads.bank_server.dk(txn_id), bytes.fromhex(params["etsk"]),
        L.ticket_aad(bank_id, txn_id), "ETSK"), "ticket")
    assert ticket.issuer_id == bytes.fromhex(ISSUER)
