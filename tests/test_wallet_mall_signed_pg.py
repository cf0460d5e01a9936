"""Mall-signed orders on PostgreSQL (a private test cluster), where each request runs in its
own transaction at once: the binding of a new customer id at the mall to one member holds
under races, and a member's own first purchases of a new id, sent at once, are all stored."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from pg_env import Cluster, start_cluster
from test_wallet_attack import new_purchase
from test_wallet_mall_signed import send
from test_wallet_network import issue, member

from svcard.host.wallet.gateway.matching import sign_order
from svcard.host.wallet.stack import WalletStack, start_wallet


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WalletStack]:
    cluster: Cluster = start_cluster()
    try:
        urls = {name: cluster.new_database() for name in ("fin", "gateway", "web")}
        s = start_wallet(tmp_path_factory.mktemp("wallet-signed-pg"), db_urls=urls)
        yield s
        s.close()
    finally:
        cluster.stop()


def test_one_member_per_customer_id_under_races(stack: WalletStack) -> None:
    people = [member(stack, f"pgsigned{i}") for i in range(8)]
    cards = [issue(b) for b in people]
    for round_ in range(3):
        customer = f"pg-{round_}-" + secrets.token_hex(4)
        orders = [sign_order(stack.mall_key, {**new_purchase(), "customer": customer})
                  for _ in people]
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i, o=orders: send(stack, people[i], cards[i], o[i])
                                  .status_code, range(8)))
        assert codes.count(200) == 1 and set(codes) <= {200, 403}, codes
    # one member's own eight first purchases of a new id at once: all stored
    customer = "pg-own-" + secrets.token_hex(4)
    orders = [sign_order(stack.mall_key, {**new_purchase(), "customer": customer})
              for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda p: send(stack, people[0], cards[0], p).status_code,
                              orders))
    assert codes == [200] * 8, codes
    for b in people:
        b.close()
