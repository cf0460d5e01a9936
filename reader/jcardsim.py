"""Run a Java Card applet in jCardSim, through JPype, as a reader.

``JCardSimReader(APPLET_CLASS, AID, install_params=..., personalise=[...])`` installs the applet
class in a fresh simulator the way a GlobalPlatform card's INSTALL [for install] does: the applet's
static ``install(bArray, bOffset, bLength)`` receives, from ``bOffset`` on, the install data
``len | instance AID | len | privileges | len | application parameters`` (privileges: the single
byte ``00``; parameters: ``install_params``, what a GP card takes from tag C9). jCardSim passes the
array it is given on to ``install`` untouched, so this layout is exactly what the applet reads. As
on a card, where the install data lies inside the APDU buffer, ``bOffset`` is not 0 (an applet
that assumes 0 fails here as it would on a card) and the 261-byte array holds 00 around the data.
An ordinary applet registers with ``register(bArray, (short) (bOffset + 1), bArray[bOffset])``.
(jCardSim's sample ``HelloWorldApplet`` reads the parameters as if the privileges were two
bytes: give it no parameters.)

After the install nothing is selected. The ``personalise`` APDUs then go to the card in order (put
a SELECT first if the applet needs one); one that does not answer 9000 stops the connect with a
:class:`JCardSimError` naming its index, header and status word (never its data: it may carry
keys). After the last one the simulator is reset, as a card is powered anew between the
personalisation machine and a terminal: transient memory is cleared and nothing is selected.
SELECT and every later command go through ``transmitCommand`` as APDUs.

The user supplies the jCardSim jar (``JCARDSIM_JAR``; no registry this project can reach has it)
and, when the applet is not inside that jar, its classes (``JCARDSIM_CLASSPATH``,
``os.pathsep``-separated; jCardSim b6218da also needs BouncyCastle there).

One JVM per process (JPype cannot restart one, nor change its class path once started). jCardSim
keeps its runtime per Java thread, so every simulator call runs on one dedicated Python thread,
attached to the JVM once. Java exceptions come back as :class:`JCardSimError`.

``JCARDSIM_SIMULATOR`` and ``JCARDSIM_AIDUTIL`` name other classes with jCardSim's API
(``Simulator``: ``installApplet(AID, Class, byte[], short, byte)``, ``transmitCommand(byte[])``,
``getATR()``, ``reset()``; ``AIDUtil.create(String)``); the tests use them to run a stand-in of
ours.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..protocols import sw as SW
from ..protocols.apdu import APDUFormatError, parse_command
from .base import Reader, ReaderError

DEFAULT_SIMULATOR = "com.licel.jcardsim.base.Simulator"
DEFAULT_AIDUTIL = "com.licel.jcardsim.utils.AIDUtil"
PRIVILEGES = b"\x00"
INSTALL_OFFSET = 5   # filler bytes before the install data in the array install() gets
INSTALL_ARRAY = 261  # that array's length: a short APDU's, as a card's APDU buffer holds it
MAX_INSTALL_DATA = 127   # install()'s bLength is a Java byte

T = TypeVar("T")


class JCardSimError(ReaderError):
    """The JVM, jCardSim or the applet failed (the Java exception's text is kept)."""

    exit_code = 10


class _Jvm:
    """The process's one JVM and the one thread that talks to simulators."""

    _lock = threading.Lock()
    _executor: ThreadPoolExecutor | None = None
    _classpath: tuple[str, ...] = ()

    @classmethod
    def run(cls, fn: Callable[[], T]) -> T:
        if cls._executor is None:
            raise JCardSimError("the JVM is not started")
        future = cls._executor.submit(fn)
        return future.result()

    @classmethod
    def start(cls, classpath: tuple[str, ...]) -> None:
        with cls._lock:
            try:
                import jpype
            except ImportError:
                raise JCardSimError("JPype is not installed (pip install 'svcard[jcardsim]')") \
                    from None
            if jpype.isJVMStarted():
                missing = [p for p in classpath if p not in cls._classpath]
                if missing:
                    raise JCardSimError("the JVM of this process was started without "
                                        f"{', '.join(missing)}; a JVM cannot be restarted")
                return
            for path in classpath:
                if not os.path.exists(path):
                    raise JCardSimError(f"class path entry not found: {path}")
            try:
                jpype.startJVM(classpath=list(classpath), convertStrings=True)
            except (OSError, RuntimeError) as exc:
                raise JCardSimError(f"cannot start a JVM: {exc}") from None
            cls._classpath = classpath
            cls._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jcardsim")


# reason codes of javacard.framework.SystemException, and jCardSim's "applet creation failed"
_REASONS = {1: "ILLEGAL_VALUE", 2: "NO_TRANSIENT_SPACE", 3: "ILLEGAL_TRANSIENT",
            4: "ILLEGAL_AID", 5: "NO_RESOURCE", 6: "ILLEGAL_USE",
            0x6444: "applet creation failed: its install() threw or did not register"}


def _describe(exc: Any) -> str:
    """A Java exception's class and message, and a Java Card exception's reason code."""
    name = exc.__class__.__name__
    text = str(exc)
    out = name if text in ("", "None", name) else f"{name}: {text}"
    get_reason = getattr(exc, "getReason", None)
    if callable(get_reason):
        reason = int(get_reason()) & 0xFFFF
        out += f" (reason {reason:04X}{', ' + _REASONS[reason] if reason in _REASONS else ''})"
    return out


def _java_call(fn: Callable[[], T], what: str) -> T:
    import jpype

    def guarded() -> T:
        try:
            return fn()
        except jpype.JException as exc:
            raise JCardSimError(f"{what}: {_describe(exc)}") from None

    return _Jvm.run(guarded)


def gp_install_data(aid: bytes, install_params: bytes = b"",
                    privileges: bytes = PRIVILEGES) -> bytes:
    """The install data a GlobalPlatform card gives an applet's ``install``:
    ``len | AID | len | privileges | len | application parameters``."""
    if not 5 <= len(aid) <= 16:
        raise JCardSimError(f"an applet AID has 5 to 16 bytes, got {len(aid)}")
    data = (bytes([len(aid)]) + aid + bytes([len(privileges)]) + privileges
            + bytes([len(install_params) & 0xFF]) + install_params)
    if len(install_params) > 255 or len(data) > MAX_INSTALL_DATA:
        raise JCardSimError(f"install data of {len(data)} bytes (with {len(install_params)} "
                            f"bytes of parameters): install() takes at most {MAX_INSTALL_DATA}")
    return data


def _header(apdu: bytes) -> str:
    return apdu[:4].hex().upper()


class JCardSimReader(Reader):
    """An applet installed (GP install data) and personalised in a fresh jCardSim simulator.

    ``install_params`` and ``personalise`` may hold keys: they are kept out of the reader's
    name, repr and errors (an error shows an APDU's header only)."""

    def __init__(self, applet_class: str, aid: bytes, *, install_params: bytes = b"",
                 personalise: Sequence[bytes] = (), jar: str | None = None,
                 classpath: tuple[str, ...] = (), simulator_class: str | None = None,
                 aid_util_class: str | None = None, protocol: str | None = "T=1") -> None:
        self.applet_class = applet_class
        self.protocol = protocol
        self.aid = bytes(aid)
        self.name = f"jcardsim:{applet_class}:{self.aid.hex().upper()}"
        self._install_data = gp_install_data(self.aid, bytes(install_params))
        self._personalise = tuple(bytes(apdu) for apdu in personalise)
        for i, apdu in enumerate(self._personalise):
            try:
                parse_command(apdu)
            except APDUFormatError as exc:
                raise JCardSimError(f"{self.name}: personalisation APDU {i} "
                                    f"({_header(apdu) or 'empty'}) is malformed: {exc}") from None
        jar = jar or os.environ.get("JCARDSIM_JAR")
        extra = os.environ.get("JCARDSIM_CLASSPATH", "")
        self.classpath = tuple(p for p in ((jar,) if jar else ()) + classpath
                               + tuple(extra.split(os.pathsep)) if p)
        self.simulator_class = (simulator_class or os.environ.get("JCARDSIM_SIMULATOR")
                                or DEFAULT_SIMULATOR)
        self.aid_util_class = (aid_util_class or os.environ.get("JCARDSIM_AIDUTIL")
                               or DEFAULT_AIDUTIL)
        self._sim: Any = None

    def __repr__(self) -> str:
        return (f"<JCardSimReader {self.name} install data {len(self._install_data)} bytes, "
                f"{len(self._personalise)} personalisation APDUs>")

    def connect(self) -> bytes:
        if not self.classpath:
            raise JCardSimError("set JCARDSIM_JAR to the jCardSim jar (see the README)")
        _Jvm.start(self.classpath)
        install_data = self._install_data

        def make() -> Any:
            import jpype
            simulator = jpype.JClass(self.simulator_class)()
            aid = jpype.JClass(self.aid_util_class).create(self.aid.hex().upper())
            applet = jpype.JClass(self.applet_class)
            filler = bytes(INSTALL_ARRAY - INSTALL_OFFSET - len(install_data))
            array = jpype.JArray(jpype.JByte)(bytes(INSTALL_OFFSET) + install_data + filler)
            simulator.installApplet(aid, applet.class_, array, jpype.JShort(INSTALL_OFFSET),
                                    jpype.JByte(len(install_data)))
            return simulator

        try:
            sim = _java_call(make, f"installing {self.applet_class}")
        except TypeError as exc:  # a class JPype could not find or call
            raise JCardSimError(f"jCardSim API not found: {exc}") from None
        self._use_protocol(sim)
        if self._personalise:
            self._run_personalisation(sim)
            self._use_protocol(sim)
        self._sim = sim
        return _java_call(lambda: bytes(sim.getATR()), "getATR")

    def _use_protocol(self, sim: Any) -> None:
        """jCardSim starts (and resets) in T=0 while its ATR offers T=1 and it passes whole
        command APDUs: switch to the ``protocol`` the card is used with, so an applet's
        ``APDU.getProtocol()`` agrees with the ATR (a simulator without ``changeProtocol``,
        such as an older jCardSim or a stand-in, is left as it is)."""
        if not self.protocol:
            return
        change = getattr(sim, "changeProtocol", None)
        if change is not None:
            _java_call(lambda: change(self.protocol), "changeProtocol")

    def _run_personalisation(self, sim: Any) -> None:
        import jpype
        count = len(self._personalise)
        for i, apdu in enumerate(self._personalise):
            where = (f"{self.name}: personalisation APDU [{i}] ({i + 1} of {count}, "
                     f"header {_header(apdu)})")

            def send(command: bytes = apdu) -> bytes:
                return bytes(sim.transmitCommand(jpype.JArray(jpype.JByte)(command)))

            try:
                answer = _java_call(send, "transmitCommand")
            except JCardSimError as exc:
                raise JCardSimError(f"{where}: {exc}") from None
            sw = int.from_bytes(answer[-2:], "big") if len(answer) >= 2 else -1
            if sw != SW.OK:
                shown = f"{sw:04X} ({SW.meaning(sw)})" if sw >= 0 else "no status word"
                raise JCardSimError(f"{where} answered {shown}")
        _java_call(lambda: sim.reset(), "reset")

    def transmit(self, apdu: bytes) -> bytes:
        if self._sim is None:
            raise ReaderError(f"{self.name}: not connected (call connect first)")
        sim = self._sim

        def send() -> bytes:
            import jpype
            return bytes(sim.transmitCommand(jpype.JArray(jpype.JByte)(apdu)))

        return _java_call(send, "transmitCommand")

    def disconnect(self) -> None:
        if self._sim is not None:
            sim, self._sim = self._sim, None
            _java_call(lambda: sim.reset(), "reset")
