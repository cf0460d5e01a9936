"""The jCardSim bridge: JPype, one JVM per process, one thread for every simulator call;
GlobalPlatform install data and personalisation APDUs; the ``jcardsim:`` reader spec.

Every scenario runs twice where it can: against ``tests/java/svcardtest/SimulatorStandIn.java``
(a stand-in of ours with the simulator's API shape, compiled here with javac; it needs no
jCardSim) and against the real jar named by ``JCARDSIM_JAR`` with the Java Card applet
``tests/java/svcardtest/jc/GpEchoApplet.java``, compiled against that jar. The real-jar tests
skip with a reason when ``JCARDSIM_JAR`` names no jar (jCardSim b6218da also needs BouncyCastle
on ``JCARDSIM_CLASSPATH``; CI sets both). Each scenario runs in its own Python process: a JVM
starts once per process, with one class path.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from svcard.host.terminal.reader_specs import ReaderSpecError, open_reader, read_apdu_script
from svcard.reader.jcardsim import JCardSimError, JCardSimReader, gp_install_data

JAVA_SRC = Path(__file__).parent / "java" / "svcardtest"
SVCARD = Path(sys.executable).parent / "svcard"
AID = "F00102030405"
SECRET = "11223344556677889900AABBCCDDEEFF"   # stands for key bytes in a personalisation APDU
REAL_JAR = os.environ.get("JCARDSIM_JAR", "")
needs_real_jar = pytest.mark.skipif(
    not REAL_JAR.endswith(".jar"),
    reason="set JCARDSIM_JAR to a real jCardSim jar (and JCARDSIM_CLASSPATH to BouncyCastle's "
           "bcprov.jar for b6218da) to run the real-jCardSim tests")


def need_java() -> None:
    try:
        import jpype  # noqa: F401
    except ImportError:
        pytest.skip("JPype is not installed")
    if shutil.which("javac") is None:
        pytest.skip("javac is not installed")


@pytest.fixture(scope="module")
def standin_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_java()
    out = tmp_path_factory.mktemp("classes")
    subprocess.run(["javac", "-d", str(out), *map(str, sorted(JAVA_SRC.glob("*.java")))],
                   check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def real_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a process running GpEchoApplet in the real jar."""
    need_java()
    out = tmp_path_factory.mktemp("jc-classes")
    subprocess.run(["javac", "-nowarn", "-cp", REAL_JAR, "-d", str(out),
                    *map(str, sorted((JAVA_SRC / "jc").glob("*.java")))],
                   check=True, capture_output=True, timeout=120)
    extra = os.environ.get("JCARDSIM_CLASSPATH", "")
    return {"JCARDSIM_JAR": REAL_JAR, "JCARDSIM_SIMULATOR": "", "JCARDSIM_AIDUTIL": "",
            "JCARDSIM_CLASSPATH": os.pathsep.join(p for p in (extra, str(out)) if p)}


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


def run_svcard(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SVCARD), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def standin_env(classes: Path) -> dict[str, str]:
    return {"JCARDSIM_JAR": str(classes), "JCARDSIM_CLASSPATH": "",
            "JCARDSIM_SIMULATOR": "svcardtest.SimulatorStandIn",
            "JCARDSIM_AIDUTIL": "svcardtest.AIDUtilStandIn"}


STANDIN_APPLET = "svcardtest.AppletStandIn"
REAL_APPLET = "svcardtest.jc.GpEchoApplet"

