"""The four trading-session servers against their hand-written OpenAPI files
(host/openapi/trade-*.yaml), fuzzed with schemathesis: no 5xx, every answer documented; and
each file served as ``/openapi.json``. Fuzzed messages carry no valid signature, so none is
taken: "positive data acceptance" is left out, as for the other signed servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")

import httpx  # noqa: E402
import yaml  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    negative_data_rejection,
    positive_data_acceptance,
)

from svcard.host.trade.stack import TradeStack, start_trade  # noqa: E402

SPECS = Path(__file__).resolve().parent.parent / "host" / "openapi"
NAMES = {"am1": "trade-account-manager", "acq1": "trade-acquirer", "shop": "trade-merchant",
         "mam1": "trade-merchant-account"}
am_schema = schemathesis.openapi.from_path(SPECS / "trade-account-manager.yaml")
acq_schema = schemathesis.openapi.from_path(SPECS / "trade-acquirer.yaml")
ma_schema = schemathesis.openapi.from_path(SPECS / "trade-merchant.yaml")
mam_schema = schemathesis.openapi.from_path(SPECS / "trade-merchant-account.yaml")
FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TradeStack]:
    s = start_trade(tmp_path_factory.mktemp("trade-openapi"))
    s.customer("alice")
    yield s
    s.close()


@pytest.mark.parametrize("party", sorted(NAMES))
def test_each_server_serves_its_openapi_document(stack: TradeStack, party: str) -> None:
    served = httpx.get(stack.url(party) + "/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.json() == yaml.safe_load((SPECS / f"{NAMES[party]}.yaml").read_text())


def conforms(case, url: str) -> None:  # type: ignore[no-untyped-def]
    response = case.call(base_url=url)
    assert response.status_code < 500 or response.status_code == 503
    # 413 (a body over the server's bound, refused before it is parsed) is a rejection too,
    # though schemathesis' negative-data check does not count it as one
    excluded = [positive_data_acceptance] + ([negative_data_rejection]
                                             if response.status_code == 413 else [])
    case.validate_response(response, excluded_checks=excluded)


@am_schema.parametrize()
@FUZZ
def test_account_manager_conforms(case, stack: TradeStack) -> None:  # type: ignore[no-untyped-def]
    conforms(case, stack.url("am1"))


@acq_schema.parametrize()
@FUZZ
def test_acquirer_conforms(case, stack: TradeStack) -> None:  # type: ignore[no-untyped-def]
    conforms(case, stack.url("acq1"))


@ma_schema.parametrize()
@FUZZ
def test_merchant_conforms(case, stack: TradeStack) -> None:  # type: ignore[no-untyped-def]
    conforms(case, stack.url("shop"))


@mam_schema.parametrize()
@FUZZ
def test_merchant_account_conforms(case, stack: TradeStack) -> None:  # type: ignore[no-untyped-def]
    conforms(case, stack.url("mam1"))
