"""The servers as real processes: ``svcard serve payment|merchant``, ``svcard pay``, and the
payment server killed with SIGKILL in the middle of a payment, then restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from svcard.card.storage import read_image
from svcard.host.demo.system import card_image
from svcard.host.kit.serving import free_port, wait_http
from svcard.host.pay import client as C
from svcard.host.pay.stack import psam_images
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader
from svcard.protocols import purse as P

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SVCARD = str(Path(sys.executable).parent / "svcard")


class Servers:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.psams = psam_images(folder, 2)
        self.pay_port, self.merchant_port = free_port(), free_port()
        merchant = (FIXTURES / "merchant-demo.toml").read_text().replace(
            "http://127.0.0.1:8080", f"http://127.0.0.1:{self.pay_port}").replace(
            "http://127.0.0.1:8081", f"http://127.0.0.1:{self.merchant_port}")
        # a client terminal key, made by the CLI and registered with the merchant (FIG. 7)
        self.terminal_key = folder / "terminal.pem"
        made = subprocess.run([SVCARD, "terminal-key", "new", str(self.terminal_key), "--json"],
                              capture_output=True, text=True, timeout=60, check=True)
        self.terminal = json.loads(made.stdout)
        merchant += f'"{self.terminal["terminal_id"]}" = "{self.terminal["public_key"]}"\n'
        (folder / "merchant.toml").write_text(merchant)
        self.db = f"sqlite:///{folder / 'payments.db'}"
        self.merchant_db = f"sqlite:///{folder / 'merchant.db'}"
        self.payment: subprocess.Popen[bytes] | None = None
        self.merchant: subprocess.Popen[bytes] | None = None
        self.start_merchant()
        self.start_payment()

    def start_merchant(self) -> None:
        self.merchant = subprocess.Popen(
            [SVCARD, "serve", "merchant", "--config", str(self.folder / "merchant.toml"),
             "--db", self.merchant_db, "--port", str(self.merchant_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_up(f"http://127.0.0.1:{self.merchant_port}/v1/catalogue")

    def kill_merchant(self) -> None:
        assert self.merchant is not None
        os.kill(self.merchant.pid, signal.SIGKILL)
        self.merchant.wait()

    def start_payment(self) -> None:
        cmd = [SVCARD, "serve", "payment", "--config", str(FIXTURES / "payment-demo.toml"),
               "--db", self.db, "--port", str(self.pay_port)]
        for p in self.psams:
            cmd += ["--psam", f"virtual:{p}"]
        self.payment = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self.wait_up(f"http://127.0.0.1:{self.pay_port}/v1/health")

    @staticmethod
    def wait_up(url: str) -> None:
        wait_http(url, timeout=30)

    def checkout(self, sku: str = "ticket", variant: str = "fig6") -> str:
        return f"http://127.0.0.1:{self.merchant_port}/v1/checkout/{sku}?variant={variant}"

    def kill_payment(self) -> None:
        assert self.payment is not None
        os.kill(self.payment.pid, signal.SIGKILL)
        self.payment.wait()

    def stop(self) -> None:
        for proc in (self.payment, self.merchant):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path)
    yield s
    s.stop()


def test_svcard_pay_against_served_processes(servers: Servers, tmp_path: Path) -> None:
    card = card_image(tmp_path, ep=5_000)
    for variant in ("fig5", "fig6", "fig7", "fig8"):
        result = subprocess.run(
            [SVCARD, "pay", servers.checkout("song", variant), "--card", f"virtual:{card}",
             "--journal", str(tmp_path / "journal.jsonl"), "--json",
             "--terminal-key", str(servers.terminal_key)],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        payment = json.loads(result.stdout)["payment"]
        assert payment["goods"].endswith("song-7f3a")
        assert (payment["variant"], payment["proven"]) == (variant, variant != "fig7")
    assert read_image(card)["app"]["ep"]["balance"] == 5_000 - 4 * 99
    refused = subprocess.run(
        [SVCARD, "pay", servers.checkout("nothing"), "--card", f"virtual:{card}",
         "--journal", str(tmp_path / "journal.jsonl")], capture_output=True, text=True,
        timeout=120)
    assert refused.returncode == 1 and "no item 'nothing'" in refused.stderr
    # without the terminal key the client never asks for FIG. 7: the merchant's default
    result = subprocess.run(
        [SVCARD, "pay", servers.checkout("song", "fig7"), "--card", f"virtual:{card}",
         "--journal", str(tmp_path / "journal.jsonl"), "--json"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["payment"]["variant"] == "fig6"


def test_terminal_key_new_writes_a_private_file_and_prints_no_secret(tmp_path: Path) -> None:
    key = tmp_path / "t.pem"
    made = subprocess.run([SVCARD, "terminal-key", "new", str(key), "--terminal-id",
                           "0102030405060708"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    assert "terminal id 0102030405060708" in made.stdout
    assert "PRIVATE" not in made.stdout and key.read_text() not in made.stdout
    again = subprocess.run([SVCARD, "terminal-key", "new", str(key)], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 2 and "not overwritten" in again.stderr


def test_merchant_sigkill_between_checkout_and_confirmation(servers: Servers,
                                                            tmp_path: Path) -> None:
    """M3 with real processes: the merchant is killed after checkout and restarted before the
    confirmation; the order is in its database, the goods are released once."""
    card = card_image(tmp_path, ep=5_000)
    journal = Journal(tmp_path / "journal.jsonl")

    class Killer(httpx.Client):
        """Kills (and restarts) the merchant right after the payment server's answer."""

        def post(self, url: object, **kwargs: object) -> httpx.Response:  # type: ignore[override]
            if "/v1/status/" in str(url):
                servers.kill_merchant()
                servers.start_merchant()
            return super().post(url, **kwargs)  # type: ignore[arg-type]

    with Killer(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        outcome = C.pay(servers.checkout("ticket", "fig6"), reader, journal=journal, http=http)
    assert outcome.goods == "TICKET-MUSEUM-0042"
    assert read_image(card)["app"]["ep"]["balance"] == 3_750


def test_payment_server_sigkill_mid_payment_then_restart(servers: Servers,
                                                         tmp_path: Path) -> None:
    card = card_image(tmp_path, ep=5_000)
    journal = Journal(tmp_path / "journal.jsonl")

    class Killer(httpx.Client):
        """Kills the payment server right after the card debited itself."""

        def post(self, url: object, **kwargs: object) -> httpx.Response:  # type: ignore[override]
            if "/v1/debit-response" in str(url):
                servers.kill_payment()
            return super().post(url, **kwargs)  # type: ignore[arg-type]

    with Killer(timeout=10) as http, open_reader(f"virtual:{card}") as reader, \
            pytest.raises(httpx.HTTPError):
        C.pay(servers.checkout("ticket", "fig6"), reader, journal=journal, http=http)
    assert read_image(card)["app"]["ep"]["balance"] == 3_750  # the card paid
    servers.start_payment()  # restart: same database, same PSAM images
    with httpx.Client(timeout=30) as http, open_reader(f"virtual:{card}") as reader:
        report = C.resume(reader, journal=journal, http=http)
    assert [r["outcome"] for r in report] == ["completed"]
    # card, PSAM and database agree: one purchase of 12.50, confirmed, recorded by one PSAM
    assert read_image(card)["app"]["ep"]["balance"] == 3_750
    records = [P.PsamRecord.parse(bytes.fromhex(r)) for p in servers.psams
               for r in read_image(p)["app"]["records"]]
    assert [r.amount for r in records] == [1250]
    import sqlalchemy as sa
    engine = sa.create_engine(servers.db)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT state, amount, ttn FROM payments")).all()
    assert [(r[0], r[1]) for r in rows] == [("confirmed", 1250)]
    assert rows[0][2] == records[0].terminal_txn_number
