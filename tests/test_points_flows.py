"""Loyalty points through the networked flows (seed 002 FIG. 16): loaded through the load flow
with the programme's server in the bank's role (its HSM holds the programme's keys), redeemed
through the payment flow in every variant FIG. 5-8 with the programme's web server in the
merchant's role (a points PSAM pool), the benefit released only on a valid confirmation;
clearing and the audit count points per programme, apart from money."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_loyalty import MILES_AID, TWO_PROGRAMMES, write_profile
from test_persistence import Tear

from svcard.card.image import open_card, save_new_image
from svcard.card.personalise import image_from_profile
from svcard.card.storage import PowerCut, read_image
from svcard.host.load import client as load_client
from svcard.host.load.stack import LoadStack, start_load_stack
from svcard.host.pay import client as pay_client
from svcard.host.pay.merchant.server import Item
from svcard.host.pay.stack import Stack, start_stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.online import PaymentRefused
from svcard.host.terminal.purse import TerminalCheckFailed
from svcard.host.terminal.reader_specs import open_reader
from svcard.reader.virtual import VirtualReader

BENEFITS = (Item("upgrade", "Seat upgrade", 1500, "UPGRADE-7F3A"),
            Item("lounge", "Lounge pass", 400, "LOUNGE-0042"))


class Programme:
    """The skymiles programme's servers: its load server + 'bank' (the member accounts of
    points, currency 999) with an HSM holding the programme's keys, and its web server in the
    merchant's role with a pool of points PSAMs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        save_new_image(folder / "card.json",
                       image_from_profile(write_profile(folder, TWO_PROGRAMMES)))
        (folder / "hsm.toml").write_text('kind = "hsm"\nissuers = ["miles-issuer.toml"]\n')
        save_new_image(folder / "hsm.json", image_from_profile(folder / "hsm.toml"))
        self.psams = []
        for n in (1, 2):
            (folder / f"psam{n}.toml").write_text(
                f'kind = "psam"\nissuers = ["miles-issuer.toml"]\nterminal_id = "000000000009"\n'
                f'psam_serial = "0000000000000000000{n}"\n'
                'batch_key = "311B7052A40A83B818D99E9EC07821C9"\n'
                "currency_code = 999\ncurrency_exponent = 0\n")
            save_new_image(folder / f"psam{n}.json",
                           image_from_profile(folder / f"psam{n}.toml"))
            self.psams.append(folder / f"psam{n}.json")
        self.load: LoadStack = start_load_stack(
            folder / "load", hsm_readers=[open_reader(f"virtual:{folder / 'hsm.json'}")],
            bank_options={"currency_code": 999, "currency_exponent": 0})
        self.pay: Stack = start_stack(
            folder / "pay", psam_readers=[open_reader(f"virtual:{p}") for p in self.psams],
            admin_token="t" * 32, concentration_dir=str(folder / "concentration"),
            merchant_options={"currency_code": 999, "currency_exponent": 0,
                              "catalogue": BENEFITS})
        self.insert()
        self.http = httpx.Client(timeout=30)
        self.journal = Journal(folder / "journal.jsonl")

    def close(self) -> None:
        self.card.disconnect()
        self.http.close()
        self.pay.close()
        self.load.close()

    def clear(self) -> Any:
        from svcard.host.settle.clearing import run_clearing
        from svcard.host.settle.config import clearing_config
        from svcard.host.settle.db import make_engine

        response = httpx.post(f"{self.pay.payment.url}/v1/batches/close", timeout=60,
                              headers={"Authorization": "Bearer " + "t" * 32})
        response.raise_for_status()
        config = self.folder / "clearing.toml"
        config.write_text(
            'settlement_key = "' + "5C" * 32 + '"\ncurrency_code = 999\n'
            '[[issuer]]\nprofile = "miles-issuer.toml"\n'
            '[[terminal]]\nterminal_id = "000000000009"\n'
            'batch_key = "311B7052A40A83B818D99E9EC07821C9"\n'
            'merchant_id = "4D45524348303031"\nacquirer_id = "4143515530303031"\n')
        return run_clearing(clearing_config(config), self.folder / "concentration",
                            make_engine(self.clearing_db), self.folder / "settlement",
                            load_db_urls=(str(self.load.load_server.config.db_url),))

    @property
    def clearing_db(self) -> str:
        return f"sqlite:///{self.folder / 'clearing.db'}"

    def audit(self, opening: int) -> Any:
        from svcard.host.settle.audit import audit, card_balances

        return audit(card_balances([self.card], MILES_AID),
                     payment_dbs=(self.pay.payment_server.config.db_url,),
                     load_dbs=(self.load.load_server.config.db_url,),
                     bank_dbs=(self.load.bank_server.config.db_url,),
                     clearing_db=self.clearing_db, opening=opening)

    def insert(self) -> None:
        """The card in a fresh reader (a disconnected virtual reader has closed its image)."""
        self.card = open_reader(f"virtual:{self.folder / 'card.json'}")
        self.card.connect()

    def released_benefits(self) -> dict[str, int]:
        """Order -> points, of every benefit the programme's web server released."""
        from sqlalchemy import select

        from svcard.host.pay.merchant.db import RELEASED, orders

        with self.pay.merchant_server.db.engine.connect() as conn:
            rows = conn.execute(select(orders.c.txn_id, orders.c.amount)
                                .where(orders.c.state.in_(RELEASED))).all()
        return {r.txn_id: int(r.amount) for r in rows}

    def points(self) -> int:
        self.card.disconnect()   # the image is read from disk: release it first
        try:
            return int(read_image(self.folder / "card.json")["loyalty"][0]["ep"]["balance"])
        finally:
            self.insert()


