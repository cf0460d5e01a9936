"""Issue 11 loose ends (helper F1): a purse that answers SELECT with a bare 9000 (no FCI), a
malformed FCI, and what a card without a stated currency may still do."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from svcard.card.image import card_from_image, check_image, save_new_image
from svcard.card.personalise import image_from_profile
from svcard.card.storage import ImageError, read_image
from svcard.fixtures import fixture_path
from svcard.host.cli.main import main
from svcard.host.load import client as LC
from svcard.host.load.stack import LoadStack, start_load_stack
from svcard.host.pay import client as PC
from svcard.host.pay.stack import Stack
from svcard.host.terminal import card_commands
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.online import PaymentRefused
from svcard.host.terminal.purse import TerminalCheckFailed, select_purse
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import purse as P
from svcard.reader import Reader
from svcard.reader.virtual import VirtualReader

PBOC_AID = "A00000000386980701"


class SelectAnswerStandIn(Reader):
    """A stand-in for a purse whose SELECT answer differs from svcard's card: every other APDU
    goes to the real (virtual) card, a successful SELECT's data is replaced by ``fci`` (empty:
    a bare 9000, as some real purses and GlobalPlatform applets answer)."""

    def __init__(self, inner: Reader, fci: bytes = b"") -> None:
        self.inner, self.fci, self.name = inner, fci, "select-answer stand-in"

    def connect(self) -> bytes:
        return self.inner.connect()

    def disconnect(self) -> None:
        self.inner.disconnect()

    def transmit(self, apdu: bytes) -> bytes:
        answer = self.inner.transmit(apdu)
        if apdu[1] == P.INS_SELECT and answer[-2:] == b"\x90\x00":
            return self.fci + b"\x90\x00"
        return answer


def svcard(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="svcard")


def pboc_card(folder: Path, ep: int = 10_000) -> Path:
    image = image_from_profile(fixture_path("iep-demo.toml"), aid=PBOC_AID)
    image["app"]["ep"]["balance"] = ep
    path = folder / "pboc.json"
    save_new_image(path, image, overwrite=True)
    return path


def balance(card: Path) -> int:
    return int(read_image(card)["app"]["ep"]["balance"])


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Callable[[bytes], None]:
    """Every reader the CLI opens answers a SELECT with ``fci`` (the tests using it open a
    purse card only)."""
    def use(fci: bytes) -> None:
        monkeypatch.setattr(card_commands, "open_reader",
                            lambda spec: SelectAnswerStandIn(open_reader(spec), fci))
    return use


def test_a_bare_9000_select_is_read_by_read_binary(tmp_path: Path,
                                                   stand_in: Callable[[bytes], None]) -> None:
    card = pboc_card(tmp_path)
    stand_in(b"")
    r = svcard("terminal", "balance", "--aid", PBOC_AID, "--card", f"virtual:{card}", "--json")
    assert r.exit_code == 0, r.output
    assert "\"balance\": 10000" in r.output and "00000000000000000001" in r.output
    with SelectAnswerStandIn(open_reader(f"virtual:{card}")) as reader:
        info = select_purse(reader, bytes.fromhex(PBOC_AID))
    assert (info.aid, info.label, info.currency_code) == (PBOC_AID, "", None)
    log = svcard("terminal", "log", "--aid", PBOC_AID, "--card", f"virtual:{card}")
    assert log.exit_code == 0, log.output


@pytest.mark.parametrize("fci, says", [
    (bytes.fromhex("7003840100"), "an FCI starts with tag 6F"),           # not an FCI
    (bytes.fromhex("6F0584"), "truncated"),                                # cut short
    (bytes.fromhex("6F03500141"), "no DF name"),                           # no 84
    (bytes.fromhex("6F0A8401A0A5055F2A02ABCD"), "currency"),              # currency not BCD
], ids=["not-6F", "cut-short", "no-DF-name", "currency-not-BCD"])
def test_a_malformed_fci_is_one_line(tmp_path: Path, stand_in: Callable[[bytes], None],
                                     fci: bytes, says: str) -> None:
    card = pboc_card(tmp_path)
    stand_in(fci)
    r = svcard("terminal", "balance", "--aid", PBOC_AID, "--card", f"virtual:{card}")
    assert r.exit_code == 1, r.output
    assert r.output.count("\n") == 1 and "FCI is malformed" in r.output, r.output
    assert "Traceback" not in r.output and "internal error" not in r.output


def test_a_short_public_data_file_is_one_line() -> None:
    class ShortEf15(SelectAnswerStandIn):
        def transmit(self, apdu: bytes) -> bytes:
            if apdu[1] == P.INS_READ_BINARY:
                return bytes(12) + b"\x90\x00"
            return super().transmit(apdu)
    image = image_from_profile(fixture_path("iep-demo.toml"))
    with (ShortEf15(VirtualReader(card_from_image(image))) as reader,
          pytest.raises(TerminalCheckFailed, match=r"EF 0x15\) is malformed")):
        select_purse(reader)


def test_local_purchase_without_fci_in_minor_units(tmp_path: Path,
                                                   stand_in: Callable[[bytes], None]) -> None:
    """The local terminal still pays (the PSAM states the currency); a decimal amount, which
    needs the card's exponent, is one line."""
    card = pboc_card(tmp_path)
    psam = tmp_path / "psam.json"
    save_new_image(psam, image_from_profile(fixture_path("psam-demo.toml")))

    def wrap(spec: str) -> Reader:
        reader = open_reader(spec)
        return SelectAnswerStandIn(reader) if "pboc" in spec else reader
    mp = pytest.MonkeyPatch()
    mp.setattr(card_commands, "open_reader", wrap)
    try:
        ok = svcard("terminal", "purchase", "--aid", PBOC_AID, "--card", f"virtual:{card}",
                    "--psam", f"virtual:{psam}", "--amount", "250u")
        assert ok.exit_code == 0, ok.output
        assert balance(card) == 10_000 - 250
        decimal = svcard("terminal", "purchase", "--aid", PBOC_AID, "--card",
                         f"virtual:{card}", "--psam", f"virtual:{psam}", "--amount", "2.50")
        assert decimal.exit_code != 0 and decimal.output.count("\n") == 1, decimal.output
        assert "exponent" in decimal.output and balance(card) == 10_000 - 250
    finally:
        mp.undo()


