"""B1: guessing account secrets at the bank (issue 9).

Before the fix 3,000 wrong secrets went through at 136/s with no throttle and the right one then
succeeded; secrets were unsalted SHA-256. Each test here is the attacker's client, step by step,
against a real bank server on loopback with a real SQLite database.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from svcard.host.kit.serving import ServerThread
from svcard.host.load.bank.db import accounts
from svcard.host.load.bank.server import BankConfig, BankServer

SECRET = "correct horse"
BANK_ID = bytes.fromhex("42414E4B30303031")


@dataclass
class Bank:
    server: BankServer
    thread: ServerThread
    db_url: str

    @property
    def start_url(self) -> str:
        return f"{self.thread.url}/v1/load/start"

    def balance(self, account: str) -> int:
        row = self.server.db.account(account)
        assert row is not None
        return int(row["balance"])


def start_bank(db_url: str, **limits: Any) -> Bank:
    server = BankServer(BankConfig(BANK_ID, os.urandom(32), "http://127.0.0.1:9/v1/load",
                                   bytes(6), db_url=db_url, **limits))
    thread = ServerThread(server.app()).start()
    server.config.public_url = thread.url
    return Bank(server, thread, db_url)


@pytest.fixture
def make_bank(tmp_path: Path) -> Iterator[Callable[..., Bank]]:
    started: list[Bank] = []

    def make(**limits: Any) -> Bank:
        bank = start_bank(f"sqlite:///{tmp_path / 'bank.db'}", **limits)
        started.append(bank)
        return bank

    yield make
    for bank in started:
        bank.thread.stop()


def order(account: str, secret: str, amount: int = 1) -> dict[str, Any]:
    return {"account": account, "secret": secret, "amount": amount,
            "card": {"serial": "00000000000000000001", "balance": 0, "limit": 100_000,
                     "currency_code": 156}}


def guess(http: httpx.Client, bank: Bank, account: str, secret: str) -> httpx.Response:
    return http.post(bank.start_url, json=order(account, secret))


def wait_until_unlocked(http: httpx.Client, bank: Bank, account: str,
                        timeout: float = 30.0) -> httpx.Response:
    """Poll with the right secret (a refused attempt while locked costs the account nothing)
    until the lockout ends, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        answer = guess(http, bank, account, SECRET)
        if answer.status_code != 429 or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


def test_3000_wrong_secrets_are_throttled_and_the_right_one_waits(
        make_bank: Callable[..., Bank], http: httpx.Client) -> None:
    # the longest lockout (8 s) outlasts a bank restart on a busy machine (the restart check)
    bank = make_bank(secret_lockout=0.5, secret_lockout_max=8.0, address_max_failures=10**6)
    bank.server.db.create_account("alice", "Alice", 156, 10_000, SECRET)
    # the attacker: 3,000 guesses, 8 at a time, as fast as the bank answers
    with ThreadPoolExecutor(8) as pool:
        codes = Counter(pool.map(
            lambda n: guess(http, bank, "alice", f"guess-{n}").status_code, range(3_000)))
    assert set(codes) == {403, 429}
    # 5 tries, then one more each time a (doubling, at most 8 s) lockout runs out
    assert codes[403] <= 5 + 10, codes
    assert codes[429] >= 2_985, codes
    # the right secret during the lockout is refused too, with a Retry-After
    now = guess(http, bank, "alice", SECRET)
    assert now.status_code == 429
    assert 1 <= int(now.headers["Retry-After"]) <= 8
    assert "too many wrong secrets" in now.json()["reason"]
    assert bank.balance("alice") == 10_000
    # a restart does not forget: the count is in the database
    bank.thread.stop()
    bank = make_bank(secret_lockout=0.5, secret_lockout_max=8.0, address_max_failures=10**6)
    assert guess(http, bank, "alice", SECRET).status_code == 429
    # after the window the right secret works, and the count starts again
    assert wait_until_unlocked(http, bank, "alice").status_code == 200
    assert bank.balance("alice") == 9_999
    for n in range(4):
        assert guess(http, bank, "alice", f"again-{n}").status_code == 403


def test_twenty_concurrent_guesses_get_no_more_tries_than_twenty_in_a_row(
        make_bank: Callable[..., Bank], http: httpx.Client) -> None:
    bank = make_bank(address_max_failures=10**6)
    bank.server.db.create_account("bob", "Bob", 156, 500, SECRET)
    with ThreadPoolExecutor(20) as pool:
        codes = Counter(pool.map(
            lambda n: guess(http, bank, "bob", f"race-{n}").status_code, range(20)))
    assert codes == {403: 5, 429: 15}  # each attempt claimed its count before the check


def test_a_right_secret_resets_the_count(make_bank: Callable[..., Bank],
                                         http: httpx.Client) -> None:
    bank = make_bank(address_max_failures=10**6)
    bank.server.db.create_account("carol", "Carol", 156, 500, SECRET)
    for _ in range(3):
        for n in range(4):
            assert guess(http, bank, "carol", f"typo-{n}").status_code == 403
        assert guess(http, bank, "carol", SECRET).status_code == 200
    assert bank.balance("carol") == 497
    # the right secret is now remembered by the server; a lockout still refuses it
    for n in range(5):
        assert guess(http, bank, "carol", f"attack-{n}").status_code == 403
    assert guess(http, bank, "carol", SECRET).status_code == 429
    assert bank.balance("carol") == 497


def test_one_address_spraying_many_accounts_is_throttled(make_bank: Callable[..., Bank],
                                                          http: httpx.Client) -> None:
    bank = make_bank(address_max_failures=10, address_window=60.0)
    for n in range(12):
        bank.server.db.create_account(f"user{n}", "User", 156, 100, SECRET)
    # one guess per account, so no account reaches its own limit
    codes = [guess(http, bank, f"user{n}", "123456").status_code for n in range(11)]
    assert codes == [403] * 10 + [429]
    refused = guess(http, bank, "user11", SECRET)  # even a right secret from this address
    assert refused.status_code == 429 and "address" in refused.json()["reason"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # unknown accounts count against the address as well (and cost a hash like real ones)
    assert guess(http, bank, "nobody", "x").status_code == 429


def test_secrets_are_salted_scrypt_and_old_sha256_rows_are_upgraded(
        make_bank: Callable[..., Bank], http: httpx.Client) -> None:
    bank = make_bank(address_max_failures=10**6)
    db = bank.server.db
    db.create_account("dave", "Dave", 156, 100, SECRET)
    db.create_account("erin", "Erin", 156, 100, SECRET)

    def stored(account: str) -> str:
        value = db.secret_hash(account)
        assert value is not None
        return value

    assert stored("dave").startswith("scrypt$ln=14,r=8,p=1$")
    assert stored("dave") != stored("erin")  # salted: the same secret, two hashes
    assert SECRET.encode().hex() not in stored("dave")
    # a row from before: the plain SHA-256 of the secret
    legacy = hashlib.sha256(SECRET.encode()).hexdigest()
    with db.engine.begin() as conn:
        conn.execute(update(accounts).where(accounts.c.account_id == "erin")
                     .values(secret_hash=legacy))
    assert guess(http, bank, "erin", "wrong").status_code == 403
    assert stored("erin") == legacy
    assert guess(http, bank, "erin", SECRET).status_code == 200
    assert stored("erin").startswith("scrypt$")  # rewritten at the first right secret
    assert guess(http, bank, "erin", SECRET).status_code == 200
