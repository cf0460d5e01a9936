"""Fast twins of the network message layouts, derived from their one ``construct`` declaration.

The messages of :mod:`.messages` and :mod:`.loadmsg` are declared once, as ``construct`` Structs.
Walking a construct tree costs 15-25 µs a message; a payment takes about ten of them. A
:class:`MessageCodec` reads a Struct's declaration once and turns it into a plan of steps the
``struct`` module runs: runs of fixed fields (big-endian integers, fixed byte strings,
constants, defaults), length-prefixed byte strings and text, a greedy tail, an end marker.

The twin answers only what it can answer exactly. Whenever it is unsure (a value of another type
or size, a truncated or overlong input, bad UTF-8, a constant that differs, a mapping it does
not know), it hands the input to the construct declaration itself, so the caller gets
construct's own value or construct's own error. ``tests/test_protocols_fast.py`` checks, on
random and broken inputs, that both give the same bytes, values and errors.

A parsed message is a construct ``Container`` (a dict with attribute access) whose fields are
also plain properties, so ``msg.amount`` costs a dict look-up rather than construct's
``__getattr__`` fallback. It has no ``_io`` entry (construct's stream; equality ignores it), and
its repr hides key fields (:data:`HIDDEN`).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from operator import itemgetter
from typing import Any

from construct import (
    Bytes,
    Const,
    Container,
    Default,
    FormatField,
    GreedyBytes,
    Prefixed,
    Renamed,
    StringEncoded,
    Struct,
    Terminated,
)

# field names whose values are keys: a parsed message's repr and str show them as <hidden>
HIDDEN = frozenset({"tsk", "key", "shared_key", "dk"})

_INT_CODES = frozenset("BHLQbhlq")
_NO_DEFAULT: Any = object()

# step kinds
_FIXED = 0     # a run of fixed-size fields, one struct.Struct
_PLAIN = 1     # the same with neither constants nor defaults: fetched in one itemgetter call
_BLOB = 2      # a length-prefixed byte string (Prefixed(int, GreedyBytes))
_TEXT = 3      # a length-prefixed string (PascalString)
_GREEDY = 4    # the rest of the input (GreedyBytes)
_END = 5       # nothing may follow (Terminated)
_RUNS = (_FIXED, _PLAIN)


class _Unsure(Exception):
    """The twin cannot answer this input exactly: construct's declaration answers it."""


def _int_code(sub: Any) -> str | None:
    """The struct code of a big-endian integer FormatField, or None."""
    if isinstance(sub, FormatField) and len(sub.fmtstr) == 2 and sub.fmtstr[0] == ">" \
            and sub.fmtstr[1] in _INT_CODES:
        return str(sub.fmtstr[1])
    return None


def _fixed(sub: Any) -> tuple[str, int] | None:
    """(struct code, byte size or 0 for an integer) of a fixed-size leaf, or None."""
    code = _int_code(sub)
    if code is not None:
        return code, 0
    if type(sub) is Bytes and type(sub.length) is int and sub.length >= 0:
        return f"{sub.length}s", sub.length
    return None


def _prefix(sub: Any) -> struct.Struct | None:
    """The length field of a Prefixed(int, GreedyBytes), or None."""
    if type(sub) is Prefixed and not sub.includelength and sub.subcon is GreedyBytes:
        code = _int_code(sub.lengthfield)
        if code is not None:
            return struct.Struct(">" + code)
    return None


