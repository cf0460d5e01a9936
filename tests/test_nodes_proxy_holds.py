"""Node processes behind nginx know their proxy (issue 16 leftovers): a payment or load node's
spec names the proxies whose ``X-Forwarded-For`` it believes (default: nginx's address), so a
node behind the real nginx counts its FIG. 5 holds per client under each client's own address,
not nginx's, and a client's own ``X-Forwarded-For`` chooses nothing.

Clients connect from 127.0.0.5 and 127.0.0.6 (nginx reaches the node from 127.0.0.1). Ports
are free ones; the database is SQLite (one node)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from svcard.host.demo.system import card_image
from svcard.host.kit import serving
from svcard.host.kit.nginx import NGINX_ADDRESS, Nginx, find_nginx
from svcard.host.kit.serving import ServerThread, free_port
from svcard.host.load import nodes as LN
from svcard.host.pay import client as C
from svcard.host.pay import nodes as PN
from svcard.host.pay.merchant.server import MerchantConfig, MerchantServer
from svcard.host.pay.server.psam_pool import identify
from svcard.host.pay.stack import DEMO_MERCHANT_ID, psam_images
from svcard.host.terminal.journal import Journal
from svcard.host.terminal.online import PaymentRefused
from svcard.host.terminal.reader_specs import open_reader

needs_nginx = pytest.mark.skipif(find_nginx() is None, reason="nginx is not installed")
KEY = bytes(range(32))


def test_node_specs_trust_nginx_by_default_and_pass_it_to_serve(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    def fake_serve(app: Any, **kwargs: Any) -> int:
        seen.append(kwargs)
        return 0

    monkeypatch.setattr(serving, "serve", fake_serve)
    psam = psam_images(tmp_path, 1)[0]
    pay = PN.NodeSpec("n1", free_port(), f"sqlite:///{tmp_path / 'pay.db'}",
                      [f"virtual:{psam}"], DEMO_MERCHANT_ID.hex(), KEY.hex())
    assert pay.trusted_proxies == [NGINX_ADDRESS] == ["127.0.0.1"]
    load = LN.LoadNodeSpec("l1", free_port(), f"sqlite:///{tmp_path / 'load.db'}",
                           [f"virtual:{tmp_path / 'hsm.json'}"],
                           "00" * 8, KEY.hex(), "00" * 6)
    assert load.trusted_proxies == [NGINX_ADDRESS]
    for spec, serve_node, proxies in ((pay, PN.serve_node, ["10.0.0.0/8"]),
                                      (load, LN.serve_node, [])):
        spec.trusted_proxies = proxies
        path = tmp_path / f"{spec.name}.json"
        path.write_text(json.dumps(asdict(spec)))
        with pytest.raises(SystemExit):
            serve_node(path)
        assert seen[-1]["proxies"] == proxies
    # a spec file written before the field existed: nginx trusted
    old = asdict(pay)
    del old["trusted_proxies"], old["max_client_holds"]
    assert PN.NodeSpec(**old).trusted_proxies == ["127.0.0.1"]
    # the key stays out of the repr
    assert KEY.hex() not in repr(pay) and KEY.hex() not in repr(load)


class Pulled(Exception):
    """The card left the reader before DEBIT FOR PURCHASE: the node keeps holding its PSAM."""


def pay(merchant: str, card: Path, local: str, journal: Path, *, pulled: bool = False,
        headers: dict[str, str] | None = None) -> C.PaymentOutcome:
    """A FIG. 5 payment by a client at the address ``local`` (``pulled``: the card goes
    before it is debited)."""
    transport = httpx.HTTPTransport(local_address=local)
    with httpx.Client(timeout=30, transport=transport, headers=headers) as http, \
            open_reader(f"virtual:{card}") as reader:
        if pulled:
            send = reader.transmit

            def transmit(apdu: bytes) -> bytes:
                if apdu[1] == 0x54:   # DEBIT FOR PURCHASE
                    raise Pulled
                return send(apdu)

            reader.transmit = transmit  # type: ignore[method-assign]
        return C.pay(f"{merchant}/v1/checkout/song?variant=fig5", reader,
                     journal=Journal(journal), http=http)


@pytest.fixture
def node_behind_nginx(tmp_path: Path) -> Iterator[str]:
    """One payment node (two PSAMs, FIG. 5 holds: 2 per merchant, 1 per client) behind
    nginx, and a merchant whose orders are paid through nginx: the merchant's URL."""
    psams = psam_images(tmp_path, 2)
    with open_reader(f"virtual:{psams[0]}") as reader:
        terminal_id = identify(reader).terminal_id
    node = PN.Node(tmp_path, PN.NodeSpec(
        "node1", free_port(), f"sqlite:///{tmp_path / 'pay.db'}",
        [f"virtual:{p}" for p in psams], DEMO_MERCHANT_ID.hex(), KEY.hex(), lease_seconds=5.0,
        hold_timeout=60.0, max_holds=2, max_client_holds=1))
    nginx = Nginx(tmp_path / "nginx", [f"127.0.0.1:{node.spec.port}"])
    port = free_port()
    merchant_server = MerchantServer(MerchantConfig(
        DEMO_MERCHANT_ID, KEY, nginx.url, terminal_id, public_url=f"http://127.0.0.1:{port}",
        variants=frozenset(("fig5",)), default_variant="fig5",
        db_url=f"sqlite:///{tmp_path / 'merchant.db'}"))
    merchant = ServerThread(merchant_server.app(), port=port)
    try:
        node.start().wait_ready()
        deadline = time.monotonic() + 60
        while httpx.get(node.url + "/v1/health", timeout=5).json().get("psams", 0) < 2:
            assert time.monotonic() < deadline, "the node never leased its two PSAMs"
            time.sleep(0.05)
        nginx.start()
        merchant.start()
        yield merchant.url
    finally:
        merchant.stop()
        merchant_server.close()
        nginx.stop()
        node.kill()   # a held PSAM would keep a SIGTERMed node draining


@needs_nginx
def test_a_node_behind_nginx_counts_each_client_apart(node_behind_nginx: str,
                                                      tmp_path: Path) -> None:
    merchant = node_behind_nginx
    cards = {name: card_image(tmp_path, f"{name}.json", ep=5_000) for name in ("a1", "a2", "b")}
    # client A leaves a FIG. 5 payment held (its card gone before the debit): its one hold
    with pytest.raises(Pulled):
        pay(merchant, cards["a1"], "127.0.0.5", tmp_path / "a.jsonl", pulled=True)
    # A again, claiming in its own X-Forwarded-For to be someone else: still A, refused
    for forged in ("203.0.113.9", "127.0.0.6", "127.0.0.5, 127.0.0.7"):
        with pytest.raises(PaymentRefused) as refused:
            pay(merchant, cards["a2"], "127.0.0.5", tmp_path / "a2.jsonl",
                headers={"X-Forwarded-For": forged})
        assert refused.value.status == 429 and "client" in refused.value.reason, refused.value
    # client B, behind the same nginx, has holds of its own (before: it was nginx too, 429)
    outcome = pay(merchant, cards["b"], "127.0.0.6", tmp_path / "b.jsonl")
    assert outcome.variant == "fig5" and outcome.balance_after == outcome.balance_before - \
        outcome.amount
