"""Servers a person can run (issue 10, point 6a), with the servers as real ``svcard serve``
processes: JSON request logs that never hold a secret, ``--log-level``, ``GET /v1/health``
with real dependency checks, the drain on SIGTERM that lets a held FIG. 5 payment finish, and
``svcard batches close``."""

from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pcsc_env import wait_for

from svcard.card.storage import read_image
from svcard.host.demo.system import card_image
from svcard.host.kit.serving import free_port, wait_http
from svcard.host.load import client as LC
from svcard.host.load.stack import hsm_image, start_load_stack
from svcard.host.pay import client as C
from svcard.host.pay.client_terminal import ClientTerminal
from svcard.host.pay.stack import psam_images, start_stack
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.reader_specs import open_reader

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SVCARD = str(Path(sys.executable).parent / "svcard")
REQUEST_FIELDS = {"server", "method", "path", "status", "duration_ms", "step", "outcome"}


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SVCARD, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


class Served:
    """``svcard serve`` processes (payment with two PSAMs, merchant, and optionally bank and
    load), each logging to its own file."""

    def __init__(self, folder: Path, names: tuple[str, ...] = ("payment", "merchant"),
                 log_level: str = "debug", drain_seconds: float = 10.0) -> None:
        self.folder = folder
        self.log_level, self.drain_seconds = log_level, drain_seconds
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports = {name: free_port() for name in ("payment", "merchant", "bank", "load")}
        self.psams = psam_images(folder, 2)
        self.hsm = hsm_image(folder)
        self.admin_token = secrets.token_hex(16)
        self.terminal = ClientTerminal.generate()
        payment = (FIXTURES / "payment-demo.toml").read_text().replace(
            '"demo-admin-token"', f'"{self.admin_token}"').replace(
            '"concentration"', json.dumps(str(folder / "concentration")))
        (folder / "payment.toml").write_text(payment)
        merchant = (FIXTURES / "merchant-demo.toml").read_text().replace(
            "http://127.0.0.1:8080", self.url("payment")).replace(
            "http://127.0.0.1:8081", self.url("merchant"))
        merchant += (f'"{self.terminal.terminal_id.hex().upper()}" = '
                     f'"{self.terminal.public_key.hex().upper()}"\n')
        (folder / "merchant.toml").write_text(merchant)
        bank = (FIXTURES / "bank-demo.toml").read_text().replace(
            "http://127.0.0.1:8084", self.url("load")).replace(
            "http://127.0.0.1:8083", self.url("bank"))
        (folder / "bank.toml").write_text(bank)
        self.secret = ""
        if "bank" in names:
            made = run("bank", "account", "create", "alice", "--db", self.db("bank"),
                       "--funds", "20000", "--json")
            assert made.returncode == 0, made.stderr
            self.secret = json.loads(made.stdout)["secret"]
        for name in names:
            self.start(name)
        for name in names:
            wait_http(self.url(name) + "/v1/health", timeout=60)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def db(self, name: str) -> str:
        return f"sqlite:///{self.folder / (name + '.db')}"

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def start(self, name: str) -> None:
        cmd = [SVCARD, "serve", name, "--db", self.db(name), "--port", str(self.ports[name]),
               "--log-level", self.log_level, "--drain-seconds", str(self.drain_seconds)]
        if name == "payment":
            cmd += ["--config", str(self.folder / "payment.toml")]
            for p in self.psams:
                cmd += ["--psam", f"virtual:{p}"]
        elif name == "load":
            cmd += ["--config", str(FIXTURES / "load-demo.toml"), "--hsm", f"virtual:{self.hsm}"]
        else:
            cmd += ["--config", str(self.folder / f"{name}.toml")]
        with self.log(name).open("ab") as err:
            self.procs[name] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)

    def lines(self, name: str) -> list[dict[str, Any]]:
        """Every line the server logged, each parsed as JSON (a line that is not fails)."""
        out = []
        for line in self.log(name).read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pytest.fail(f"{name} logged a line that is not JSON: {line!r}")
        return out

    def requests(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.lines(name) if r.get("logger") == "svcard.request"]

    def checkout(self, variant: str, sku: str = "song") -> str:
        return f"{self.url('merchant')}/v1/checkout/{sku}?variant={variant}"

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(tmp_path_factory.mktemp("served"), ("payment", "merchant", "bank", "load"))
    yield s
    s.stop()


