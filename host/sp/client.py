"""The customer's side of seed FIG. 3A (commerce unit 301): a signed retail order to the SP,
answered with the merchandise (``svcard sp order``). A customer needs no card: only the key
``svcard sp customer add`` gave it."""

from __future__ import annotations

from typing import Any

import httpx

from ..terminal.online import PaymentRefused
from .signing import DEFAULT_SP, signed_lookup, signed_order


def order(http: httpx.Client, sp_url: str, *, customer: str, key: bytes, merchant: str,
          sku: str, order_key: str | None = None, sp: str = DEFAULT_SP) -> dict[str, Any]:
    """Order ``sku`` of ``merchant`` through the SP named ``sp`` at ``sp_url``: the SP's answer
    (goods, receipt, bill line); a refusal is :class:`PaymentRefused` with the SP's reason."""
    body, headers = signed_order(key, customer, merchant, sku, order_key=order_key, sp=sp)
    response = http.post(sp_url.rstrip("/") + "/v1/orders", content=body, headers=headers)
    if response.status_code != 200:
        raise PaymentRefused.answer("service provider", response)
    answer: dict[str, Any] = response.json()
    return answer


def lookup(http: httpx.Client, sp_url: str, *, customer: str, key: bytes,
           order_key: str, sp: str = DEFAULT_SP) -> dict[str, Any]:
    """The state of one's own order (and, once billed, its goods): the SP's answer."""
    body, headers = signed_lookup(key, customer, order_key, sp=sp)
    response = http.post(sp_url.rstrip("/") + "/v1/orders/lookup", content=body,
                         headers=headers)
    if response.status_code != 200:
        raise PaymentRefused.answer("service provider", response)
    answer: dict[str, Any] = response.json()
    return answer
