"""The jCardSim bridge: JPype, one JVM per process, one thread for every simulator call.

jCardSim itself is on no registry this project can reach, so CI runs the bridge against
``tests/java/svcardtest/SimulatorStandIn.java``, a stand-in of ours with the simulator's API
shape, compiled here with javac. With ``JCARDSIM_JAR`` set, a second test runs the real jar.
Each scenario runs in its own Python process: a JVM starts once per process, with one class path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

JAVA_SRC = Path(__file__).parent / "java" / "svcardtest"


@pytest.fixture(scope="module")
def standin_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        import jpype  # noqa: F401
    except ImportError:
        pytest.skip("JPype is not installed")
    if shutil.which("javac") is None:
        pytest.skip("javac is not installed")
    out = tmp_path_factory.mktemp("classes")
    subprocess.run(["javac", "-d", str(out), *map(str, sorted(JAVA_SRC.glob("*.java")))],
                   check=True, capture_output=True, timeout=120)
    return out


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


def standin_env(classes: Path) -> dict[str, str]:
    return {"JCARDSIM_JAR": str(classes), "JCARDSIM_SIMULATOR": "svcardtest.SimulatorStandIn",
            "JCARDSIM_AIDUTIL": "svcardtest.AIDUtilStandIn"}


def test_bridge_with_the_standin(standin_classes: Path) -> None:
    result = run_python("""
        import threading
        from svcard.reader.jcardsim import JCardSimError, JCardSimReader
        reader = JCardSimReader("svcardtest.AppletStandIn", bytes.fromhex("F0010203"))
        assert reader.connect() == bytes.fromhex("3B00")
        assert reader.transmit(bytes.fromhex("00A4040004F001020300")) == b"\\x90\\x00"
        assert reader.transmit(bytes.fromhex("00A4040002AAAA")) == b"\\x6a\\x82"
        assert reader.transmit(bytes.fromhex("00A4040004F0010203")) == b"\\x90\\x00"
        # calls from several Python threads all reach the simulator on one Java thread
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(
            reader.transmit(bytes.fromhex("80CC0000")))) for _ in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert answers == [b"\\x01\\x90\\x00"] * 4, answers
        try:
            reader.transmit(bytes.fromhex("80EE0000"))
        except JCardSimError as exc:
            assert "stand-in failure on purpose" in str(exc), exc
            assert "IllegalStateException" in str(exc), exc
        else:
            raise AssertionError("a Java exception must become JCardSimError")
        reader.disconnect()
        # a second simulator in the same process reuses the one JVM
        other = JCardSimReader("svcardtest.AppletStandIn", bytes.fromhex("F0010204"))
        other.connect()
        assert other.transmit(bytes.fromhex("00A4040004F0010204")) == b"\\x90\\x00"
        print("ok")
    """, standin_env(standin_classes))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cli_with_the_standin(standin_classes: Path) -> None:
    exe = Path(sys.executable).parent / "svcard"
    spec = "jcardsim:svcardtest.AppletStandIn:F0010203"
    env = {**os.environ, **standin_env(standin_classes)}
    result = subprocess.run([str(exe), "apdu", "--reader", spec, "00A4040004F0010203",
                             "80CA0000"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "Received (9000, success)" in result.stdout
    assert "6D00, instruction not supported" in result.stdout
    result = subprocess.run([str(exe), "apdu", "--reader", spec, "00A4040004F0010203",
                             "80EE0000"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 10 and "stand-in failure" in result.stderr


def test_clear_errors_without_jar_or_class(standin_classes: Path) -> None:
    no_jar = run_python("""
        from svcard.reader.jcardsim import JCardSimError, JCardSimReader
        try:
            JCardSimReader("x.Y", b"\\x01").connect()
        except JCardSimError as exc:
            print(exc)
    """, {"JCARDSIM_JAR": "", "JCARDSIM_CLASSPATH": ""})
    assert "set JCARDSIM_JAR" in no_jar.stdout
    missing = run_python("""
        from svcard.reader.jcardsim import JCardSimError, JCardSimReader
        try:
            JCardSimReader("svcardtest.NoSuchApplet", b"\\x01").connect()
        except JCardSimError as exc:
            print("error:", exc)
    """, standin_env(standin_classes))
    assert "error:" in missing.stdout and "NoSuchApplet" in missing.stdout, missing.stderr


@pytest.mark.skipif(not os.environ.get("JCARDSIM_JAR", "").endswith(".jar"),
                    reason="set JCARDSIM_JAR to a real jCardSim jar to run this")
def test_real_jcardsim_hello_world() -> None:
    """jCardSim's own sample applet, through the real jar."""
    exe = Path(sys.executable).parent / "svcard"
    aid = "01020304050607080901"
    spec = f"jcardsim:com.licel.jcardsim.samples.HelloWorldApplet:{aid}"
    result = subprocess.run(
        [str(exe), "apdu", "--reader", spec, f"00A404000A{aid}", "0001000000"],
        capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items()
             if k not in ("JCARDSIM_SIMULATOR", "JCARDSIM_AIDUTIL")})
    assert result.returncode == 0, result.stderr
    assert "Received (9000, success)" in result.stdout
