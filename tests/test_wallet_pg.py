"""The wallet system with all three databases on PostgreSQL (a private test cluster), where
every call runs on its own thread and transaction: the throttle, the match and the debit stay
one step each under concurrency."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from pg_env import Cluster, start_cluster
from sqlalchemy import delete
from test_wallet_attack import approve, choose, new_purchase
from test_wallet_network import balance, issue, member, topup

from svcard.host.wallet.stack import Browserless, WalletStack, start_wallet
from svcard.host.wallet.web.members import throttle


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def stack(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WalletStack]:
    urls = {name: cluster.new_database() for name in ("fin", "gateway", "web")}
    s = start_wallet(tmp_path_factory.mktemp("wallet-pg"), db_urls=urls, login_failures=5)
    yield s
    s.close()


def test_parallel_wrong_logins_stop_at_the_limit(stack: WalletStack) -> None:
    member(stack, "pgthrottle", "the right one")

    def guess(_: int) -> int:
        b = Browserless(stack)
        try:
            return b.post("/api/login", {"member": "pgthrottle",
                                         "password": "wrong guess"}).status_code
        finally:
            b.close()

    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(guess, range(20)))
    assert codes.count(401) == 5 and codes.count(429) == 15, codes
    with stack.web.engine.begin() as conn:      # the window passes (for the next test)
        conn.execute(delete(throttle))


def test_concurrent_approvals_and_debits_on_postgresql(stack: WalletStack, tmp_path: Path,
                                                       ) -> None:
    b = member(stack, "pgpayer")
    card = issue(b)
    topup(stack, card["number"], 21_000, "cash-pg")         # enough for exactly ten
    purchases = [new_purchase() for _ in range(14)]
    for p in purchases:
        assert choose(stack, b, card, p).status_code == 200
    # each purchase asked for four times at once, all fourteen together
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(lambda p: approve(stack, http, p)[0], purchases * 4))
    assert codes.count(200) == 10, sorted(codes)
    assert codes.count(402) == 4                   # the last four: balance too low
    assert balance(b, card["number"]) == 0
    # the same card's secret, guessed in parallel: the lock holds at five wrong tries
    with ThreadPoolExecutor(12) as pool:
        refused = list(pool.map(lambda _: choose(stack, b, card, new_purchase(),
                                                 secret=secrets.token_hex(4)).json()["reason"],
                                range(12)))
    assert sum("locked" in r for r in refused) >= 7, refused


def test_card_details_both_ways_at_once_on_postgresql(stack: WalletStack) -> None:
    """Embodiments 2 and 3 on PostgreSQL: fourteen filled purchases, each paid twice through
    the gateway and twice through the VAN, all at once, from a card holding ten: ten debits,
    never an approval without its debit, each reported to the gateway once."""
    import time

    from sqlalchemy import text
    from test_wallet_embodiments import filled, gateway_pay, van_pay

    b = member(stack, "pgfiller")
    card = issue(b)
    topup(stack, card["number"], 21_000, "cash-pg-fill")
    forms = []
    for _ in range(14):
        p = new_purchase()
        forms.append((p, filled(stack, b, card, p)))
    jobs = [(pay, p, form) for p, form in forms for pay in (gateway_pay, van_pay) * 2]
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(lambda job: job[0](stack, http, job[1], job[2])[0], jobs))
    assert set(codes) <= {200, 402, 409}, codes
    assert balance(b, card["number"]) == 0
    with stack.fin.engine.connect() as conn:
        debited = {r[0] for r in conn.execute(text(
            "SELECT ref FROM wf_movements WHERE card=:c AND kind='debit' AND result='done'"),
            {"c": card["number"]})}
    assert len(debited) == 10
    for i, (_, form) in enumerate(forms):        # approved only with its own debit
        if 200 in codes[4 * i:4 * i + 4]:
            assert "pay:" + form["profile"][:32] in debited
    deadline = time.monotonic() + 30
    while True:
        with stack.gateway.engine.connect() as conn:
            journal = conn.execute(text("SELECT ref FROM wg_journal WHERE card=:c AND "
                                        "kind='debit'"), {"c": card["number"]}).all()
        if len(journal) >= 10 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sorted(r[0] for r in journal) == sorted(debited)
