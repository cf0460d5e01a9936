"""The five goods servers against their hand-written OpenAPI files (host/openapi/goods-*.yaml),
fuzzed with schemathesis: no 5xx, every answer documented; and each file served as
``/openapi.json``. Fuzzed messages carry no valid signature, so none is taken: "positive data
acceptance" is left out, as for the other signed servers."""

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

from svcard.host.goods.config import ROLES  # noqa: E402
from svcard.host.goods.stack import GoodsStack, start_goods  # noqa: E402

SPECS = Path(__file__).resolve().parent.parent / "host" / "openapi"
schemas = {r: schemathesis.openapi.from_path(SPECS / f"goods-{r}.yaml") for r in ROLES}
FUZZ = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GoodsStack]:
    s = start_goods(tmp_path_factory.mktemp("goods-openapi"))
    yield s
    s.close()


@pytest.mark.parametrize("role", ROLES)
def test_each_server_serves_its_openapi_document(stack: GoodsStack, role: str) -> None:
    served = httpx.get(stack.url(role) + "/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.json() == yaml.safe_load((SPECS / f"goods-{role}.yaml").read_text())


def conforms(case, url: str) -> None:  # type: ignore[no-untyped-def]
    response = case.call(base_url=url)
    assert response.status_code < 500 or response.status_code == 503
    # 413 (a body over the server's bound, refused before it is parsed) is a rejection too,
    # though schemathesis' negative-data check does not count it as one
    excluded = [positive_data_acceptance] + ([negative_data_rejection]
                                             if response.status_code == 413 else [])
    case.validate_response(response, excluded_checks=excluded)


@schemas["merchant"].parametrize()
@FUZZ
def test_merchant_conforms(case, stack: GoodsStack) -> None:  # type: ignore[no-untyped-def]
    conforms(case, stack.url("merchant"))


@schemas["payment"].parametrize()
@FUZZ
def test_payment_conforms(case, stack: GoodsStack) -> None:  # type: ignore[no-untyped-def]
    conforms(case, stack.url("payment"))


@schemas["auth"].parametrize()
@FUZZ
def test_auth_conforms(case, stack: GoodsStack) -> None:  # type: ignore[no-untyped-def]
    conforms(case, stack.url("auth"))


@schemas["bank"].parametrize()
@FUZZ
def test_bank_conforms(case, stack: GoodsStack) -> None:  # type: ignore[no-untyped-def]
    conforms(case, stack.url("bank"))


@schemas["fulfil"].parametrize()
@FUZZ
def test_fulfil_conforms(case, stack: GoodsStack) -> None:  # type: ignore[no-untyped-def]
    conforms(case, stack.url("fulfil"))