@pytest.fixture
def programme(tmp_path: Path):
    p = Programme(tmp_path)
    try:
        yield p
    finally:
        p.close()


def test_points_loaded_then_redeemed_in_each_variant(programme: Programme) -> None:
    p = programme
    p.load.account("member-42", 20_000, "s3cret")
    out = load_client.load(p.load.bank_url, p.card, account="member-42", secret="s3cret",
                           amount=3_999, journal=p.journal, http=p.http,
                           aid=MILES_AID)
    assert out.outcome == "loaded" and out.balance_after == 4_999
    spent = 0
    for variant in ("fig5", "fig6", "fig7", "fig8"):
        r = pay_client.pay(p.pay.checkout_url("lounge", variant), p.card, journal=p.journal,
                           http=p.http, aid=MILES_AID,
                           terminal=p.pay.client_terminal if variant == "fig7" else None)
        spent += 400
        assert r.goods == "LOUNGE-0042", variant
        assert r.balance_after == 4_999 - spent
    assert p.points() == 4_999 - spent
    # clearing: the programme's own run, in points (currency 999), per programme (issuer)
    report = p.clear()
    assert report.records_cleared == 4 and report.total_paid == 1_600
    assert report.loads_moved == 1 and report.total_loaded == 3_999
    acquired = [line for line in report.lines if line["kind_name"] == "acquirer total"]
    assert [(line["payer"], line["amount"]) for line in acquired] == \
        [("2000000000000001", 1_600)]
    # the audit of the programme: card points, payments, loads, member accounts, clearing
    audit = p.audit(opening=1_000)
    assert audit.clean, audit.text()
    assert audit.figures["card balances"] == 4_999 - spent
    assert audit.figures["loads confirmed"] == audit.figures["bank accounts debited"] == 3_999
    assert audit.figures["purchases settled"] == 1_600


def _capture(p: Programme) -> list[tuple[str, bytes]]:
    """Every confirmation the client posts to the programme's web server: (URL, body)."""
    seen: list[tuple[str, bytes]] = []

    def hook(request: httpx.Request) -> None:
        if "/v1/status/" in request.url.path:
            seen.append((str(request.url), request.read()))
    p.http.event_hooks["request"].append(hook)
    return seen


def _order(p: Programme, sku: str) -> str:
    """A new order at the programme's web server, not paid: its status URL."""
    params = pay_client.fetch_checkout(p.http, p.pay.checkout_url(sku, "fig6"))
    return f"{p.pay.merchant.url}/v1/status/{params['txn_id']}"


