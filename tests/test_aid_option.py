"""``--aid`` (issue 11, finding 2): every command that takes a purse card selects the purse at
the AID it is given, here a card personalised at the common PBOC AID ``A00000000386980701``
(not svcard's own ``F05356434152440101``). Balance, log, the local purchase and load, the network
payment and the network load all work with ``--aid A00000000386980701`` and fail cleanly (exit
1, "no purse application ... on this card", nothing moved) without it; a malformed ``--aid`` is
one line naming the option (exit 2). A journalled payment or load keeps its AID, so ``--resume``
(and the command line the interruption message gives) selects it again."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result

from svcard.card.image import save_new_image
from svcard.card.personalise import image_from_profile
from svcard.card.storage import read_image
from svcard.fixtures import fixture_path
from svcard.host.cli.main import main
from svcard.host.helper.payments import HelperCard
from svcard.host.load.stack import LoadStack, start_load_stack
from svcard.host.pay.stack import Stack
from svcard.host.terminal.journal import Journal, entry_aid
from svcard.host.terminal.online import resume_command
from svcard.host.terminal.purse import NoPurse, select_purse
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import purse as P

PBOC_AID = "A00000000386980701"
NO_PURSE = f"no purse application {P.DEFAULT_IEP_AID.hex().upper()} on this card"

# `svcard ARGS...` in a child process whose journal sends it SIGINT right after STEP is written
STOP_AT = r'''
import os, signal, sys
from svcard.host.terminal.journal import Journal

step = sys.argv[1]
real_write = Journal.write


def write(self, txn_id, state, **data):
    real_write(self, txn_id, state, **data)
    if state == step:
        os.kill(os.getpid(), signal.SIGINT)


Journal.write = write
from svcard.host.cli.main import main
from svcard.host.helper.payments import HelperCard
main(sys.argv[2:], prog_name="svcard")
'''


def svcard(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="svcard")


def pboc_card(folder: Path, ep: int = 10_000, name: str = "pboc.json") -> Path:
    """A demo purse personalised at the common PBOC AID."""
    image = image_from_profile(fixture_path("iep-demo.toml"), aid=PBOC_AID)
    image["app"]["ep"]["balance"] = ep
    path = folder / name
    save_new_image(path, image, overwrite=True)
    return path


def balance(card: Path) -> int:
    return int(read_image(card)["app"]["ep"]["balance"])


def image_file(folder: Path, kind: str) -> Path:
    path = folder / f"{kind}.json"
    save_new_image(path, image_from_profile(fixture_path(f"{kind}-demo.toml")), overwrite=True)
    return path


@pytest.fixture
def loads(tmp_path: Path) -> Iterator[LoadStack]:
    s = start_load_stack(tmp_path / "load")
    s.account("alice", 20_000, "pw")
    yield s
    s.close()


def account(loads: LoadStack) -> int:
    row = loads.bank_server.db.account("alice")
    assert row is not None
    return int(row["balance"])


def test_the_card_is_at_the_pboc_aid_only(tmp_path: Path) -> None:
    with open_reader(f"virtual:{pboc_card(tmp_path)}") as card:
        assert select_purse(card, bytes.fromhex(PBOC_AID)).aid == PBOC_AID
        with pytest.raises(NoPurse, match=NO_PURSE):
            select_purse(card)


def test_balance_and_log_with_aid_and_without(tmp_path: Path) -> None:
    spec = f"virtual:{pboc_card(tmp_path, ep=4_321)}"
    done = svcard("terminal", "balance", "--card", spec, "--aid", PBOC_AID, "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["balance"] == 4_321
    done = svcard("terminal", "log", "--card", spec, "--aid", "a0 00 00 00 03 86 98 07 01")
    assert (done.exit_code, done.stdout.strip()) == (0, "(empty log)")
    for command in ("balance", "log"):
        done = svcard("terminal", command, "--card", spec)
        assert done.exit_code == 1
        assert done.stderr.strip().startswith(f"svcard: {NO_PURSE} (SELECT answered 6A82")
        assert "--aid" in done.stderr and "Traceback" not in done.output


@pytest.mark.parametrize("bad", ["A0000003", "XYZ", "A0" * 17, "", "A00000000386980"])
def test_a_malformed_aid_is_one_line_naming_the_option(tmp_path: Path, bad: str) -> None:
    spec = f"virtual:{pboc_card(tmp_path)}"
    for args in (("terminal", "balance"), ("terminal", "log"), ("pay", "http://127.0.0.1:1/x"),
                 ("load", "http://127.0.0.1:1/v1/load", "--account", "a", "--secret", "s",
                  "--minor", "1")):
        done = svcard(*args, "--card", spec, "--aid", bad)
        assert done.exit_code == 2, (args, done.output)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("svcard: --aid "), done.stderr
        assert "5 to 16 bytes of hex" in lines[0]


def test_local_purchase_and_load_with_aid(tmp_path: Path) -> None:
    card = pboc_card(tmp_path, ep=10_000)
    spec, psam, hsm = (f"virtual:{card}", f"virtual:{image_file(tmp_path, 'psam')}",
                       f"virtual:{image_file(tmp_path, 'hsm')}")
    refused = svcard("terminal", "purchase", "--card", spec, "--psam", psam, "--minor", "100")
    assert refused.exit_code == 1 and NO_PURSE in refused.stderr
    refused = svcard("terminal", "load", "--card", spec, "--hsm", hsm, "--minor", "100")
    assert refused.exit_code == 1 and NO_PURSE in refused.stderr
    assert balance(card) == 10_000
    assert read_image(tmp_path / "psam.json")["app"]["next_ttn"] == 1
    bought = svcard("terminal", "purchase", "--card", spec, "--aid", PBOC_AID, "--psam", psam,
                    "--amount", "25.00", "--json")
    assert bought.exit_code == 0, bought.output
    assert json.loads(bought.stdout)["balance_after"] == 7_500
    loaded = svcard("terminal", "load", "--card", spec, "--aid", PBOC_AID, "--hsm", hsm,
                    "--minor", "1000", "--json")
    assert loaded.exit_code == 0, loaded.output
    assert json.loads(loaded.stdout)["balance_after"] == 8_500 == balance(card)
    log = svcard("terminal", "log", "--card", spec, "--aid", PBOC_AID, "--json")
    assert [e["type_name"] for e in json.loads(log.stdout)] == ["EP load", "EP purchase"]


def test_network_payment_with_aid(stack: Stack, tmp_path: Path) -> None:
    card = pboc_card(tmp_path, ep=10_000)
    spec, journal = f"virtual:{card}", str(tmp_path / "journal.jsonl")
    refused = svcard("pay", stack.checkout_url("ticket", "fig6"), "--card", spec, "--journal",
                     journal)
    assert refused.exit_code == 1 and NO_PURSE in refused.stderr, refused.output
    assert balance(card) == 10_000 and Journal(Path(journal)).entries() == {}
    for variant in ("fig5", "fig6"):
        paid = svcard("pay", stack.checkout_url("ticket", variant), "--card", spec, "--aid",
                      PBOC_AID, "--journal", journal, "--json")
        assert paid.exit_code == 0, paid.output
    assert balance(card) == 10_000 - 2 * 1_250
    entries = Journal(Path(journal)).entries().values()
    assert [e["aid"] for e in entries] == [PBOC_AID, PBOC_AID]
    assert stack.payment_server.db.counts().get("confirmed", 0) == 2


def test_network_load_with_aid(loads: LoadStack, tmp_path: Path) -> None:
    card = pboc_card(tmp_path, ep=0)
    spec, journal = f"virtual:{card}", str(tmp_path / "journal.jsonl")
    base = ("load", loads.bank_url, "--card", spec, "--account", "alice", "--secret", "pw",
            "--minor", "5000", "--journal", journal)
    refused = svcard(*base)
    assert refused.exit_code == 1 and NO_PURSE in refused.stderr, refused.output
    assert account(loads) == 20_000 and balance(card) == 0
    done = svcard(*base, "--aid", PBOC_AID, "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["load"]["outcome"] == "loaded"
    assert balance(card) == 5_000 and account(loads) == 15_000
    assert {e["aid"] for e in Journal(Path(journal)).entries().values()} == {PBOC_AID}


def test_an_interrupted_load_resumes_on_its_aid(loads: LoadStack, tmp_path: Path) -> None:
    """Stopped after the bank's debit, before the card saw the load: the message names the
    AID, and the resume's zero-value INITIALIZE FOR LOAD runs on that purse (a select of the
    default AID would leave the load "still open"); the bank re-credits."""
    card = pboc_card(tmp_path, ep=0)
    spec, journal = f"virtual:{card}", tmp_path / "journal.jsonl"
    done = subprocess.run([sys.executable, "-c", STOP_AT, "load-requested", "load",
                           loads.bank_url, "--card", spec, "--aid", PBOC_AID, "--account",
                           "alice", "--secret", "pw", "--minor", "5000", "--journal",
                           str(journal)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().endswith(
        f"Finish it with: svcard load --resume --card {spec} --aid {PBOC_AID} --journal "
        f"{journal}")
    assert account(loads) == 15_000
    resumed = svcard("load", "--resume", "--card", spec, "--aid", PBOC_AID, "--journal",
                     str(journal), "--json")
    assert resumed.exit_code == 0, resumed.output
    assert [r["outcome"] for r in json.loads(resumed.stdout)["resumed"]] == ["not loaded"]
    assert account(loads) == 20_000 and balance(card) == 0


def test_an_interrupted_payment_resumes_on_its_aid(stack: Stack, tmp_path: Path) -> None:
    card = pboc_card(tmp_path, ep=10_000)
    spec, journal = f"virtual:{card}", tmp_path / "journal.jsonl"
    done = subprocess.run([sys.executable, "-c", STOP_AT, "debit-sent", "pay",
                           stack.checkout_url("ticket", "fig6"), "--card", spec, "--aid",
                           PBOC_AID, "--journal", str(journal)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert f"--aid {PBOC_AID}" in done.stderr
    resumed = svcard("pay", "--resume", "--card", spec, "--aid", PBOC_AID, "--journal",
                     str(journal), "--json")
    assert resumed.exit_code == 0, resumed.output
    (outcome,) = json.loads(resumed.stdout)["resumed"]
    assert outcome["outcome"].startswith("abandoned"), outcome  # the card proves no debit
    assert balance(card) == 10_000


def test_the_helper_pays_with_the_purse_at_its_aid(stack: Stack, tmp_path: Path,
                                                   http: httpx.Client) -> None:
    from test_helper import start_helper, wait_job

    card = pboc_card(tmp_path, ep=10_000)
    for aid, state in ((P.DEFAULT_IEP_AID, "refused"), (bytes.fromhex(PBOC_AID), "paid")):
        h = start_helper(HelperCard(f"virtual:{card}", tmp_path / "journal.jsonl", aid=aid),
                         [stack.merchant.url])
        try:
            r = http.post(f"{h.url}/v1/pay", json={"checkout_url": stack.checkout_url()},
                          headers=h.auth())
            assert r.status_code == 202, r.text
            view = wait_job(http, h, r.json()["id"])
        finally:
            h.close()
        assert view["state"] == state, view
        if state == "refused":
            assert NO_PURSE in view["message"] and balance(card) == 10_000
    assert balance(card) == 10_000 - 1_250


def test_a_journal_entry_without_an_aid_means_the_default() -> None:
    assert entry_aid({"txn_id": "x", "state": "draw"}) == P.DEFAULT_IEP_AID
    assert entry_aid({"aid": PBOC_AID}) == bytes.fromhex(PBOC_AID)
    assert resume_command("pay", "virtual:c.json", None) == \
        "svcard pay --resume --card virtual:c.json"
    assert resume_command("pay", "virtual:c.json", None, bytes.fromhex(PBOC_AID)) == \
        f"svcard pay --resume --card virtual:c.json --aid {PBOC_AID}"
