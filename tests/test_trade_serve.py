"""``svcard serve trade-account-manager|trade-acquirer|trade-merchant`` as real processes from
their TOML files, a customer registered with ``svcard session customer`` and a whole session
through ``svcard session``, with the merchant agent SIGKILLed and restarted mid-session; and
each bad configuration refused in one line naming the file and the field."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from svcard.host.cli.main import main
from svcard.host.kit.serving import free_port, wait_http
from svcard.host.trade import signing as S

SVCARD = str(Path(sys.executable).parent / "svcard")


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="svcard")


class Party:
    def __init__(self, folder: Path, pid: str, role: str) -> None:
        self.id, self.role = pid, role
        self.private, self.public = S.new_key()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = folder / f"{pid}.toml"
        self.db = f"sqlite:///{folder / (pid + '.db')}"
        self.proc: subprocess.Popen[bytes] | None = None

    def write(self, body: str) -> None:
        self.config.write_text(f'id = "{self.id}"\nkey = "{self.private.hex()}"\n'
                               f'db = "{self.db}"\n{body}')

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [SVCARD, "serve", f"trade-{self.role}", "--config", str(self.config), "--port",
             str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(self.url + "/v1/health", timeout=60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def parties(tmp_path: Path) -> Iterator[dict[str, Party]]:
    am = Party(tmp_path, "am1", "account-manager")
    acq = Party(tmp_path, "acq1", "acquirer")
    shop = Party(tmp_path, "shop", "merchant")
    am.write(f'[[operator]]\nid = "op1"\nacquirer = "acq1"\nurl = "{acq.url}"\n'
             f'public_key = "{acq.public.hex()}"\n')
    acq.write(f'[[account_manager]]\nid = "am1"\npublic_key = "{am.public.hex()}"\n'
              f'[[merchant]]\nid = "shop"\nurl = "{shop.url}"\n'
              f'public_key = "{shop.public.hex()}"\ncurrency = "KWD"\n'
              '[table]\nissuer = "bank-m"\nbase = "EUR"\nissued = 2020-01-01T00:00:00Z\n'
              'expires = 2099-01-01T00:00:00Z\nrates = { KWD = "0.3312", JPY = "158.2345" }\n')
    shop.write(f'currency = "KWD"\n[acquirer]\nid = "acq1"\npublic_key = "{acq.public.hex()}"\n')
    found = {"am1": am, "acq1": acq, "shop": shop}
    yield found
    for p in found.values():
        p.kill()


def test_servers_from_their_files_and_a_merchant_killed_mid_session(
        parties: dict[str, Party], tmp_path: Path) -> None:
    for p in parties.values():
        p.start()
    am, shop = parties["am1"], parties["shop"]
    key = tmp_path / "alice.key"
    r = run("session", "keygen", "--key-out", str(key))
    assert r.exit_code == 0, r.output
    public = r.output.strip()
    r = run("session", "customer", "alice", "--db", am.db, "--public-key", public,
            "--currency", "EUR", "--credit-limit", "20.00")
    assert r.exit_code == 0 and "credit limit 20.00 EUR" in r.output, r.output
    state = tmp_path / "s.json"
    r = run("session", "open", am.url, "--account-id", "am1", "--account-key",
            am.public.hex(), "--customer", "alice", "--key", str(key), "--merchant", "shop",
            "--merchant-url", shop.url, "--operator", "op1", "--deposit", "10.00",
            "--currency", "EUR", "--state", str(state), "--unit", "10")
    assert r.exit_code == 0, r.output
    assert "deposit 10.00 EUR = 3.312 KWD" in r.output and "331 links of 10" in r.output
    assert run("session", "buy", "tea", "--units", "2", "--state", str(state)).exit_code == 0
    shop.kill()      # SIGKILL between two purchases
    shop.start()
    r = run("session", "buy", "tea", "--state", str(state))
    assert r.exit_code == 0 and "bought tea: 0.010 KWD; 3.280 KWD left" in r.output, r.output
    r = run("session", "close", "--state", str(state))
    assert r.exit_code == 0 and "cleared (agreed): paid 0.030 KWD" in r.output, r.output
    r = run("session", "customer", "alice", "--db", am.db, "--public-key", public,
            "--currency", "EUR", "--credit-limit", "1.00")
    assert r.exit_code == 3 and "exists already" in r.output


@pytest.mark.parametrize(("role", "body", "problem"), [
    ("acquirer", 'currency = "EUR"\n', "account_manager: the acquirer server needs it"),
    ("merchant", 'currency = "EURO"\n[acquirer]\nid = "a"\npublic_key = "' + "00" * 32 + '"\n',
     "currency"),
    ("account-manager", "[[operator]]\nid = \"op1\"\nacquirer = \"a\"\nurl = \"http://x\"\n"
     "public_key = \"00\"\n", "operator[0].public_key: expected 32 bytes"),
    ("account-manager", 'extra = 1\n', "extra"),
    ("acquirer", '[[account_manager]]\nid = "am1"\npublic_key = "' + "00" * 32 + '"\n'
     '[[merchant]]\nid = "s"\nurl = "http://x"\npublic_key = "' + "00" * 32 + '"\n'
     'currency = "JPY"\n[table]\nissuer = "b"\nbase = "EUR"\nissued = 2020-01-01T00:00:00Z\n'
     'expires = 2099-01-01T00:00:00Z\nrates = { USD = "1.1" }\n', "no rate for JPY"),
])
def test_bad_configuration_one_line(tmp_path: Path, role: str, body: str,
                                    problem: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f'id = "x1"\nkey = "{"11" * 32}"\n{body}')
    r = run("serve", f"trade-{role}", "--config", str(config), "--port", str(free_port()))
    assert r.exit_code == 3, r.output
    assert str(config) in r.output and problem in r.output, r.output
    assert "11" * 32 not in r.output and len(r.output.strip().splitlines()) == 1