# GP install, personalisation, reset; the applet answers INS 10 (its parameters), INS 12 (the
# whole install data), INS 14 (bOffset, array length), INS 20 (store, P1 00 only, else 6A86),
# INS 22 (the stored data)
GP_SCENARIO = f"""
    from svcard.reader import ReaderError
    from svcard.reader.jcardsim import JCardSimError, JCardSimReader
    aid = bytes.fromhex("{AID}")
    select = bytes.fromhex("00A4040006") + aid
    secret = bytes.fromhex("{SECRET}")
    reader = JCardSimReader(APPLET, aid, install_params=bytes.fromhex("C0FFEE"),
                            personalise=[select, bytes.fromhex("8020000010") + secret])
    reader.connect()
    # the simulator was reset after the personalisation: nothing is selected
    assert reader.transmit(bytes.fromhex("80220000"))[-2:] != bytes.fromhex("9000")
    assert reader.transmit(select) == bytes.fromhex("9000")
    # install() saw exactly len | AID | len | privileges | len | parameters
    assert reader.transmit(bytes.fromhex("80120000")) == bytes.fromhex(
        "06{AID}" "0100" "03C0FFEE" "9000")
    # ... at offset 5 of a 261-byte array, as inside a card's APDU buffer
    assert reader.transmit(bytes.fromhex("80140000")) == bytes.fromhex("000501059000")
    assert reader.transmit(bytes.fromhex("80100000")) == bytes.fromhex("C0FFEE9000")
    assert reader.transmit(bytes.fromhex("80220000")) == secret + bytes.fromhex("9000")
    reader.disconnect()
    # no parameters, no personalisation: an empty parameter field
    plain = JCardSimReader(APPLET, aid)
    plain.connect()
    assert plain.transmit(select) == bytes.fromhex("9000")
    assert plain.transmit(bytes.fromhex("80120000")) == bytes.fromhex("06{AID}010000" "9000")
    # a personalisation APDU that does not answer 9000: its index, header and status word
    bad = JCardSimReader(APPLET, aid, personalise=[select, select,
                                                   bytes.fromhex("8020010010") + secret])
    try:
        bad.connect()
    except JCardSimError as exc:
        message = str(exc)
    else:
        raise AssertionError("a failing personalisation APDU must stop the connect")
    assert "personalisation APDU [2] (3 of 3, header 80200100)" in message, message
    assert "answered 6A86" in message, message
    assert "{SECRET}" not in message.upper() and "1122334455" not in message, message
    try:
        bad.transmit(select)
    except ReaderError as exc:
        assert "not connected" in str(exc)
    else:
        raise AssertionError("a reader whose personalisation failed is not connected")
    print("ok")
"""


def test_gp_applet_with_the_standin(standin_classes: Path) -> None:
    result = run_python(f"APPLET = {STANDIN_APPLET!r}\n" + textwrap.dedent(GP_SCENARIO),
                        standin_env(standin_classes))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@needs_real_jar