def test_network_pay_without_a_card_currency_declines(stack: Stack, tmp_path: Path,
                                                      stand_in: Callable[[bytes], None]
                                                      ) -> None:
    """The merchant's order is in a currency; a card that states none is declined before
    going online, in one line (exit 1), and nothing is debited."""
    card = pboc_card(tmp_path)
    stand_in(b"")
    r = svcard("pay", stack.checkout_url("ticket", "fig6"), "--card", f"virtual:{card}",
               "--aid", PBOC_AID, "--journal", str(tmp_path / "cli.jsonl"))
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "states no currency" in r.output
    with (httpx.Client(timeout=30) as http,
          SelectAnswerStandIn(open_reader(f"virtual:{card}")) as reader,
          pytest.raises(TerminalCheckFailed, match="states no currency")):
        PC.pay(stack.checkout_url("ticket", "fig6"), reader,
               journal=Journal(tmp_path / "j.jsonl"), http=http,
               aid=bytes.fromhex(PBOC_AID))
    assert balance(card) == 10_000
    assert stack.payment_server.db.counts().get("received", 0) == 0


@pytest.fixture
def loads(tmp_path: Path) -> Iterator[LoadStack]:
    s = start_load_stack(tmp_path / "load")
    s.account("alice", 20_000, "pw")
    yield s
    s.close()


