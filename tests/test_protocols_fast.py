"""The struct twins of the network message layouts (protocols/codec.py) against construct.

For every message layout of messages.py and loadmsg.py, random values and random bytes (valid,
truncated, extended, flipped, of the wrong type or size) go through both the plain construct
declaration and its twin: the same bytes or the same error on build, the same values or the same
error on parse. Valid inputs must take the twin's own path (no hand-over to construct).
``SVCARD_CODEC_CASES`` (default 300 per layout) and ``SVCARD_CODEC_SEED`` replay a run; the
seed is printed.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import pickle
import random
from typing import Any

import pytest
from construct import (
    Const,
    Container,
    Default,
    FormatField,
    GreedyBytes,
    Prefixed,
    StringEncoded,
    Struct,
    Terminated,
)
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from svcard.protocols import codec, loadmsg, messages, secure

CASES = int(os.environ.get("SVCARD_CODEC_CASES", "300"))
SEED = int(os.environ.get("SVCARD_CODEC_SEED", str(random.SystemRandom().randrange(2**32))))

LAYOUTS = {f"{mod.__name__.rsplit('.', 1)[1]}.{name}": value
           for mod in (messages, loadmsg) for name, value in vars(mod).items()
           if isinstance(value, Struct)}
TEXTS = ["", "ok", "refusé", "卡片已过期", "a" * 300, "\u0000\U0001F4B3"]


def rng_for(name: str) -> random.Random:
    print(f"seed {SEED} (SVCARD_CODEC_SEED={SEED} replays)")
    return random.Random(f"{SEED}:{name}")


def inner(sub: Any) -> tuple[Any, Any]:
    """(the field's construct, its Default value or None)."""
    if isinstance(sub, Default):
        return sub.subcon, sub.value
    return sub, None


def random_value(rng: random.Random, sub: Any) -> Any:
    if isinstance(sub, Const):
        return sub.value
    if isinstance(sub, FormatField):
        bits = 8 * sub.length
        return rng.choice([0, 1, 2 ** bits - 1, rng.randrange(2 ** bits)])
    if isinstance(sub, StringEncoded):
        return rng.choice([*TEXTS, "".join(chr(rng.randrange(32, 0x3000)) for _ in range(9))])
    if isinstance(sub, Prefixed) or sub is GreedyBytes:
        most = 2 ** (8 * sub.lengthfield.length) - 1 if isinstance(sub, Prefixed) else 400
        return rng.randbytes(rng.choice([0, 1, 4, 28, min(most, 60), rng.randrange(most + 1)]))
    return rng.randbytes(sub.length)   # Bytes(n)


def random_fields(rng: random.Random, layout: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for sub in layout.subcons:
        if sub.name is None:
            continue
        leaf, default = inner(sub.subcon)
        roll = rng.random()
        if (isinstance(leaf, Const) or default is not None) and roll < 0.3:
            if roll < 0.15:
                fields[sub.name] = None
            continue
        fields[sub.name] = random_value(rng, leaf)
    return fields


def broken_fields(rng: random.Random, layout: Any, fields: dict[str, Any]) -> Any:
    """``fields`` with one thing wrong (or odd but maybe fine, e.g. a bytearray)."""
    names = [s.name for s in layout.subcons if s.name is not None]
    bad = dict(fields)
    name = rng.choice(names)
    value = bad.get(name)
    how = rng.randrange(12)
    if how == 0:
        bad.pop(name, None)
    elif how == 1:
        bad[name] = None
    elif how == 2:
        bad[name] = bytearray(value) if isinstance(value, bytes) else value
    elif how == 3:
        bad[name] = (value + b"\x00") if isinstance(value, bytes) else -1
    elif how == 4:
        bad[name] = value[:-1] if isinstance(value, bytes) and value else 2 ** 70
    elif how == 5:
        bad[name] = rng.randrange(2 ** 40)
    elif how == 6:
        bad[name] = "text" if not isinstance(value, str) else b"bytes"
    elif how == 7:
        bad[name] = 1.5
    elif how == 8:
        bad[name] = "\udcff"   # a lone surrogate: no UTF-8
    elif how == 9:
        bad[name] = memoryview(value) if isinstance(value, bytes) else True
    elif how == 10:
        bad[name] = rng.randbytes(70000)   # longer than any 2-byte length prefix
    else:
        return rng.choice([None, list(fields.items()), Container(fields), 5])
    return bad


def outcome(fn: Any, arg: Any) -> tuple[Any, ...]:
    try:
        result = fn(arg)
    except Exception as exc:   # the error is the result compared
        return ("error", type(exc), str(exc))
    if isinstance(result, dict):
        values = {k: v for k, v in result.items() if not k.startswith("_")}
        return ("ok", values, [type(v) for v in values.values()])
    return ("ok", result, type(result))


def broken_bytes(rng: random.Random, good: bytes) -> Any:
    how = rng.randrange(8)
    if how == 0 and good:
        return good[: rng.randrange(len(good))]
    if how == 1:
        return good + rng.randbytes(rng.randrange(1, 5))
    if how == 2 and good:
        i = rng.randrange(len(good))
        return good[:i] + bytes([good[i] ^ (1 << rng.randrange(8))]) + good[i + 1:]
    if how == 3:
        return rng.randbytes(rng.randrange(80))
    if how == 4:
        return bytearray(good)
    if how == 5:
        return memoryview(good)
    if how == 6 and len(good) > 2:   # a length prefix that claims too much or too little
        i = rng.randrange(len(good) - 1)
        return good[:i] + b"\xff\xff" + good[i + 2:]
    return b""


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_message_layout_has_a_twin(name: str) -> None:
    twin = codec.twin(LAYOUTS[name])
    assert twin is not None and twin.declaration is LAYOUTS[name]
    assert twin.name == name.split(".")[1]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_twin_builds_and_parses_as_construct(name: str) -> None:
    layout = LAYOUTS[name]
    twin = codec.twin(layout)
    assert twin is not None
    rng = rng_for(name)
    before = twin.fallbacks
    for case in range(CASES):
        fields = random_fields(rng, layout)
        expected = layout.build(fields)
        assert twin.build(fields) == expected, (case, fields)
        assert outcome(twin.parse, expected) == outcome(layout.parse, expected), case
    assert twin.fallbacks == before, "valid messages must take the twin's own path"
    for case in range(CASES):
        fields = random_fields(rng, layout)
        bad = broken_fields(rng, layout, fields)
        assert outcome(twin.build, bad) == outcome(layout.build, bad), (case, bad)
        data = broken_bytes(rng, layout.build(fields))
        assert outcome(twin.parse, data) == outcome(layout.parse, data), (case, bytes(data))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_truncation_is_refused_alike(name: str) -> None:
    layout = LAYOUTS[name]
    twin = codec.twin(layout)
    assert twin is not None
    good = layout.build(random_fields(rng_for(name), layout))
    for cut in range(len(good) + 1):
        assert outcome(twin.parse, good[:cut]) == outcome(layout.parse, good[:cut]), cut


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sizeof_is_constructs(name: str) -> None:
    layout = LAYOUTS[name]
    assert outcome(lambda lay: messages.sizeof(lay), layout) \
        == outcome(lambda lay: lay.sizeof(), layout)


def test_parsed_message_is_a_container_with_fast_fields() -> None:
    fields = {"version": 1, "tsk": bytes(range(32)), "amount": 1234, "currency_code": 156,
              "currency_exponent": 2, "variant": 7, "purpose": 0, "expires": 2 ** 40,
              "terminal_id": b"T00001"}
    ticket = messages.parse(messages.OrderTicket, messages.build(messages.OrderTicket, fields),
                            "ticket")
    assert isinstance(ticket, Container) and ticket == fields
    assert ticket.amount == ticket["amount"] == 1234
    assert type(ticket).__dict__["amount"].__class__ is property   # not Container.__getattr__
    ticket.amount = 99                # a change through either door is seen through both
    assert ticket["amount"] == 99
    ticket["variant"] = 8
    assert ticket.variant == 8
    assert bytes(range(32)).hex() not in repr(ticket) and "tsk=<hidden>" in repr(ticket)
    assert str(bytes(range(32))) not in str(ticket)
    for twin in (copy.copy(ticket), copy.deepcopy(ticket), pickle.loads(pickle.dumps(ticket))):
        assert twin == ticket and isinstance(twin, Container)


def test_messages_parse_and_build_use_the_twin_and_keep_their_errors() -> None:
    env = messages.seal_envelope(messages.DRAW_REQUEST, b"M" * 8, b"T" * 16, b"etsk",
                                 bytes(32), b"body")
    parsed, header = messages.split_envelope(env)
    assert type(parsed) is codec.twin(messages.Envelope).record   # type: ignore[union-attr]
    assert header == env[: len(header)] and parsed.etsk == b"etsk"
    with pytest.raises(messages.MessageError, match="envelope is malformed"):
        messages.split_envelope(env[:20])
    with pytest.raises(messages.MessageError, match="malformed: Error in path"):
        messages.parse(messages.Confirmation, b"SC\x01\x07" + bytes(16), "confirmation")
    assert messages.error_message(7, "été") == messages.ErrorMessage.build(
        {"version": messages.VERSION, "code": 7, "reason": "été"})


def test_a_layout_with_no_struct_form_keeps_construct() -> None:
    from construct import Array, Int8ub
    odd = Struct("n" / Int8ub, "items" / Array(2, Int8ub))
    assert codec.twin(odd) is None
    assert messages.build(odd, {"n": 1, "items": [2, 3]}) == b"\x01\x02\x03"
    assert messages.parse(odd, b"\x01\x02\x03", "odd")["items"] == [2, 3]
    assert codec.twin("not a layout") is None and codec.twin([1]) is None
    plain = Struct("a" / Int8ub, Terminated, "b" / Int8ub)
    twin = codec.twin(plain)
    assert twin is not None
    assert outcome(twin.parse, b"\x01\x02") == outcome(plain.parse, b"\x01\x02")


# --- envelope crypto ----------------------------------------------------------------------------
def plain_hkdf(shared: bytes, merchant: bytes, txn: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=txn,
                info=b"svcard derived key v1" + merchant).derive(shared)


def test_derived_keys_are_cached_and_unchanged() -> None:
    rng = rng_for("derive")
    for _ in range(50):
        shared, merchant, txn = rng.randbytes(32), rng.randbytes(8), rng.randbytes(16)
        dk = plain_hkdf(shared, merchant, txn)
        hits = secure._derive_cached.cache_info().hits
        assert secure.derive_key(shared, merchant, txn) == dk
        assert secure.derive_key(shared, merchant, txn) == dk
        assert secure._derive_cached.cache_info().hits == hits + 1
        assert secure.derive_key(bytearray(shared), merchant, txn) == dk   # not cached: fine
    assert secure._derive_cached.cache_info().maxsize == secure.CACHE_SIZE
    with pytest.raises(ValueError, match="32 bytes"):
        secure.derive_key(bytes(31), b"M" * 8, b"T" * 16)


def test_sealing_with_cached_ciphers_still_refuses_what_it_must() -> None:
    key, other = bytes(range(32)), bytes(32)
    blob = secure.seal(key, b"plain", b"aad")
    assert secure.open_sealed(key, blob, b"aad", "x") == b"plain"
    assert secure.open_sealed(bytearray(key), blob, b"aad", "x") == b"plain"
    for k, b, a in ((other, blob, b"aad"), (key, blob, b"dab"),
                    (key, blob[:-1] + bytes([blob[-1] ^ 1]), b"aad")):
        with pytest.raises(secure.SealError, match="does not open"):
            secure.open_sealed(k, b, a, "x")
    with pytest.raises(ValueError):
        secure.seal(bytes(7), b"plain", b"aad")
    assert "00010203" not in repr(secure._cipher_cached.cache_info())


# --- BCD dates and times (protocols/purse.py) without strftime and hex text --------------------
def old_outcome(fn: Any, *args: Any) -> tuple[Any, ...]:
    try:
        return ("ok", fn(*args))
    except Exception as exc:   # the error is the result compared
        return ("error", type(exc))


def test_bcd_dates_and_times_match_the_text_formulas() -> None:
    from svcard.protocols import purse as P
    rng = rng_for("bcd")
    start = dt.datetime(1, 1, 1)
    digits = [int(f"{n}", 16) for n in range(100)]   # bytes whose nibbles are both decimal
    for case in range(CASES * 10):
        moment = start + dt.timedelta(seconds=rng.randrange(315537897599))
        if case % 5 == 0:
            moment = moment.replace(year=rng.choice([1, 9, 99, 999, 1000, 1999, 2024, 9999]),
                                    day=min(moment.day, 28))
        day = moment.date()
        assert old_outcome(P.bcd_date, day) \
            == old_outcome(lambda d: bytes.fromhex(d.strftime("%Y%m%d")), day), day
        assert old_outcome(P.bcd_date, moment) == old_outcome(P.bcd_date, day)
        assert P.bcd_time(moment) == bytes.fromhex(moment.strftime("%H%M%S"))
        assert P.bcd_time(moment.time()) == P.bcd_time(moment)
        for raw in (rng.randbytes(4), bytes(rng.choice(digits) for _ in range(4)),
                    bytes.fromhex(f"{moment.year:04d}{moment.month:02d}{moment.day:02d}")):
            assert old_outcome(P.parse_bcd_date, raw) == old_outcome(old_parse_bcd_date, raw)
        for raw in (rng.randbytes(3), bytes(rng.choice(digits) for _ in range(3)),
                    bytes.fromhex(moment.strftime("%H%M%S"))):
            assert P.valid_time(raw) == old_valid_time(raw), raw


def old_parse_bcd_date(data: bytes) -> dt.date:
    from svcard.protocols import purse as P
    if not P.valid_date(data) or data[:2] == b"\x00\x00":
        raise ValueError
    text = data.hex()
    return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))