def test_gp_applet_with_the_real_jcardsim(real_env: dict[str, str]) -> None:
    result = run_python(f"APPLET = {REAL_APPLET!r}\n" + textwrap.dedent(GP_SCENARIO), real_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@needs_real_jar
def test_real_jcardsim_installs_a_gp_applet_from_the_cli(real_env: dict[str, str]) -> None:
    """Issue 11's finding 1: the plain spec, no parameters, an applet that reads its AID from
    the install data (before: exit 10, SystemException at install)."""
    result = run_svcard("apdu", "--reader", f"jcardsim:{REAL_APPLET}:{AID}",
                        f"00A4040006{AID}", "80120000", env=real_env)
    assert result.returncode == 0, result.stderr
    assert f"06{AID}010000" in result.stdout


def test_bridge_with_the_standin(standin_classes: Path) -> None:
    result = run_python("""
        import threading
        from svcard.reader.jcardsim import JCardSimError, JCardSimReader
        reader = JCardSimReader("svcardtest.AppletStandIn", bytes.fromhex("F001020304"))
        assert reader.connect() == bytes.fromhex("3B00")
        assert reader.transmit(bytes.fromhex("00A4040005F00102030400")) == b"\\x90\\x00"
        assert reader.transmit(bytes.fromhex("00A4040002AAAA")) == b"\\x6a\\x82"
        assert reader.transmit(bytes.fromhex("00A4040005F001020304")) == b"\\x90\\x00"
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
        other = JCardSimReader("svcardtest.AppletStandIn", bytes.fromhex("F001020305"))
        other.connect()
        assert other.transmit(bytes.fromhex("00A4040005F001020305")) == b"\\x90\\x00"
        print("ok")
    """, standin_env(standin_classes))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cli_with_the_standin(standin_classes: Path) -> None:
    spec = f"jcardsim:{STANDIN_APPLET}:{AID}"
    env = standin_env(standin_classes)
    result = run_svcard("apdu", "--reader", spec, f"00A4040006{AID}", "80CA0000", env=env)
    assert result.returncode == 0, result.stderr
    assert "Received (9000, success)" in result.stdout
    assert "6D00, instruction not supported" in result.stdout
    result = run_svcard("apdu", "--reader", spec, f"00A4040006{AID}", "80EE0000", env=env)
    assert result.returncode == 10 and "stand-in failure" in result.stderr


def write_script(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def personalisation_cli(tmp_path: Path, env: dict[str, str], applet: str) -> None:
    """Parameters and a script on the command line, end to end; then a failing script."""
    script = write_script(tmp_path / "perso.apdu", "# select, then store a key",
                          f"00 A4 04 00 06 {AID}", "", f"80200000 10 {SECRET}  # the key")
    spec = f"jcardsim:{applet}:{AID}:C0FFEE@{script}"
    result = run_svcard("apdu", "--reader", spec, f"00A4040006{AID}", "80100000", "80220000",
                        env=env)
    assert result.returncode == 0, result.stderr
    assert "C0FFEE\n" in result.stdout and f"{SECRET}\n" in result.stdout, result.stdout
    failing = write_script(tmp_path / "failing.apdu", f"00A4040006{AID}",
                           f"80200100 10 {SECRET}")
    result = run_svcard("apdu", "--reader", f"jcardsim:{applet}:{AID}:C0FFEE@{failing}",
                        f"00A4040006{AID}", env=env)
    assert result.returncode == 10, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "personalisation APDU [1] (2 of 2, header 80200100) answered 6A86" in lines[0]
    assert SECRET not in result.stderr and "C0FFEE" not in result.stderr
    # the same through a purse command's --card
    result = run_svcard("terminal", "balance", "--card",
                        f"jcardsim:{applet}:{AID}:C0FFEE@{failing}", "--aid", AID, env=env)
    assert result.returncode == 10, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "(2 of 2, header 80200100) answered 6A86" in result.stderr
    assert SECRET not in result.stderr and "C0FFEE" not in result.stderr


def test_personalisation_script_from_the_cli_with_the_standin(
        standin_classes: Path, tmp_path: Path) -> None:
    personalisation_cli(tmp_path, standin_env(standin_classes), STANDIN_APPLET)


@needs_real_jar
def test_personalisation_script_from_the_cli_with_the_real_jcardsim(
        real_env: dict[str, str], tmp_path: Path) -> None:
    personalisation_cli(tmp_path, real_env, REAL_APPLET)


def test_bad_specs_and_scripts_exit_3_naming_file_and_line(tmp_path: Path) -> None:
    broken = write_script(tmp_path / "broken.apdu", "# fine", f"00A4040006{AID}",
                          f"80200000 11 {SECRET}")
    cases = {
        f"jcardsim:X:{AID}@{broken}": f"{broken}:3: not a command APDU: Lc=17",
        f"jcardsim:X:{AID}@{tmp_path / 'missing.apdu'}": "missing.apdu: cannot read",
        f"jcardsim:X:{AID}:C0FFEE@": "no script file after '@'",
        f"jcardsim:X:{AID}:C0FFE": "PARAMS_HEX must be hex digits",
        "jcardsim:X:F0010G": "AID must be hex digits",
        f"jcardsim:X:{AID}:00:11": "expected jcardsim:APPLET_CLASS:AID[:PARAMS_HEX][@SCRIPT]",
        "jcardsim:X:F0010203": "an applet AID has 5 to 16 bytes, got 4",
    }
    for spec, expected in cases.items():
        result = run_svcard("apdu", "--reader", spec, "00A4040000", env={})
        assert result.returncode == 3, (spec, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert expected in result.stderr, (spec, result.stderr)
        assert SECRET not in result.stderr


def test_script_syntax(tmp_path: Path) -> None:
    script = write_script(tmp_path / "s.apdu", "  # comment only", "",
                          "00:A4:04:00 # colons and spaces", "\t80 20 00 00 02 AB CD\t")
    assert read_apdu_script(script) == [bytes.fromhex("00A40400"),
                                        bytes.fromhex("8020000002ABCD")]
    reader = open_reader(f"jcardsim:a.B$C:{AID}:0102@{script}")
    assert isinstance(reader, JCardSimReader)
    assert reader.applet_class == "a.B$C" and reader.aid == bytes.fromhex(AID)
    assert "install data 12 bytes, 2 personalisation APDUs" in repr(reader)
    errors = {
        ("", "# nothing"): "holds no APDU",
        ("00A4 0400", "00A4X400"): ":2: not an APDU in hex",
        ("00A", ): ":1: not an APDU in hex",
        ("00A404", ): ":1: not a command APDU: a command APDU has at least 4 bytes, got 3",
    }
    for lines, expected in errors.items():
        path = write_script(tmp_path / "bad.apdu", *lines)
        with pytest.raises(ReaderSpecError, match=re.escape(expected)) as info:
            read_apdu_script(path)
        assert str(path) in str(info.value)
    (tmp_path / "binary.apdu").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ReaderSpecError, match=r"binary\.apdu: cannot read"):
        read_apdu_script(tmp_path / "binary.apdu")


def test_install_data_and_bad_arguments() -> None:
    aid = bytes.fromhex(AID)
    assert gp_install_data(aid, b"\xc0") == bytes.fromhex(f"06{AID}010001C0")
    assert gp_install_data(aid) == bytes.fromhex(f"06{AID}010000")
    with pytest.raises(JCardSimError, match="5 to 16 bytes, got 17"):
        JCardSimReader("x.Y", bytes(17))
    gp_install_data(aid, bytes(127 - 10))
    with pytest.raises(JCardSimError, match="install data of 128 bytes"):
        JCardSimReader("x.Y", aid, install_params=bytes(118))
    key = bytes.fromhex(SECRET)
    with pytest.raises(JCardSimError) as info:
        JCardSimReader("x.Y", aid, personalise=[b"\x00\xa4\x04\x00", b"\x80\x20\x00\x00\x20" + key])
    assert "personalisation APDU 1 (80200000) is malformed" in str(info.value)
    assert SECRET not in str(info.value).upper()
    reader = JCardSimReader("x.Y", aid, install_params=key, personalise=[b"\x80\x20\x00\x00\x10"
                                                                         + key])
    assert SECRET not in repr(reader).upper() and SECRET not in reader.name.upper()


def test_clear_errors_without_jar_or_class(standin_classes: Path) -> None:
    no_jar = run_python(f"""
        from svcard.reader.jcardsim import JCardSimError, JCardSimReader
        try:
            JCardSimReader("x.Y", bytes.fromhex("{AID}")).connect()
        except JCardSimError as exc:
            print(exc)
    """, {"JCARDSIM_JAR": "", "JCARDSIM_CLASSPATH": ""})
    assert "set JCARDSIM_JAR" in no_jar.stdout, no_jar.stderr
    missing = run_python(f"""
        from svcard.reader.jcardsim import JCardSimError, JCardSimReader
        try:
            JCardSimReader("svcardtest.NoSuchApplet", bytes.fromhex("{AID}")).connect()
        except JCardSimError as exc:
            print("error:", exc)
    """, standin_env(standin_classes))
    assert "error:" in missing.stdout and "NoSuchApplet" in missing.stdout, missing.stderr


@needs_real_jar
def test_real_jcardsim_names_a_failed_install(real_env: dict[str, str]) -> None:
    """An applet whose install() fails: jCardSim's reason code, read out."""
    result = run_python(f"""
        from svcard.reader.jcardsim import JCardSimError, JCardSimReader
        try:
            JCardSimReader("java.lang.String", bytes.fromhex("{AID}")).connect()
        except JCardSimError as exc:
            print(exc)
    """, real_env)
    assert "installing java.lang.String: javacard.framework.SystemException (reason 0001, " \
           "ILLEGAL_VALUE)" in result.stdout, result.stderr


@needs_real_jar
def test_real_jcardsim_hello_world() -> None:
    """jCardSim's own sample applet, through the real jar (it ignores its install data)."""
    aid = "01020304050607080901"
    spec = f"jcardsim:com.licel.jcardsim.samples.HelloWorldApplet:{aid}"
    result = run_svcard("apdu", "--reader", spec, f"00A404000A{aid}", "0001000000",
                        env={"JCARDSIM_SIMULATOR": "", "JCARDSIM_AIDUTIL": ""})
    assert result.returncode == 0, result.stderr
    assert "Received (9000, success)" in result.stdout


def test_a_printed_jcardsim_spec_never_shows_its_params() -> None:
    from svcard.host.terminal.reader_specs import shown_spec
    spec = "jcardsim:a.B:F00102030405:00112233445566778899AABBCCDDEEFF@perso.apdu"
    assert shown_spec(spec) == "jcardsim:a.B:F00102030405:...@perso.apdu"
    assert "0011223344" not in shown_spec(spec)
    assert shown_spec("virtual:card.json") == "virtual:card.json"