def account_balance(loads: LoadStack, name: str = "alice") -> int:
    row = loads.bank_server.db.account(name)
    assert row is not None
    return int(row["balance"])


def test_network_load_without_a_card_currency_declines(loads: LoadStack, tmp_path: Path) -> None:
    """The bank loads in its currency; a card that states none is declined before the bank
    is asked: nothing debited, nothing loaded."""
    card = pboc_card(tmp_path)
    with (httpx.Client(timeout=30) as http,
          SelectAnswerStandIn(open_reader(f"virtual:{card}")) as reader,
          pytest.raises(TerminalCheckFailed, match="states no currency")):
        LC.load(loads.bank_url, reader, account="alice", secret="pw", amount=500,
                journal=Journal(tmp_path / "j.jsonl"), http=http,
                aid=bytes.fromhex(PBOC_AID))
    assert account_balance(loads) == 20_000 and balance(card) == 10_000


# --- the load ticket binds the card's issuer (issue 11, finding 3's bank limit) ---------------

ISSUER = "1000000000000001"        # the demo card's issuer: the bank loads its cards to 20,000
RICH_ISSUER = "2000000000000002"   # another issuer, configured with a far bigger limit


class NamingIssuer(httpx.Client):
    """The attacker's client: the real card, but the bank start names ``issuer`` (the rest of
    the load goes as the honest client sends it: the load request names the card's own)."""

    def __init__(self, issuer: str) -> None:
        super().__init__(timeout=30)
        self.issuer = issuer

    def post(self, url: Any, **kwargs: Any) -> httpx.Response:
        body = kwargs.get("json")
        if body is not None and str(url).endswith("/v1/load/start"):
            kwargs["json"] = {**body, "card": {**body["card"], "issuer_id": self.issuer}}
        return super().post(url, **kwargs)


def issuer_limits(loads: LoadStack) -> None:
    loads.bank_server.config.issuer_limits = {bytes.fromhex(ISSUER): 20_000,
                                              bytes.fromhex(RICH_ISSUER): 900_000}


def test_a_client_naming_a_richer_issuer_is_not_loaded(loads: LoadStack, tmp_path: Path) -> None:
    issuer_limits(loads)
    loads.account("bob", 100_000, "pw")
    card = tmp_path / "card.json"
    image = image_from_profile(fixture_path("iep-demo.toml"))
    image["app"]["ep"]["balance"] = 1_000
    save_new_image(card, image)
    journal = Journal(tmp_path / "j.jsonl")
    # honest: the card's own issuer's limit (20,000) is what the bank applies
    with (httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader,
          pytest.raises(PaymentRefused, match=r"at most 19000 more")):
        LC.load(loads.bank_url, reader, account="bob", secret="pw", amount=50_000,
                journal=journal, http=http)
    # the attacker names the richer issuer to the bank (which then allows 99,000 more: the
    # card's own limit): the bank debits, the load server sees a request for another issuer's
    # card than the ticket's and issues no S2; "not loaded", the account is re-credited
    with NamingIssuer(RICH_ISSUER) as http, open_reader(f"virtual:{card}") as reader:
        out = LC.load(loads.bank_url, reader, account="bob", secret="pw", amount=50_000,
                      journal=journal, http=http)
    assert out.outcome == "not loaded", out
    assert "priced this load for another issuer's card" in journal.path.read_text()
    assert balance(card) == 1_000 and account_balance(loads, "bob") == 100_000
    rows = loads.load_server.db.rows()
    assert [r["state"] for r in rows] == ["not_loaded"] and not rows[0]["s2"]
    # the same amount loads for the card's own issuer
    with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        assert LC.load(loads.bank_url, reader, account="bob", secret="pw", amount=15_000,
                       journal=journal, http=http).outcome == "loaded"
    assert balance(card) == 16_000 and account_balance(loads, "bob") == 85_000


