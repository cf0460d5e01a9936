"""Reader specs on the command line.

* ``virtual:IMAGE.json``: a card image opened in this process;
* ``pcsc:NAME`` / ``pcsc:#N``: a PC/SC reader by exact name, unique prefix or index;
* ``trace:FILE``: replay a recorded trace;
* ``jcardsim:APPLET_CLASS:AID[:PARAMS_HEX][@SCRIPT]``: a Java Card applet in jCardSim
  (``JCARDSIM_JAR``), installed under AID (hex) with GlobalPlatform install data whose
  application parameters are PARAMS_HEX (none if left out), then personalised with the APDUs of
  the text file SCRIPT: one APDU in hex a line (spaces and colons ignored), ``#`` starts a comment,
  blank lines skipped; everything after the first ``@`` is the file's path. An APDU that does not
  answer 9000 stops the connect (exit 10, naming its index and header), a malformed spec or
  script is a ReaderSpecError (exit 3, naming the file and line);
* ``delayed:MS:SPEC``: SPEC with MS milliseconds added to every APDU (a slow physical card).

A server node (docs/deploy-nodes.md) names every module of its deployment and opens one only
while it leases it: :func:`node_readers` checks the specs without opening any and gives
:class:`OnDemandReader` objects, each with its lease slot (:func:`slot_name`: never a key).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ...card.image import open_card
from ...protocols.apdu import APDUFormatError, parse_command
from ...reader import CardConnectionError, Reader, ReaderError, VirtualReader
from ...reader.delayed import DelayedReader
from ...reader.jcardsim import JCardSimError, JCardSimReader
from ...reader.pcsc import PcscReader
from ...reader.trace import TraceReader

SCHEMES = ("virtual", "pcsc", "trace", "jcardsim", "delayed")


class ReaderSpecError(ReaderError):
    """A reader spec that names no reader this svcard can open."""


def open_reader(spec: str, *, lock_timeout: float = 5.0) -> Reader:
    """The reader ``spec`` names (not yet connected: use it as a context manager)."""
    scheme, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ReaderSpecError(f"reader spec {spec!r} is not SCHEME:TARGET "
                              f"(supported: {', '.join(s + ':' for s in SCHEMES)})")
    if scheme == "virtual":
        card = open_card(rest, lock_timeout=lock_timeout)
        return VirtualReader(card, name=f"virtual:{rest}", on_disconnect=card.close)
    if scheme == "pcsc":
        return PcscReader(rest)
    if scheme == "trace":
        return TraceReader(rest)
    if scheme == "jcardsim":
        return _jcardsim_reader(spec, rest)
    if scheme == "delayed":
        ms, sep, inner = rest.partition(":")
        try:
            delay = float(ms)
        except ValueError:
            delay = -1.0
        if not sep or delay < 0:
            raise ReaderSpecError(f"{spec!r}: expected delayed:MS:SPEC")
        return DelayedReader(open_reader(inner, lock_timeout=lock_timeout), delay)
    raise ReaderSpecError(f"unknown reader scheme {scheme!r} "
                          f"(supported: {', '.join(s + ':' for s in SCHEMES)})")


JCARDSIM_FORM = "jcardsim:APPLET_CLASS:AID[:PARAMS_HEX][@SCRIPT]"


def shown_spec(spec: str) -> str:
    """``spec`` as it may be printed: a jcardsim: spec without its PARAMS_HEX (it may carry
    keys); any other spec as it is."""
    scheme, _, rest = spec.partition(":")
    if scheme != "jcardsim":
        return spec
    head, at, script = rest.partition("@")
    parts = head.split(":")
    return (f"jcardsim:{parts[0]}:{parts[1] if len(parts) > 1 else ''}"
            + (":..." if len(parts) > 2 else "") + (f"@{script}" if at else ""))


def _jcardsim_reader(spec: str, rest: str) -> JCardSimReader:
    """The jcardsim: reader; errors show the spec without PARAMS_HEX (it may carry keys)."""
    head, at, script = rest.partition("@")
    parts = head.split(":")
    shown = shown_spec(spec)
    if len(parts) not in (2, 3) or not parts[0]:
        raise ReaderSpecError(f"{shown!r}: expected {JCARDSIM_FORM}")
    applet, aid_hex, *params_hex = parts
    aid = _hex_field(shown, "AID", aid_hex)
    params = _hex_field(shown, "PARAMS_HEX", params_hex[0]) if params_hex else b""
    if at and not script:
        raise ReaderSpecError(f"{shown!r}: no script file after '@' (expected {JCARDSIM_FORM})")
    apdus = read_apdu_script(Path(script)) if at else []
    try:
        return JCardSimReader(applet, aid, install_params=params, personalise=apdus)
    except JCardSimError as exc:
        raise ReaderSpecError(f"{shown!r}: {exc}") from None


def _hex_field(shown: str, name: str, text: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if not value:
        raise ReaderSpecError(f"{shown!r}: {name} must be hex digits, an even number of them "
                              f"(expected {JCARDSIM_FORM})")
    return value


def read_apdu_script(path: Path) -> list[bytes]:
    """The command APDUs of a personalisation script: one APDU in hex a line, spaces and colons
    ignored, ``#`` to the end of the line a comment, blank lines skipped. An unreadable file or
    a line that is no APDU is a :class:`ReaderSpecError` naming the file and the line (never
    the line's bytes: they may carry keys)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ReaderSpecError(f"{path}: cannot read the personalisation script: {reason}") \
            from None
    apdus = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].replace(" ", "").replace(":", "").replace("\t", "")
        if not text:
            continue
        try:
            apdu = bytes.fromhex(text)
        except ValueError:
            raise ReaderSpecError(f"{path}:{number}: not an APDU in hex (only hex digits, an "
                                  "even number of them, spaces and colons)") from None
        try:
            parse_command(apdu)
        except APDUFormatError as exc:
            raise ReaderSpecError(f"{path}:{number}: not a command APDU: {exc}") from None
        apdus.append(apdu)
    if not apdus:
        raise ReaderSpecError(f"{path}: the personalisation script holds no APDU")
    return apdus


