"""Every purse layout: the fast struct codec agrees with its construct declaration."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svcard.protocols import purse as P

LAYOUTS = sorted((name, value) for name, value in vars(P).items()
                 if isinstance(value, P.FastLayout))


def test_layout_sizes() -> None:
    sizes = {name: layout.sizeof() for name, layout in LAYOUTS}
    assert sizes["LogRecord"] == 23
    assert sizes["PublicAppData"] == 30
    assert sizes["HolderData"] == 55
    assert sizes["InitForLoadAnswer"] == 16
    assert sizes["InitForPurchaseAnswer"] == 15
    assert sizes["DebitForPurchaseData"] == 15
    assert sizes["InitSamForPurchaseData"] == 0x1C
    assert sizes["InitSamForPurchaseData24"] == 0x24
    assert sizes["PsamRecord"] == P.PSAM_RECORD_SIZE
    for name, layout in LAYOUTS:
        assert layout.sizeof() == layout.declaration.sizeof(), name


@pytest.mark.parametrize(("name", "layout"), LAYOUTS, ids=[n for n, _ in LAYOUTS])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_fast_codec_equals_construct(name: str, layout: P.FastLayout, data: st.DataObject) -> None:
    raw = data.draw(st.binary(min_size=layout.sizeof(), max_size=layout.sizeof()))
    fast = layout.parse(raw)
    slow = layout.declaration.parse(raw)
    assert {n: getattr(fast, n) for n in layout.names} == {n: slow[n] for n in layout.names}
    assert layout.build(fast._asdict()) == raw == layout.declaration.build(slow)


def test_fast_codec_is_strict() -> None:
    with pytest.raises(P.LayoutError, match="LogRecord has 23 bytes, got 22"):
        P.LogRecord.parse(bytes(22))
    fields = P.LogRecord.parse(bytes(23))._asdict()
    with pytest.raises(P.LayoutError, match="terminal_id has 6 bytes"):
        P.LogRecord.build({**fields, "terminal_id": bytes(5)})
    with pytest.raises(P.LayoutError, match="overdraft_limit does not fit 3 bytes"):
        P.LogRecord.build({**fields, "overdraft_limit": 1 << 24})
    with pytest.raises(P.LayoutError):
        P.LogRecord.build({**fields, "amount": -1})
    with pytest.raises(P.LayoutError, match="missing field"):
        P.LogRecord.build({"counter": 1})