def keys_in(value: Any) -> set[str]:
    """Every hex key in a card image (entries named ``*key*`` of at least 16 bytes)."""
    found: set[str] = set()
    if isinstance(value, dict):
        for name, item in value.items():
            if "key" in name and isinstance(item, str) and len(item) >= 32:
                found.add(item)
            found |= keys_in(item)
    elif isinstance(value, list):
        for item in value:
            found |= keys_in(item)
    return found


def recording_client(seen: list[dict[str, Any]]) -> httpx.Client:
    """An HTTP client that keeps every JSON answer (checkout and load parameters: the TSKs
    and ETSKs the servers must never log)."""

    def keep(response: httpx.Response) -> None:
        if response.headers.get("content-type", "").startswith("application/json"):
            response.read()
            seen.append(response.json())

    return httpx.Client(timeout=30, event_hooks={"response": [keep]})


def test_one_json_line_per_request_and_never_a_secret(served: Served, tmp_path: Path) -> None:
    card = card_image(tmp_path, ep=5_000)
    journal = Journal(tmp_path / "journal.jsonl")
    seen: list[dict[str, Any]] = []
    paid = {}
    with recording_client(seen) as http:
        reader = open_reader(f"virtual:{card}")
        reader.connect()
        for variant in ("fig5", "fig6", "fig7", "fig8"):
            outcome = C.pay(served.checkout(variant), reader, journal=journal, http=http,
                            terminal=served.terminal)
            paid[variant] = outcome.txn_id
        loaded = LC.load(f"{served.url('bank')}/v1/load", reader, account="alice",
                         secret=served.secret, amount=1234, journal=journal, http=http)
        reader.disconnect()
        assert loaded.outcome == "loaded"
        wrong = http.post(f"{served.url('bank')}/v1/load/start", json={
            "account": "alice", "secret": "not-the-secret", "amount": 1, "card": {
                "serial": "00" * 10, "balance": 0, "limit": 100, "currency_code": 156}})
        assert wrong.status_code == 403
        junk = http.post(f"{served.url('payment')}/v1/draw", content=b"not a message")
        assert junk.status_code == 400
    token_file = tmp_path / "token"
    token_file.write_text(served.admin_token + "\n")
    closed = run("batches", "close", "--url", served.url("payment"),
                 "--admin-token-file", str(token_file))
    assert closed.returncode == 0, closed.stderr
    tsks = {p[k] for p in seen for k in ("tsk", "etsk") if k in p}
    assert len(tsks) == 2 * 5  # four payments and a load
    txns = set(paid.values())

    def logged_all() -> bool:
        draws = {r.get("txn") for r in served.requests("payment") if r["step"] == "draw"}
        return txns <= draws and any(r["path"] == "/v1/batches/close"
                                     for r in served.requests("payment"))

    wait_for(logged_all, "the payment server's request lines", timeout=10)
    # one line per request, with what an operator needs
    pay = served.requests("payment")
    for line in pay + served.requests("merchant") + served.requests("bank") \
            + served.requests("load"):
        assert set(line) >= REQUEST_FIELDS, line
        assert line["duration_ms"] >= 0
    draws = {r["txn"]: r for r in pay if r["step"] == "draw" and r["status"] == 200}
    assert set(draws) >= txns
    assert draws[paid["fig5"]]["outcome"] == "held"
    assert draws[paid["fig8"]]["outcome"] == "released"
    confirmed = {r["txn"] for r in pay if r["step"] == "debit_response"
                 and r["outcome"] == "confirmed"}
    assert confirmed >= {paid["fig5"], paid["fig6"]}
    assert {r["txn"] for r in pay if r["step"] == "proof" and r["outcome"] == "confirmed"} \
        >= {paid["fig7"], paid["fig8"]}
    refused = [r for r in pay if r["status"] == 400 and r["path"] == "/v1/draw"]
    assert refused and refused[-1]["outcome"] == "refused" and refused[-1]["reason"]
    bank = served.requests("bank")
    assert any(r["status"] == 403 and r["reason"] == "unknown account or wrong secret"
               for r in bank)
    assert any(r["txn"] == loaded.txn_id for r in bank if r["step"] == "status")
    assert any(r.get("txn") == loaded.txn_id for r in served.requests("load"))
    assert {r.get("txn") for r in served.requests("merchant") if r["step"] == "status"} \
        >= txns
    # never a key, a TSK, an ETSK, an account secret or the admin token
    forbidden = {served.admin_token, served.secret, *tsks}
    for path in (*served.psams, served.hsm, card):
        forbidden |= keys_in(read_image(path))
    for fixture in ("payment-demo.toml", "bank-demo.toml", "load-demo.toml",
                    "merchant-demo.toml"):
        text = (FIXTURES / fixture).read_text()
        forbidden |= {line.split('"')[1] for line in text.splitlines()
                      if line.startswith("shared_key")}
    assert len(forbidden) > 15
    for name in ("payment", "merchant", "bank", "load"):
        text = served.log(name).read_text()
        assert "Traceback" not in text and "Bearer" not in text
        lowered = text.lower()
        leaked = sorted(s for s in forbidden if s.lower() in lowered)
        assert leaked == [], f"{name} logged secrets"