def test_the_benefit_is_released_only_on_a_valid_confirmation(programme: Programme) -> None:
    p = programme
    seen = _capture(p)
    r = pay_client.pay(p.pay.checkout_url("lounge", "fig6"), p.card, journal=p.journal,
                       http=p.http, aid=MILES_AID)
    assert r.goods == "LOUNGE-0042" and p.points() == 600
    (url_a, conf_a), = seen
    other = _order(p, "upgrade")
    txn_b = other.rsplit("/", 1)[1]
    for body in (b"", bytes(64), conf_a[:-5], conf_a[:20] + bytes([conf_a[20] ^ 1])
                 + conf_a[21:]):
        answer = p.http.post(other, content=body)   # forged, truncated, altered
        assert answer.status_code >= 400 and "UPGRADE" not in answer.text
    answer = p.http.post(other, content=conf_a)    # A's confirmation aimed at order B
    assert answer.status_code >= 400 and "UPGRADE" not in answer.text
    altered = conf_a[:-1] + bytes([conf_a[-1] ^ 1])
    answer = p.http.post(url_a, content=altered)   # A's, altered, after A was released
    assert answer.status_code == 409 and "LOUNGE" not in answer.text
    assert p.http.post(url_a, content=conf_a).json()["goods"] == "LOUNGE-0042"   # same again
    assert p.pay.merchant_server.db.get(txn_b)["state"] == "open"
    assert p.points() == 600


def test_points_short_of_the_benefit_release_nothing(programme: Programme) -> None:
    """600 points do not pay a 1,500-point upgrade: the card refuses (9401) before any debit,
    the order stays open, no benefit; nothing moved at the programme's servers."""
    p = programme
    seen = _capture(p)
    url = p.pay.checkout_url("upgrade", "fig5")
    with pytest.raises(Exception, match="9401"):
        pay_client.pay(url, p.card, journal=p.journal, http=p.http, aid=MILES_AID)
    assert not seen and p.points() == 1_000


def test_money_never_pays_for_points_nor_points_for_money(programme: Programme,
                                                          tmp_path: Path) -> None:
    """The purse (money, currency 156) at the programme's web server, and the programme's
    points at a money merchant: both refused by the client before the card is debited; and
    the programme's load server will not load the purse, nor a money bank the programme."""
    p = programme
    p.load.account("member-42", 5_000, "s3cret")
    with pytest.raises(TerminalCheckFailed, match="currency"):
        pay_client.pay(p.pay.checkout_url("lounge", "fig6"), p.card, journal=p.journal,
                       http=p.http)                            # the purse's AID, money
    with pytest.raises(PaymentRefused, match="currency"):
        load_client.load(p.load.bank_url, p.card, account="member-42", secret="s3cret",
                         amount=10, journal=p.journal, http=p.http)   # money into points
    money = start_load_stack(tmp_path / "money-load")
    try:
        money.account("alice", 5_000, "pw")
        with pytest.raises(PaymentRefused, match="currency"):
            load_client.load(money.bank_url, p.card, account="alice", secret="pw", amount=10,
                             journal=p.journal, http=p.http, aid=MILES_AID)
    finally:
        money.close()
    assert p.points() == 1_000


class _TornCard:
    """The programme's card over a reader whose next DEBIT / CREDIT loses power at write step
    ``cut`` (0-7: the tearing harness's steps), or, with ``cut`` None, whose answer is lost
    after the card wrote everything."""

    def __init__(self, p: Programme, cut: int | None) -> None:
        self.tear = Tear(cut)
        self.cut = cut
        p.card.disconnect()
        self.card = open_card(p.folder / "card.json", tear=self.tear)
        self.reader = VirtualReader(self.card)
        self.reader.connect()
        real = self.reader.exchange

        def exchange(apdu: bytes) -> Any:
            completion = apdu[:2] in (b"\x80\x52", b"\x80\x54")
            self.tear.armed = completion
            answer = real(apdu)
            if completion and cut is None:
                raise PowerCut("the answer was lost")
            return answer
        self.reader.exchange = exchange  # type: ignore[method-assign]

    def close(self, p: Programme) -> None:
        self.card.close()
        p.insert()