def test_a_client_naming_the_richer_issuer_everywhere_is_not_loaded(
        loads: LoadStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same attacker, naming the richer issuer in the load request too (so it matches the
    ticket): the HSM looks the keys up by that issuer, and the card's S1 is not of it."""
    import dataclasses
    issuer_limits(loads)
    loads.account("bob", 100_000, "pw")
    card = tmp_path / "card.json"
    image = image_from_profile(fixture_path("iep-demo.toml"))
    image["app"]["ep"]["balance"] = 1_000
    save_new_image(card, image)
    real = LC.select_purse
    monkeypatch.setattr(LC, "select_purse", lambda reader, aid: dataclasses.replace(
        real(reader, aid), issuer_id=RICH_ISSUER))
    with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        out = LC.load(loads.bank_url, reader, account="bob", secret="pw", amount=50_000,
                      journal=Journal(tmp_path / "j.jsonl"), http=http)
    assert out.outcome == "not loaded", out
    assert balance(card) == 1_000 and account_balance(loads, "bob") == 100_000
    rows = loads.load_server.db.rows()
    assert len(rows) == 1 and rows[0]["issuer_id"] == RICH_ISSUER.lower()
    assert rows[0]["state"] == "not_loaded" and not rows[0]["s2"]


def test_the_ticket_carries_the_issuer_the_bank_priced_for(loads: LoadStack) -> None:
    from svcard.protocols import loadmsg as L
    from svcard.protocols import messages as M
    from svcard.protocols import secure
    issuer_limits(loads)
    body = {"account": "alice", "secret": "pw", "amount": 100,
            "card": {"serial": "00" * 9 + "01", "issuer_id": RICH_ISSUER, "balance": 0,
                     "currency_code": 156}}
    r = httpx.post(loads.bank_url.rsplit("/v1/", 1)[0] + "/v1/load/start", json=body,
                   timeout=30)
    assert r.status_code == 200, r.text
    params = r.json()
    bank_id, txn_id = bytes.fromhex(params["bank_id"]), bytes.fromhex(params["txn_id"])
    ticket = M.parse(L.LoadTicket, secure.open_sealed(
        loads.bank_server.dk(txn_id), bytes.fromhex(params["etsk"]),
        L.ticket_aad(bank_id, txn_id), "ETSK"), "ticket")
    assert (ticket.version, ticket.issuer_id) == (2, bytes.fromhex(RICH_ISSUER))


# --- svcard audit --card ... --aid ------------------------------------------------------------

def test_the_audit_reads_a_card_at_its_aid(tmp_path: Path) -> None:
    card = pboc_card(tmp_path)
    default = svcard("audit", "--card", str(card), "--opening", "10000")
    assert default.exit_code == 1 and "no purse application F05356434152440101" in default.output
    at_aid = svcard("audit", "--card", str(card), "--opening", "10000", "--aid", PBOC_AID,
                    "--json")
    assert at_aid.exit_code == 0, at_aid.output
    assert '"card balances": 10000' in at_aid.output and '"clean": true' in at_aid.output
    bad = svcard("audit", "--card", str(card), "--aid", "12")
    assert bad.exit_code == 2 and "--aid '12'" in bad.output and bad.output.count("\n") == 1


# --- a changsha-metro card pays over the network: the draw request carries its UID ----------

def metro_stack_files(folder: Path) -> tuple[Path, Path]:
    """A metro card (EP 100.00, UID) and a PSAM of its issuer, as image files."""
    from test_mac_schemes import write_metro_files
    files = write_metro_files(folder)
    card, psam = folder / "metro-card.json", folder / "metro-psam.json"
    image = image_from_profile(files["iep"])
    image["app"]["ep"]["balance"] = 10_000
    save_new_image(card, image)
    save_new_image(psam, image_from_profile(files["psam"]))
    return card, psam


@pytest.fixture
def draws(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The plaintext of every draw request the client seals."""
    from svcard.protocols import messages as M
    seen: list[bytes] = []
    real = M.seal_envelope

    def keep(msg_type: int, *args: Any) -> bytes:
        if msg_type == M.DRAW_REQUEST:
            seen.append(args[-1])
        return real(msg_type, *args)
    monkeypatch.setattr(M, "seal_envelope", keep)
    return seen


@pytest.mark.parametrize("variant", ["fig5", "fig6", "fig8"])
def test_a_metro_card_pays_over_the_network(tmp_path: Path, draws: list[bytes],
                                            variant: str) -> None:
    from svcard.host.pay.stack import start_stack
    card, psam = metro_stack_files(tmp_path)
    stack = start_stack(tmp_path / "stack", psam_readers=[open_reader(f"virtual:{psam}")])
    try:
        with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
            out = PC.pay(stack.checkout_url("ticket", variant), reader,
                         journal=Journal(tmp_path / "j.jsonl"), http=http)
        assert out.balance_after == 10_000 - out.amount and out.amount > 0
        assert balance(card) == 10_000 - out.amount
        assert stack.payment_server.db.counts().get("confirmed", 0) == 1
    finally:
        stack.close()
    assert len(draws) == 1 and draws[0][-9:] == bytes.fromhex("850102030405060708")


def test_a_pboc_draw_keeps_its_bytes(stack: Stack, tmp_path: Path, draws: list[bytes]) -> None:
    from svcard.protocols import messages as M
    card = pboc_card(tmp_path)
    with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        PC.pay(stack.checkout_url("ticket", "fig6"), reader, journal=Journal(tmp_path / "j"),
               http=http, aid=bytes.fromhex(PBOC_AID))
    assert len(draws) == 1 and len(draws[0]) == 43     # the version-1 layout, no UID after it
    fields = dict(M.DrawRequest.parse(draws[0]))
    assert fields["uid"] == b""
    without = {k: v for k, v in fields.items() if k not in ("uid", "_io")}
    assert M.build(M.DrawRequest, without) == draws[0]


def test_a_draw_with_a_uid_of_the_wrong_size_is_refused(stack: Stack, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from svcard.host.pay import client as client_module
    monkeypatch.setattr(client_module, "card_uid", lambda reader: b"\x01\x02")
    card = pboc_card(tmp_path)
    with (httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader,
          pytest.raises(PaymentRefused, match="UID has 9 bytes")):
        PC.pay(stack.checkout_url("ticket", "fig6"), reader, journal=Journal(tmp_path / "j"),
               http=http, aid=bytes.fromhex(PBOC_AID))
    assert balance(card) == 10_000


# --- the image checker knows the IEP, PSAM and HSM fields issue 11 added ---------------------

SCHEME_NAMES = "(known: pboc, changsha-metro)"


def image_with(kind: str, path: tuple[str | int, ...], value: Any,
               metro: bool = False) -> dict[str, Any]:
    """A demo image of ``kind`` (a metro card's when ``metro``) with the field at ``path``
    under ``app`` set to ``value`` (made as needed)."""
    image = image_from_profile(fixture_path(f"{kind}-demo.toml"))
    if metro:
        image["app"]["mac_scheme"], image["app"]["uid"] = "changsha-metro", "85" * 9
    node: Any = image["app"]
    for step in path[:-1]:
        if isinstance(node, dict) and step not in node:
            node[step] = {}
        node = node[step]
    node[path[-1]] = value
    return image


KEY_HEX = "00112233445566778899AABBCCDDEEFF"   # stands for key bytes, never to be repeated

IMAGE_CASES = [
    ("iep", ("mac_scheme",), "retail",
     f"app.mac_scheme: unknown MAC scheme 'retail' {SCHEME_NAMES}"),
    ("iep", ("mac_scheme",), KEY_HEX + "G", f"app.mac_scheme: unknown MAC scheme {SCHEME_NAMES}"),
    ("iep", ("mac_scheme",), 2, "app.mac_scheme: expected a string"),
    ("iep", ("uid",), "8501", "app.uid: expected 9 bytes of hex, got 2"),
    ("iep", ("uid",), "not hex", "app.uid: expected hex"),
    ("iep", ("uid",), None, "app.uid: missing (the changsha-metro MAC scheme puts a 9-byte "
                            "card UID into MAC1)"),
    ("iep", ("log_counter",), "middle", "app.log_counter: expected 'before' or 'after'"),
    ("iep", ("unload_keys",), [{"index": 1, "version": 1, "key": "0011"}],
     "app.unload_keys[0].key: expected 16 bytes of hex, got 2"),
    ("iep", ("update_keys",), [{"index": 1, "version": 256, "key": KEY_HEX}],
     "app.update_keys[0].version: expected a number <= 255"),
    ("iep", ("update_keys",), {"index": 1}, "app.update_keys: expected a list"),
    ("psam", ("issuer_schemes", "1000000000000001", "mac_scheme"), "retail",
     f"app.issuer_schemes.1000000000000001.mac_scheme: unknown MAC scheme 'retail' "
     f"{SCHEME_NAMES}"),
    ("psam", ("issuer_schemes", "1000000000000001", "algorithms"), {"01": "aes"},
     "app.issuer_schemes.1000000000000001.algorithms.01: unknown algorithm 'aes' "
     "(known: 3des)"),
    ("psam", ("issuer_schemes", "1000000000000001", "algorithms"), {"1": "3des"},
     "app.issuer_schemes.1000000000000001.algorithms.1.[key]: expected hex"),
    ("psam", ("issuer_schemes",), {"10": {"mac_scheme": "pboc"}},
     "app.issuer_schemes.10.[key]: expected 8 bytes of hex, got 1"),
    ("psam", ("issuer_schemes",), ["pboc"], "app.issuer_schemes: expected an object"),
    ("hsm", ("issuers", 0, "scheme", "mac_scheme"), "retail",
     f"app.issuers[0].scheme.mac_scheme: unknown MAC scheme 'retail' {SCHEME_NAMES}"),
    ("hsm", ("issuers", 0, "scheme", "algorithms"), {"00": 3},
     "app.issuers[0].scheme.algorithms.00: expected a string"),
    ("hsm", ("issuers", 0, "unload_keys"), [{"version": 1, "key": "XY"}],
     "app.issuers[0].unload_keys[0].key: expected hex"),
    ("hsm", ("issuers", 0, "update_keys"), [{"version": -1, "key": KEY_HEX}],
     "app.issuers[0].update_keys[0].version: expected a number >= 0"),
]


@pytest.mark.parametrize(("kind", "path", "value", "message"), IMAGE_CASES,
                         ids=[f"{c[0]}-{'.'.join(map(str, c[1]))}-{i}"
                              for i, c in enumerate(IMAGE_CASES)])
def test_the_image_checker_names_the_field(kind: str, path: tuple[str | int, ...], value: Any,
                                           message: str) -> None:
    image = image_with(kind, path, value, metro=path[0] == "uid" and value is None)
    with pytest.raises(ImageError) as refused:
        check_image(image, "card.json")
    text = str(refused.value)
    assert text == f"card.json: {message}", text
    assert "\n" not in text and KEY_HEX not in text
    # a card built from it says the same wherever the card itself cannot use the value
    try:
        card_from_image(image, source="card.json")
    except ImageError as exc:
        assert str(exc) == text or "damaged" not in str(exc), str(exc)


def test_good_images_of_every_kind_pass_the_checker(tmp_path: Path) -> None:
    from test_mac_schemes import write_metro_files
    for path in write_metro_files(tmp_path).values():
        check_image(image_from_profile(path), path.name)
    for kind in ("iep", "psam", "hsm"):
        check_image(image_from_profile(fixture_path(f"{kind}-demo.toml")), kind)