def test_health_checks_every_dependency(served: Served) -> None:
    for name, chips in (("payment", "psams"), ("merchant", None), ("bank", None),
                        ("load", "hsms")):
        r = httpx.get(served.url(name) + "/v1/health", timeout=10)
        body = r.json()
        assert (r.status_code, body["status"], body["server"]) == (200, "ok", name)
        assert body["checks"]["database"]["ok"] is True
        if chips:
            assert body["checks"][chips]["ok"] is True
            assert body["checks"][chips]["failed"] == []


def health(url: str) -> httpx.Response:
    return httpx.get(url + "/v1/health", timeout=10)


def eventually(url: str, status: int, what: str) -> dict[str, Any]:
    """The health answer once it has ``status`` (results are reused for a second)."""
    found: list[httpx.Response] = []

    def answered() -> bool:
        found[:] = [health(url)]
        return found[0].status_code == status

    wait_for(answered, f"health {status} ({what})", timeout=15)
    body: dict[str, Any] = found[0].json()
    return body


def test_health_is_503_while_the_database_cannot_be_used(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "s", psams=1)
    try:
        url = stack.payment.url
        assert health(url).json()["checks"]["database"]["ok"] is True
        # another process holds the database's write lock: the server cannot record a payment
        other = sqlite3.connect(tmp_path / "s" / "payments.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            body = eventually(url, 503, "database locked")
            assert body["status"] == "down"
            assert body["checks"]["database"] == {"ok": False,
                                                  "reason": "the database is busy"}
            assert body["checks"]["psams"]["ok"] is True
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert eventually(url, 200, "database free again")["status"] == "ok"
    finally:
        stack.close()


def test_health_is_503_while_postgresql_refuses_the_server(tmp_path: Path) -> None:
    from pg_env import start_cluster

    cluster = start_cluster()
    try:
        url = cluster.new_database()
        name = url.split("@/", 1)[1].split("?")[0]
        stack = start_stack(tmp_path / "s", psams=1, db_url=url)
        import psycopg

        admin = psycopg.connect(host=str(cluster.folder), port=cluster.port, user="postgres",
                                dbname="postgres", autocommit=True)
        try:
            assert eventually(stack.payment.url, 200, "up")["checks"]["database"]["ok"]
            # the database stops taking the server: its connections are cut, new ones refused
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s", (name,))
            body = eventually(stack.payment.url, 503, "PostgreSQL refusing")
            assert body["status"] == "down"
            assert body["checks"]["database"] == {
                "ok": False, "reason": "the database is unavailable"}
            assert "postgres" not in json.dumps(body)  # no URL, no driver message
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            assert eventually(stack.payment.url, 200, "PostgreSQL back")["status"] == "ok"
        finally:
            admin.close()
            stack.close()
    finally:
        cluster.stop()


def disconnect(member: Any) -> None:
    member.executor.submit(member.reader.disconnect).result(timeout=10)


def test_health_names_readers_that_stop_answering(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "s", psams=2)
    try:
        url, pool = stack.payment.url, stack.payment_server.pool
        disconnect(pool.psams[0])
        body = eventually(url, 200, "one PSAM gone")
        deadline = time.monotonic() + 10
        while body["status"] != "degraded":  # a result is reused for a second
            assert time.monotonic() < deadline, body
            body = eventually(url, 200, "one PSAM gone")
        assert body["checks"]["psams"]["failed"] == [{
            "chip": pool.psams[0].psam_id.hex().upper(),
            "reason": body["checks"]["psams"]["failed"][0]["reason"]}]
        assert "not connected" in body["checks"]["psams"]["failed"][0]["reason"]
        disconnect(pool.psams[1])
        body = eventually(url, 503, "both PSAMs gone")
        assert body["status"] == "down" and body["checks"]["psams"]["answered"] == 0
    finally:
        stack.close()
    loads = start_load_stack(tmp_path / "l")
    try:
        disconnect(loads.load_server.hsms.members[0])
        body = eventually(loads.load.url, 503, "the HSM gone")
        assert body["checks"]["hsms"]["ok"] is False
    finally:
        loads.close()


def pay_with_hook(served: Served, tmp_path: Path, variant: str,
                  after_draw: Callable[[], None]) -> tuple[list[Any], threading.Thread]:
    """Pay in a thread, running ``after_draw`` when the draw's answer arrives (the PSAM of a
    FIG. 5 payment is then held); the outcome, or the exception, lands in the list."""
    card = card_image(tmp_path, ep=5_000)
    result: list[Any] = []

    def hook(response: httpx.Response) -> None:
        if response.request.url.path == "/v1/draw" and response.status_code == 200:
            after_draw()

    def pay() -> None:
        reader = open_reader(f"virtual:{card}")
        reader.connect()
        try:
            with httpx.Client(timeout=30, event_hooks={"response": [hook]}) as http:
                result.append(C.pay(served.checkout(variant), reader, http=http,
                                    journal=Journal(tmp_path / "journal.jsonl")))
        except BaseException as exc:
            result.append(exc)
        finally:
            reader.disconnect()

    thread = threading.Thread(target=pay)
    thread.start()
    return result, thread


def test_sigterm_drains_a_held_fig5_payment_then_exits_0(tmp_path: Path) -> None:
    served = Served(tmp_path, log_level="warning", drain_seconds=30)
    try:
        payment = served.procs["payment"]
        seen_draining: list[dict[str, Any]] = []

        def sigterm_and_check() -> None:
            payment.send_signal(signal.SIGTERM)
            body = eventually(served.url("payment"), 503, "draining")
            seen_draining.append(body)
            # new work is refused while the held payment finishes
            refused = httpx.post(served.url("payment") + "/v1/draw", content=b"x", timeout=10)
            seen_draining.append({"status": refused.status_code,
                                  "reason": refused.headers.get("x-svcard-reason"),
                                  "connection": refused.headers.get("connection")})

        result, thread = pay_with_hook(served, tmp_path, "fig5", sigterm_and_check)
        thread.join(timeout=60)
        assert len(result) == 1 and not isinstance(result[0], BaseException), result
        assert result[0].goods.endswith("song-7f3a") and result[0].variant == "fig5"
        assert seen_draining[0]["status"] == "draining"
        assert seen_draining[1] == {"status": 503, "reason": "the server is shutting down; "
                                    "retry", "connection": "close"}
        started = time.monotonic()
        assert payment.wait(timeout=20) == 0
        assert time.monotonic() - started < 10  # it did not wait for the 30 s deadline
        # --log-level warning: no request lines, nothing below WARNING
        assert all(line["level"] in ("WARNING", "ERROR") for line in served.lines("payment"))
        rows = sqlite3.connect(tmp_path / "payment.db").execute(
            "SELECT state FROM payments WHERE txn_id = ?", (result[0].txn_id,)).fetchall()
        assert rows == [("confirmed",)]
    finally:
        served.stop()


def test_the_drain_ends_at_its_deadline(tmp_path: Path) -> None:
    served = Served(tmp_path, log_level="info", drain_seconds=2)
    try:
        payment = served.procs["payment"]
        stopped: list[float] = []

        def sigterm_and_abandon() -> None:
            payment.send_signal(signal.SIGTERM)
            stopped.append(time.monotonic())
            raise RuntimeError("the client goes away with the PSAM held")

        result, thread = pay_with_hook(served, tmp_path, "fig5", sigterm_and_abandon)
        thread.join(timeout=60)
        assert isinstance(result[0], RuntimeError)
        assert payment.wait(timeout=20) == 0
        took = time.monotonic() - stopped[0]
        assert 1.5 < took < 8, took  # the 2 s deadline, not the 10 s FIG. 5 hold
        lines = served.lines("payment")
        assert any(line["level"] == "WARNING" and "drain deadline passed with 1 pending"
                   in line["message"] for line in lines)
        assert any(line.get("logger") == "svcard.request" for line in lines)  # info: there
    finally:
        served.stop()


def test_batches_close_command(served: Served, tmp_path: Path) -> None:
    url = served.url("payment")
    token = tmp_path / "token"
    token.write_text(served.admin_token + "\n")
    card = card_image(tmp_path, "another-card.json", ep=1_000)
    with httpx.Client(timeout=30) as http:
        reader = open_reader(f"virtual:{card}")
        reader.connect()
        C.pay(served.checkout("fig6", "article"), reader, http=http,
              journal=Journal(tmp_path / "journal.jsonl"))
        reader.disconnect()
    done = run("batches", "close", "--url", url, "--admin-token-file", str(token), "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert len(answer["batches"]) == 1 and Path(answer["batches"][0]).is_file()
    batch = json.loads(Path(answer["batches"][0]).read_text())
    assert batch["record_count"] == 1 and batch["total_amount"] == 25
    # the token from the environment, then from the server's configuration; nothing to close
    again = run("batches", "close", "--url", url, env={"SVCARD_ADMIN_TOKEN": served.admin_token})
    assert again.returncode == 0 and "closed 0 batches" in again.stdout, again.stderr
    again = run("batches", "close", "--url", url, "--config",
                str(served.folder / "payment.toml"))
    assert again.returncode == 0, again.stderr
    # refusals and failures: one line, the documented exit code, never the token
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token\n")
    cases = [
        (["--admin-token-file", str(wrong)], 1, "refused: admin token required"),
        (["--admin-token-file", str(tmp_path / "missing")], 3, "missing"),
        ([], 2, "no admin token"),
    ]
    for extra, code, message in cases:
        r = run("batches", "close", "--url", url, *extra, env={"SVCARD_ADMIN_TOKEN": ""})
        assert (r.returncode, r.stdout) == (code, ""), r.stderr
        assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr and served.admin_token not in r.stderr
    down = run("batches", "close", "--url", f"http://127.0.0.1:{free_port()}",
               "--admin-token-file", str(token))
    assert down.returncode == 11 and "cannot reach the payment server" in down.stderr


def test_serve_refuses_an_unknown_log_level(served: Served) -> None:
    r = run("serve", "bank", "--config", str(served.folder / "bank.toml"), "--log-level",
            "verbose")
    assert r.returncode == 2 and "verbose" in r.stderr