@pytest.mark.parametrize("flow", ["redeem", "load"])
@pytest.mark.parametrize("cut", [0, 2, 3, 7, None])
def test_a_torn_card_is_finished_once_and_the_audit_is_clean(programme: Programme, flow: str,
                                                              cut: int | None) -> None:
    """A power cut at a write step of the card's DEBIT (redeem) or CREDIT (load), or its answer
    lost: the resume finishes the transaction on the programme's ADF exactly once (points and
    benefit, or points and the member account's debit), and the programme's audit is clean."""
    p = programme
    p.load.account("member-42", 5_000, "s3cret")
    torn = _TornCard(p, cut)
    try:
        with pytest.raises(PowerCut):
            if flow == "redeem":
                pay_client.pay(p.pay.checkout_url("lounge", "fig6"), torn.reader,
                               journal=p.journal, http=p.http, aid=MILES_AID)
            else:
                load_client.load(p.load.bank_url, torn.reader, account="member-42",
                                 secret="s3cret", amount=700, journal=p.journal, http=p.http,
                                 aid=MILES_AID)
    finally:
        torn.close(p)
    committed = cut is None or cut >= 3   # write 1 (balance, counter, proof) renamed
    if flow == "redeem":
        report = pay_client.resume(p.card, journal=p.journal, http=p.http, aid=MILES_AID)
    else:
        report = load_client.resume_loads(p.card, journal=p.journal, http=p.http,
                                          aid=MILES_AID)
    assert len(report) == 1, report
    assert pay_client.resume(p.card, journal=p.journal, http=p.http, aid=MILES_AID) == []
    assert load_client.resume_loads(p.card, journal=p.journal, http=p.http, aid=MILES_AID) == []
    moved = {"redeem": -400, "load": +700}[flow] if committed else 0
    assert p.points() == 1_000 + moved, report
    p.clear()
    audit = p.audit(opening=1_000)
    assert audit.clean, audit.text()
    assert audit.figures["card balances"] == 1_000 + moved
    if flow == "load":
        assert audit.figures["bank accounts debited"] == (700 if committed else 0)


def _count(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def test_random_loads_and_redemptions_with_tears_audit_clean(programme: Programme) -> None:
    """Randomised (SVCARD_POINTS_OPS operations, default 16; replay with SVCARD_POINTS_SEED):
    points loaded and redeemed in random variants, half of them torn at a random write step
    or with the card's answer lost, each resumed. Then: every benefit released was paid with
    points exactly once, the card's points = opening + loads - redemptions, and the
    programme's audit is clean to the point."""
    seed = _count("SVCARD_POINTS_SEED", random.randrange(2**32))
    ops = _count("SVCARD_POINTS_OPS", 16)
    print(f"points flows seed {seed}, {ops} operations (replay: SVCARD_POINTS_SEED={seed})")
    rng = random.Random(seed)
    p = programme
    p.load.account("member-42", 1_000_000, "s3cret")
    refused = 0
    for n in range(ops):
        points = p.points()
        fault = rng.choice([None, None, "tear", "lost"])
        reader = p.card
        torn = None
        if fault is not None:
            torn = _TornCard(p, rng.randrange(8) if fault == "tear" else None)
            reader = torn.reader
        try:
            if points < 400 or rng.random() < 0.4:
                room = 5_000 - points
                amount = rng.randrange(1, room + 1)
                load_client.load(p.load.bank_url, reader, account="member-42", secret="s3cret",
                                 amount=amount, journal=p.journal, http=p.http, aid=MILES_AID)
            else:
                variant = rng.choice(["fig5", "fig6", "fig7", "fig8"])
                sku = "upgrade" if points >= 1_500 and rng.random() < 0.5 else "lounge"
                pay_client.pay(p.pay.checkout_url(sku, variant), reader, journal=p.journal,
                               http=p.http, aid=MILES_AID,
                               terminal=p.pay.client_terminal if variant == "fig7" else None)
        except PowerCut:
            assert fault is not None, f"seed {seed} op {n}"
        except PaymentRefused as exc:   # e.g. a torn FIG. 5 payment still holds its PSAM
            assert exc.status in (429, 503), f"seed {seed} op {n}: {exc}"
            refused += 1
        finally:
            if torn is not None:
                torn.close(p)
        pay_client.resume(p.card, journal=p.journal, http=p.http, aid=MILES_AID,
                          terminal=p.pay.client_terminal)
        load_client.resume_loads(p.card, journal=p.journal, http=p.http, aid=MILES_AID)
    p.clear()
    audit = p.audit(opening=1_000)
    print(f"{ops} operations, {refused} refused while a PSAM was held; "
          + ", ".join(f"{k} {v}" for k, v in audit.figures.items()))
    assert audit.clean, f"seed {seed}\n{audit.text()}"
    released = p.released_benefits()
    assert sum(released.values()) == audit.figures["purchases proven"], f"seed {seed}"
    assert p.points() == (1_000 + audit.figures["loads confirmed"]
                          - audit.figures["purchases proven"]), f"seed {seed}"