class MessageCodec:
    """The ``struct`` twin of one construct Struct ``declaration`` (see the module text).
    ``parse`` and ``build`` give what ``declaration.parse`` and ``declaration.build`` give, or
    raise what they raise."""

    def __init__(self, name: str, declaration: Any) -> None:
        if not isinstance(declaration, Struct):
            raise TypeError(f"{name} is not a construct Struct")
        self.name = name
        self.declaration = declaration
        self.names: tuple[str, ...] = ()
        self.fallbacks = 0   # inputs handed to construct (a count for tests and benchmarks)
        steps: list[tuple[int, Any]] = []
        run: list[tuple[str, str, int, Any, Any]] = []   # (name, code, size, const, default)
        names: list[str] = []

        def close_run() -> None:
            if run:
                codec = struct.Struct(">" + "".join(code for _, code, _, _, _ in run))
                consts = tuple((i, c) for i, (_, _, _, c, _) in enumerate(run)
                               if c is not _NO_DEFAULT)
                fields = tuple((n, size, c, d) for n, _, size, c, d in run)
                plain = len(run) > 1 and all(c is _NO_DEFAULT and d is _NO_DEFAULT
                                             for _, _, _, c, d in run)
                getter = itemgetter(*(n for n, _, _, _, _ in run))
                sized = tuple((i, size) for i, (_, _, size, _, _) in enumerate(run) if size)
                steps.append((_PLAIN if plain else _FIXED, (codec, consts, fields, getter, sized)))
                run.clear()

        for sub in declaration.subcons:
            if type(sub) is not Renamed:
                if sub is Terminated:
                    close_run()
                    steps.append((_END, None))
                    continue
                raise TypeError(f"{name}: an unnamed field other than Terminated")
            field, inner = str(sub.name), sub.subcon
            names.append(field)
            default = _NO_DEFAULT
            if type(inner) is Default:
                if callable(inner.value):
                    raise TypeError(f"{name}.{field}: a computed default")
                default, inner = inner.value, inner.subcon
            if type(inner) is Const:
                if default is not _NO_DEFAULT or callable(inner.value):
                    raise TypeError(f"{name}.{field}: no struct form")
                leaf = _fixed(inner.subcon)
                if leaf is None:
                    raise TypeError(f"{name}.{field}: a constant of no struct form")
                run.append((field, leaf[0], leaf[1], inner.value, _NO_DEFAULT))
                continue
            leaf = _fixed(inner)
            if leaf is not None:
                run.append((field, leaf[0], leaf[1], _NO_DEFAULT, default))
                continue
            close_run()
            prefix = _prefix(inner)
            if prefix is not None:
                steps.append((_BLOB, (field, prefix, default, "")))
            elif type(inner) is StringEncoded and _prefix(inner.subcon) is not None:
                steps.append((_TEXT, (field, _prefix(inner.subcon), default, inner.encoding)))
            elif inner is GreedyBytes:
                steps.append((_GREEDY, (field, None, default, "")))
            else:
                raise TypeError(f"{name}.{field}: no struct form")
        close_run()
        self.names = tuple(names)
        self._steps = tuple(steps)
        # the byte size of every message of this layout, or None when it varies
        self.size: int | None = sum(how[0].size for kind, how in steps if kind in _RUNS) \
            if all(kind in (*_RUNS, _END) for kind, _ in steps) else None
        self.record = _record_class(name, self.names)

    # --- parsing --------------------------------------------------------------------------------
    def parse(self, data: bytes) -> Any:
        """The message in ``data``, as ``declaration.parse`` reads it (a trailing surplus is
        ignored unless the declaration ends with Terminated)."""
        if type(data) is bytes:
            try:
                return self.record(zip(self.names, self._parse(data), strict=True))
            except Exception:   # construct answers it: its value or its error
                pass
        self.fallbacks += 1
        return self.declaration.parse(data)

    def _parse(self, data: bytes) -> list[Any]:
        out: list[Any] = []
        pos, size = 0, len(data)
        for kind, how in self._steps:
            if kind in _RUNS:
                codec, consts = how[0], how[1]
                end = pos + codec.size
                if end > size:
                    raise _Unsure
                values = codec.unpack_from(data, pos)
                for i, const in consts:
                    if not values[i] == const:
                        raise _Unsure
                out += values
                pos = end
            elif kind in (_BLOB, _TEXT):
                prefix = how[1]
                start = pos + prefix.size
                if start > size:
                    raise _Unsure
                end = start + prefix.unpack_from(data, pos)[0]
                if end > size or end < start:
                    raise _Unsure
                value: Any = data[start:end]
                if kind == _TEXT:
                    try:
                        value = value.decode(how[3])
                    except UnicodeDecodeError:
                        raise _Unsure from None
                out.append(value)
                pos = end
            elif kind == _GREEDY:
                out.append(data[pos:])
                pos = size
            elif pos != size:   # _END
                raise _Unsure
        return out

    # --- building -------------------------------------------------------------------------------
    def build(self, obj: Mapping[str, Any]) -> bytes:
        """The bytes of ``obj``, as ``declaration.build`` makes them."""
        if isinstance(obj, dict):
            try:
                return self._build(obj)
            except Exception:   # construct answers it: its value or its error
                pass
        self.fallbacks += 1
        return bytes(self.declaration.build(obj))

    def _build(self, obj: dict[str, Any]) -> bytes:
        parts: list[bytes] = []
        for kind, how in self._steps:
            if kind == _PLAIN:
                codec, _, _, getter, sized = how
                found = getter(obj)
                for i, size in sized:
                    if type(found[i]) is not bytes or len(found[i]) != size:
                        raise _Unsure
                parts.append(codec.pack(*found))
            elif kind == _FIXED:
                codec, _, fields, _, _ = how
                values: list[Any] = []
                for name, size, const, default in fields:
                    if const is not _NO_DEFAULT:
                        value = obj.get(name)
                        if value not in (None, const):
                            raise _Unsure
                        values.append(const)
                        continue
                    if default is _NO_DEFAULT:
                        value = obj[name]
                    else:
                        value = obj.get(name)
                        if value is None:
                            value = default
                    if size and (type(value) is not bytes or len(value) != size):
                        raise _Unsure
                    values.append(value)
                parts.append(codec.pack(*values))
            elif kind == _END:
                continue
            else:
                name, prefix, default, encoding = how
                if default is _NO_DEFAULT:
                    value = obj[name]
                else:
                    value = obj.get(name)
                    if value is None:
                        value = default
                if kind == _TEXT:
                    if type(value) is not str:
                        raise _Unsure
                    try:
                        value = value.encode(encoding)
                    except UnicodeEncodeError:
                        raise _Unsure from None
                elif type(value) is not bytes:
                    raise _Unsure
                if prefix is not None:
                    parts.append(prefix.pack(len(value)))
                parts.append(value)
        return b"".join(parts)