def old_valid_time(data: bytes) -> bool:
    from svcard.protocols import purse as P
    if len(data) != 3 or not P.is_bcd(data):
        return False
    h, m, s = (int(data[i: i + 1].hex()) for i in range(3))
    return h < 24 and m < 60 and s < 60


# --- ECB encryptors kept open per thread (protocols/crypto.py) ----------------------------------
def fresh_ecb(key: bytes, data: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    from svcard.protocols import crypto
    enc = Cipher(crypto._tdes(key), modes.ECB()).encryptor()
    return enc.update(data) + enc.finalize()


def test_kept_ecb_encryptors_encrypt_as_fresh_ones_in_every_thread() -> None:
    import threading

    from svcard.protocols import crypto
    rng = rng_for("ecb")
    keys = [rng.randbytes(rng.choice([8, 16, 24])) for _ in range(crypto.ECB_CONTEXTS_PER_THREAD
                                                                   + 40)]
    jobs = [(rng.choice(keys), rng.randbytes(8 * rng.randrange(1, 5))) for _ in range(CASES * 4)]
    expected = [fresh_ecb(k, d) for k, d in jobs]
    wrong: list[int] = []

    def run(offset: int) -> None:
        for i in range(len(jobs)):
            j = (i + offset) % len(jobs)
            if crypto.encrypt_ecb(*jobs[j]) != expected[j]:
                wrong.append(j)

    threads = [threading.Thread(target=run, args=(n * 97,)) for n in range(4)]
    for t in threads:
        t.start()
    run(5)
    for t in threads:
        t.join(timeout=120)
    assert not wrong and not any(t.is_alive() for t in threads)
    assert len(crypto._ECB_CONTEXTS.open) <= crypto.ECB_CONTEXTS_PER_THREAD
    with pytest.raises(crypto.KeyError_):
        crypto.encrypt_ecb(bytes(15), bytes(8))
    with pytest.raises(ValueError, match="whole 8-byte blocks"):
        crypto.encrypt_ecb(bytes(16), bytes(9))
    assert crypto.encrypt_ecb(bytes(16), b"") == b""
