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


@pytest.fixture(params=["sqlite", "postgresql"])
def bank_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'bank.db'}"
        return
    from pg_env import start_cluster
    cluster = start_cluster()
    try:
        yield cluster.new_database()
    finally:
        cluster.stop()


def test_a_bank_database_of_schema_1_is_upgraded_with_the_issuer_column(bank_url: str) -> None:
    """A bank database of schema 1 (stamped, bank_loads without the issuer) opens upgraded to
    schema 2, its loads kept with no issuer."""
    url = bank_url
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
    engine = create_engine(url)
    with engine.begin() as conn:   # stamped as version 1, as a schema-1 svcard left it
        from svcard.host.kit import schema as S
        S._stamps.create_all(conn)
        conn.execute(S.stamps.insert().values(component="bank", version=1, written_by="old",
                                              updated=1))
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


# --- traces: a PIN in any VERIFY / CHANGE PIN form never reaches a trace file -----------------

PIN_CARD_COMMANDS = {
    # a third-party host may send VERIFY with extended length (the card takes it: 9000)
    "extended VERIFY": bytes.fromhex("0020000000000312345F"),
    # a short VERIFY whose Lc counts fewer bytes than follow (the card answers 6700)
    "VERIFY, Lc short of its data": bytes.fromhex("002000000112345F"),
    "extended CHANGE PIN": bytes.fromhex("805E0100000007" "12345F" "FF" "65432F"),
}


@pytest.mark.parametrize("name", sorted(PIN_CARD_COMMANDS))
def test_a_pin_in_any_apdu_form_is_redacted_in_the_trace(tmp_path: Path, name: str) -> None:
    from svcard.reader.trace import RecordingReader, TraceReader
    command = PIN_CARD_COMMANDS[name]
    card = demo_card(tmp_path)
    out = tmp_path / "t.jsonl"
    select = bytes.fromhex("00A4040009F05356434152440101")
    with RecordingReader(open_reader(f"virtual:{card}"), out) as reader:
        reader.transmit(select)
        answer = reader.transmit(command)
    raw = out.read_text()
    assert "345F" not in raw.upper() and "6543" not in raw, raw
    # the redacted trace still replays the same command
    with TraceReader(out) as replay:
        replay.transmit(select)
        assert replay.transmit(command) == answer


def test_an_imported_log_keeps_no_pin(tmp_path: Path) -> None:
    """A GlobalPlatformPro log of a session with a VERIFY, imported: the svcard trace it
    writes has the PIN redacted, as a recorded one would."""
    from svcard.reader.trace import load_trace
    from svcard.reader.trace_import import import_file
    log = tmp_path / "gp.log"
    log.write_text("A>> T=1 (4+0003) 00200000 03 12345F\nA<< (0000+2) (1ms) 9000\n")
    out = tmp_path / "t.jsonl"
    import_file("gp", log).save(out)
    assert "12345F" not in out.read_text().upper()
    [verify] = load_trace(out).exchanges
    assert verify.redacted and verify.matches(bytes.fromhex("0020000003" "12345F"))


def test_an_exported_and_reimported_trace_still_replays_its_verify(tmp_path: Path) -> None:
    from svcard.reader.trace import RecordingReader, TraceReader
    from svcard.reader.trace_export import export_trace
    from svcard.reader.trace_import import import_file
    card = demo_card(tmp_path)
    out = tmp_path / "t.jsonl"
    select = bytes.fromhex("00A4040009F05356434152440101")
    verify = bytes.fromhex("0020000003123456")
    with RecordingReader(open_reader(f"virtual:{card}"), out) as reader:
        reader.transmit(select)
        answer = reader.transmit(verify)
    (tmp_path / "gp.log").write_text(export_trace(load_trace_of(out), "gp"))
    again = tmp_path / "again.jsonl"
    import_file("gp", tmp_path / "gp.log").save(again)
    with TraceReader(again) as replay:
        replay.transmit(select)
        assert replay.transmit(verify) == answer


def load_trace_of(path: Path) -> Any:
    from svcard.reader.trace import load_trace
    return load_trace(path)


def test_the_applet_personalisation_keys_never_reach_a_trace(tmp_path: Path) -> None:
    """The personalisation script's APDUs (keys and PIN in clear) sent through a recorded
    reader, as `svcard apdu --trace-out` would: the trace holds none of their data."""
    from svcard.card.applet import personalisation_apdus
    from svcard.card.iep import Iep
    from svcard.card.image import app_of, card_from_image
    from svcard.reader.trace import RecordingReader
    card = demo_card(tmp_path)
    app = app_of(card_from_image(read_image(card)))
    assert isinstance(app, Iep)
    state = app.state
    keys = [k.key.hex().upper() for k in state.purchase_keys.values()] + [
        state.tac_key.hex().upper()]
    out = tmp_path / "t.jsonl"
    with RecordingReader(open_reader(f"virtual:{card}"), out) as reader:
        for apdu in personalisation_apdus(state):
            reader.transmit(apdu)
    raw = out.read_text().upper()
    assert sum(k[:16] in raw for k in keys) == 0   # (a failure names no key)
