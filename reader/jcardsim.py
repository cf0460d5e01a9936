"""Run a Java Card applet in jCardSim, through JPype, as a reader.

``jcardsim:APPLET_CLASS:AID`` installs the applet class under that AID in a fresh simulator;
SELECT and every other command then go through ``transmitCommand`` as APDUs. The user supplies
the jCardSim jar (``JCARDSIM_JAR``; no registry this project can reach has it) and, when the
applet is not inside that jar, its classes (``JCARDSIM_CLASSPATH``, ``os.pathsep``-separated).

One JVM per process (JPype cannot restart one, nor change its class path once started). jCardSim
keeps its runtime per Java thread, so every simulator call runs on one dedicated Python thread,
attached to the JVM once. Java exceptions come back as :class:`JCardSimError`.

``JCARDSIM_SIMULATOR`` and ``JCARDSIM_AIDUTIL`` name other classes with jCardSim's API
(``Simulator``: ``installApplet(AID, Class)``, ``transmitCommand(byte[])``, ``getATR()``,
``reset()``; ``AIDUtil.create(String)``); the tests use them to run a stand-in of ours.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .base import Reader, ReaderError

DEFAULT_SIMULATOR = "com.licel.jcardsim.base.Simulator"
DEFAULT_AIDUTIL = "com.licel.jcardsim.utils.AIDUtil"

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


def _java_call(fn: Callable[[], T], what: str) -> T:
    import jpype

    def guarded() -> T:
        try:
            return fn()
        except jpype.JException as exc:
            raise JCardSimError(f"{what}: {exc.__class__.__name__}: {exc}") from None

    return _Jvm.run(guarded)


class JCardSimReader(Reader):
    def __init__(self, applet_class: str, aid: bytes, *, jar: str | None = None,
                 classpath: tuple[str, ...] = (), simulator_class: str | None = None,
                 aid_util_class: str | None = None) -> None:
        self.applet_class = applet_class
        self.aid = aid
        self.name = f"jcardsim:{applet_class}:{aid.hex().upper()}"
        jar = jar or os.environ.get("JCARDSIM_JAR")
        extra = os.environ.get("JCARDSIM_CLASSPATH", "")
        self.classpath = tuple(p for p in ((jar,) if jar else ()) + classpath
                               + tuple(extra.split(os.pathsep)) if p)
        self.simulator_class = (simulator_class or os.environ.get("JCARDSIM_SIMULATOR")
                                or DEFAULT_SIMULATOR)
        self.aid_util_class = (aid_util_class or os.environ.get("JCARDSIM_AIDUTIL")
                               or DEFAULT_AIDUTIL)
        self._sim: Any = None

    def connect(self) -> bytes:
        if not self.classpath:
            raise JCardSimError("set JCARDSIM_JAR to the jCardSim jar (see the README)")
        _Jvm.start(self.classpath)

        def make() -> tuple[Any, bytes]:
            import jpype
            simulator = jpype.JClass(self.simulator_class)()
            aid = jpype.JClass(self.aid_util_class).create(self.aid.hex().upper())
            applet = jpype.JClass(self.applet_class)
            simulator.installApplet(aid, applet.class_)
            return simulator, bytes(simulator.getATR())

        try:
            self._sim, atr = _java_call(make, f"installing {self.applet_class}")
        except TypeError as exc:  # a class JPype could not find or call
            raise JCardSimError(f"jCardSim API not found: {exc}") from None
        return atr

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