class OnDemandReader(Reader):
    """The reader a spec names, opened at :meth:`connect` and closed at :meth:`disconnect`: a
    node holds a module's image (and its file lock) only while it leases the module."""

    def __init__(self, spec: str, lock_timeout: float = 0.5) -> None:
        self.name = slot_name(spec)   # the lease's slot: in the database and the logs
        self._spec = spec
        self.lock_timeout = lock_timeout
        self._inner: Reader | None = None

    def connect(self) -> bytes:
        if self._inner is None:   # a paused former holder keeps the lock: give up soon
            self._inner = open_reader(self._spec, lock_timeout=self.lock_timeout)
        return self._inner.connect()

    def transmit(self, apdu: bytes) -> bytes:
        if self._inner is None:
            raise CardConnectionError(f"{self.name}: not connected (this node holds no lease)")
        return self._inner.transmit(apdu)

    def disconnect(self) -> None:
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.disconnect()


SLOT_MAX = 300   # the lease tables' slot column


def slot_name(spec: str) -> str:
    """A module's lease slot: its spec as it may be printed (a ``jcardsim:`` spec's PARAMS_HEX
    may carry keys: left out, and a digest of the whole spec added so two such specs differ)."""
    head, rest = "", spec
    while rest.startswith("delayed:"):   # delayed:MS:SPEC
        ms, _, rest = rest.removeprefix("delayed:").partition(":")
        head += f"delayed:{ms}:"
    shown = head + shown_spec(rest)
    if shown == spec:
        return spec
    return f"{shown}#{hashlib.sha256(spec.encode()).hexdigest()[:16]}"


def node_readers(specs: list[str] | tuple[str, ...], option: str = "--psam") -> list[Reader]:
    """A node's modules (``svcard serve payment --node``: ``--psam``; ``svcard serve load
    --node``: ``--hsm``) as :class:`OnDemandReader` objects, checked without opening any (another
    node may hold one now): a spec svcard cannot read, one named twice, too long for the lease
    table's slot, or a virtual image that is not there is a :class:`ReaderSpecError` naming
    ``option`` (the command line: one line, exit 3)."""
    seen: set[str] = set()
    for spec in specs:
        shown = shown_spec(spec)
        scheme, sep, rest = spec.partition(":")
        while scheme == "delayed" and sep:   # delayed:MS:SPEC wraps another spec
            _, sep, rest = rest.partition(":")
            scheme, sep, rest = rest.partition(":")
        if not sep or not rest or scheme not in SCHEMES:
            raise ReaderSpecError(f"{option} {shown!r}: not SCHEME:TARGET with a scheme of "
                                  f"{', '.join(s + ':' for s in SCHEMES)}")
        if len(slot_name(spec)) > SLOT_MAX:
            raise ReaderSpecError(f"{option} {shown[:60]!r}...: longer than {SLOT_MAX} "
                                  "characters")
        if spec in seen:
            raise ReaderSpecError(f"{option} {shown!r} is named twice")
        seen.add(spec)
        if scheme == "virtual" and not Path(rest).is_file():
            raise ReaderSpecError(f"{option} {shown!r}: no image at {rest}")
    return [OnDemandReader(spec) for spec in specs]