def _hidden_repr(self: Container) -> str:
    shown = (f"{k}=<hidden>" if k in HIDDEN else f"{k}={v!r}"
             for k, v in self.items() if not (isinstance(k, str) and k.startswith("_")))
    return f"Container({', '.join(shown)})"


def _reduce(self: Container) -> tuple[Any, ...]:
    return (Container, (list(self.items()),))


def _record_class(name: str, names: tuple[str, ...]) -> type[Container]:
    """A Container subclass whose fields are properties (a name Container already uses,
    e.g. ``items``, stays Container's)."""
    space: dict[str, Any] = {"__slots__": (), "__repr__": _hidden_repr,
                             "__str__": _hidden_repr, "__reduce__": _reduce}
    for field in names:
        if field.isidentifier() and not hasattr(Container, field):
            space[field] = property(itemgetter(field))
    return type(name, (Container,), space)


# --- the twins of the layouts in use ------------------------------------------------------------
_TWINS: dict[Any, MessageCodec | None] = {}
_MAX_TWINS = 512   # layouts are module constants; a caller making Structs on the fly gets none


def _derive(name: str, layout: Any) -> MessageCodec | None:
    try:
        return MessageCodec(name, layout)
    except TypeError:
        return None


def twin(layout: Any) -> MessageCodec | None:
    """The twin of a construct Struct (derived on first use and kept), or None when it has no
    struct form or is no Struct."""
    try:
        return _TWINS[layout]
    except KeyError:
        pass
    except TypeError:      # unhashable
        return None
    found = _derive(type(layout).__name__, layout) if isinstance(layout, Struct) else None
    if len(_TWINS) < _MAX_TWINS:
        _TWINS[layout] = found
    return found


def register(space: Mapping[str, Any]) -> None:
    """Derive the twins of every Struct in a module's namespace, named as there."""
    for name, value in list(space.items()):
        if isinstance(value, Struct) and value not in _TWINS:
            _TWINS[value] = _derive(name, value)
