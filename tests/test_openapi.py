"""Each server against its hand-written OpenAPI file (host/openapi/, shown as docs/openapi/),
fuzzed with schemathesis: no 5xx, and every answer documented (status code, content type, JSON
schema). Each server also serves its file as ``/openapi.json``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")

import httpx  # noqa: E402
import yaml  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from svcard.host.load.stack import LoadStack, start_load_stack  # noqa: E402
from svcard.host.pay.stack import Stack, start_stack  # noqa: E402

# Bodies are svcard binary messages: an OpenAPI schema can only say "bytes", so random bytes are
# "schema-valid" yet are not messages, and a 400 for them is right. That one check is left out;
# every other (no 5xx, documented status codes, content types, JSON schemas) applies.
BINARY_EXCLUDED = [positive_data_acceptance]

SPECS = Path(__file__).resolve().parent.parent / "docs" / "openapi"
payment_schema = schemathesis.openapi.from_path(SPECS / "payment.yaml")
merchant_schema = schemathesis.openapi.from_path(SPECS / "merchant.yaml")
load_schema = schemathesis.openapi.from_path(SPECS / "load.yaml")
bank_schema = schemathesis.openapi.from_path(SPECS / "bank.yaml")
# The bank's JSON load start: a schema-valid request is still refused when the account does not
# exist (403), or the card cannot take the amount or holds another currency (400): so positive
# data acceptance is left out there too.


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("openapi"), psams=2, acquire_timeout=0.5)
    yield s
    s.close()


@pytest.fixture(scope="module")
def load_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadStack]:
    s = start_load_stack(tmp_path_factory.mktemp("openapi-load"))
    s.account("alice", 100_000)
    yield s
    s.close()


def test_each_server_serves_its_openapi_document(stack: Stack, load_stack: LoadStack) -> None:
    for name, url in (("payment", stack.payment.url), ("merchant", stack.merchant.url),
                      ("load", load_stack.load.url), ("bank", load_stack.bank.url)):
        served = httpx.get(url + "/openapi.json", timeout=10)
        assert served.status_code == 200
        assert served.headers["content-type"] == "application/json"
        assert served.json() == yaml.safe_load((SPECS / f"{name}.yaml").read_text())
        assert "/v1/health" in served.json()["paths"]


@payment_schema.parametrize()
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_payment_server_conforms(case, stack: Stack) -> None:  # type: ignore[no-untyped-def]
    response = case.call(base_url=stack.payment.url)
    assert response.status_code < 500 or response.status_code == 503
    case.validate_response(response, excluded_checks=BINARY_EXCLUDED)


@merchant_schema.parametrize()
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_merchant_server_conforms(case, stack: Stack) -> None:  # type: ignore[no-untyped-def]
    response = case.call(base_url=stack.merchant.url)
    assert response.status_code < 500
    case.validate_response(response, excluded_checks=BINARY_EXCLUDED)


@load_schema.parametrize()
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_load_server_conforms(case, load_stack: LoadStack) -> None:  # type: ignore[no-untyped-def]
    response = case.call(base_url=load_stack.load.url)
    assert response.status_code < 500 or response.status_code == 503
    case.validate_response(response, excluded_checks=BINARY_EXCLUDED)


@bank_schema.parametrize()
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_bank_conforms(case, load_stack: LoadStack) -> None:  # type: ignore[no-untyped-def]
    response = case.call(base_url=load_stack.bank.url)
    assert response.status_code < 500 or response.status_code == 503
    case.validate_response(response, excluded_checks=BINARY_EXCLUDED)
