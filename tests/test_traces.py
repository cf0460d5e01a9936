"""Trace recording and replay, ``trace show``, and the importers of other tools' logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import demo_image, with_balance

from svcard.card.image import save_new_image
from svcard.host.cli.main import main
from svcard.reader.trace import (
    Exchange,
    Trace,
    TraceError,
    TraceMismatchError,
    TraceReader,
    load_trace,
)
from svcard.reader.trace_export import export_trace
from svcard.reader.trace_import import import_file

DATA = Path(__file__).parent / "data" / "traces"
ATR = bytes.fromhex("3B888001535643415244303119")
# what the fixed-random demo card answered, as written into every sample file
EXPECTED = [
    ("00A4040009F0535643415244010100",
     "6F458409F05356434152440101A538500C5356434152442045442F45505F2A0201565F3601029F0C1E"
     "100000000000000103010000000000000000000120260101203112310000" "9000"),
    ("805C000204", "000027109000"),
    ("00B0990000", "6A82"),
    ("805001020B01000000641122334455660F", "00002710000000000001000A0B0C0D9000"),
    ("00B201C417", "6A83"),
]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def cards(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for kind in ("iep", "psam"):
        image = demo_image(kind)
        if kind == "iep":
            with_balance(image, 10_000)
            image["app"]["fixed_random"] = "0A0B0C0D"
        out[kind] = tmp_path / f"{kind}.json"
        save_new_image(out[kind], image)
    return out


def purchase(card: str, psam: str, *extra: str) -> tuple[int, str]:
    return run("terminal", "purchase", "--card", card, "--psam", psam, "--amount", "250u",
               "--at", "2027-03-14T15:09:26", "--json", *extra)


def test_record_then_replay_gives_the_same_purchase(tmp_path: Path) -> None:
    c = cards(tmp_path)
    out = tmp_path / "buy.jsonl"
    code, text = purchase(f"virtual:{c['iep']}", f"virtual:{c['psam']}", "--trace-out", str(out))
    assert code == 0
    recorded = json.loads(text)
    psam_trace = tmp_path / "buy.psam.jsonl"
    assert out.exists() and psam_trace.exists()
    trace = load_trace(out)
    assert trace.atr == ATR and trace.reader == f"virtual:{c['iep']}"
    assert len(trace.exchanges) == 4 and all(e.ms is not None for e in trace.exchanges)
    # replay both slots from their traces: byte-identical answers, so the same receipt
    code, text = purchase(f"trace:{out}", f"trace:{psam_trace}")
    assert code == 0, text
    assert json.loads(text) == recorded


def test_replay_reports_the_first_differing_command(tmp_path: Path) -> None:
    c = cards(tmp_path)
    out = tmp_path / "buy.jsonl"
    assert purchase(f"virtual:{c['iep']}", f"virtual:{c['psam']}", "--trace-out", str(out))[0] == 0
    code, text = run("terminal", "purchase", "--card", f"trace:{out}", "--psam",
                     f"trace:{tmp_path / 'buy.psam.jsonl'}", "--amount", "251u",
                     "--at", "2027-03-14T15:09:26")
    assert code == 9
    assert "trace mismatch at command #2: expected 805001020B01000000FA" in text
    assert "got 805001020B01000000FB" in text


def test_trace_reader_exhaustion_and_mismatch_fields(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    assert run("trace", "import", "--from", "cardpeek", str(DATA / "cardpeek.clf"),
               str(out))[0] == 0
    reader = TraceReader(out)
    assert reader.connect() == ATR
    for command, response in EXPECTED:
        assert reader.transmit(bytes.fromhex(command)) == bytes.fromhex(response)
    with pytest.raises(TraceMismatchError) as err:
        reader.transmit(b"\x00\xa4\x04\x00")
    assert err.value.index == 5 and err.value.expected is None
    reader.connect()
    with pytest.raises(TraceMismatchError) as err:
        reader.transmit(bytes.fromhex("805C000104"))
    assert (err.value.index, err.value.expected) == (0, bytes.fromhex(EXPECTED[0][0]))


@pytest.mark.parametrize(("fmt", "name"), [
    ("pcsc-spy", "pcsc-spy.txt"), ("pcsc-spy", "pcsc-spy-colour.txt"), ("gp", "gp.log"),
    ("apdu4j", "apdu4j.dump"), ("cardpeek", "cardpeek.clf"),
])
def test_importers_recover_every_exchange(fmt: str, name: str) -> None:
    trace = import_file(fmt, DATA / name)
    assert [(e.command.hex().upper(), e.response.hex().upper()) for e in trace.exchanges] \
        == EXPECTED
    assert trace.atr == ATR
    assert trace.source == f"imported from {fmt}"


def test_importer_details() -> None:
    spy = import_file("pcsc-spy", DATA / "pcsc-spy.txt")
    assert spy.reader == "Virtual PCD 00 00"  # from SCardConnect
    assert spy.exchanges[0].ms == pytest.approx(0.300)  # the [0.000300] of the result line
    gp = import_file("gp", DATA / "gp.log")  # CRLF, log prefixes, bare and annotated forms
    assert gp.exchanges[0].ms == 12 and gp.exchanges[2].ms is None
    clf = import_file("cardpeek", DATA / "cardpeek.clf")
    assert clf.resets == [(4, ATR)]  # the warm reset before the last command
    dump = import_file("apdu4j", DATA / "apdu4j.dump")  # lower-case hex lines too
    assert dump.reader == "Virtual PCD 00 00"


@pytest.mark.parametrize(("fmt", "text", "message"), [
    ("gp", "A>> 00A40400\nA>> 00B00000\n", "without an answer"),
    ("gp", "A<< 9000\n", "answer without a command"),
    ("gp", "A>> 00A4040Z\nA<< 9000\n", "not hex"),
    ("gp", "A>> 00A40400\n", "has no answer"),
    ("apdu4j", "# ATR: 3B00\n00A40400\n9000\n00B00000\n", "has no response"),
    ("apdu4j", "# ATR: 3B00\n00A40400\n90\n", "shorter than a status word"),
    ("cardpeek", "C:00A40400:90:\n", "not 4 hex digits"),
    ("cardpeek", "C:00A40400:9000\n", "expected C:COMMAND:SW:DATA"),
    ("cardpeek", "X:whatever\n", "neither a comment"),
    ("cardpeek", "# nothing\n", "no C: lines"),
    ("pcsc-spy", "SCardTransmit\n i bSendBuffer\n i  0000 00 A4 04 00\n o bRecvBuffer\n"
                 " o  0010 90 00\n => ok [0x00000000]\n", "offset 0010, expected 0000"),
    ("pcsc-spy", "SCardTransmit\n i bSendBuffer\n i  0000 00 A4 04 00\n"
                 " => ok [0x00000000]\n", "without both buffers"),
    ("pcsc-spy", "SCardEstablishContext\n => ok [0x00000000]\n", "no successful"),
])
def test_importers_refuse_broken_input_with_the_line(tmp_path: Path, fmt: str, text: str,
                                                      message: str) -> None:
    path = tmp_path / "in.txt"
    path.write_text(text)
    with pytest.raises(TraceError, match=message):
        import_file(fmt, path)


def test_trace_show_decodes(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    assert run("trace", "import", "--from", "apdu4j", str(DATA / "apdu4j.dump"), str(out))[0] == 0
    code, text = run("trace", "show", str(out))
    assert code == 0
    assert "#0 SELECT" in text and "label=SVCARD ED/EP" in text
    assert "#1 GET BALANCE" in text and "balance=10000" in text
    assert "6A82 file or application not found" in text
    assert "INITIALIZE FOR PURCHASE" in text and "amount=100" in text
    assert "random=0A0B0C0D" in text
    code, text = run("trace", "show", str(out), "--json")
    data = json.loads(text)
    assert [e["name"] for e in data["exchanges"]][:2] == ["SELECT", "GET BALANCE"]
    assert data["exchanges"][4]["meaning"] == "record not found"


def test_trace_show_decodes_a_recorded_purchase_with_log(tmp_path: Path) -> None:
    c = cards(tmp_path)
    assert purchase(f"virtual:{c['iep']}", f"virtual:{c['psam']}")[0] == 0
    out = tmp_path / "log.jsonl"
    assert run("terminal", "log", "--card", f"virtual:{c['iep']}", "--trace-out", str(out))[0] == 0
    code, text = run("trace", "show", str(out))
    assert code == 0 and "log: EP purchase amount=250 counter=0" in text
    psam_out = tmp_path / "p.jsonl"
    assert purchase(f"virtual:{c['iep']}", f"virtual:{c['psam']}", "--trace-out",
                    str(psam_out))[0] == 0
    code, text = run("trace", "show", str(tmp_path / "p.psam.jsonl"))
    assert "INIT SAM FOR PURCHASE" in text and "CREDIT SAM FOR PURCHASE" in text
    assert "terminal_txn_number=2" in text


def test_bad_trace_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    for content, message in (("", "empty trace"), ("{}", "not an svcard trace"),
                             ('{"format": "svcard-trace", "version": 2}', "version 2"),
                             ('{"format": "svcard-trace", "version": 1, "atr": "3B"}\n'
                              '{"command": "00A4"}', "needs 'command' and 'response'"),
                             ("nope", "not JSON")):
        bad.write_text(content)
        with pytest.raises(TraceError, match=message):
            load_trace(bad)
    code, text = run("apdu", "--reader", f"trace:{bad}", "00A40400")
    assert code == 3 and "not JSON" in text


# --- export: the formats that are imported, read back the same (issue 10, point 8) ----------
EXPORTS = ["gp", "apdu4j", "cardpeek", "pcsc-spy"]


def pairs(trace: Trace) -> list[tuple[str, str]]:
    return [(e.command.hex().upper(), e.response.hex().upper()) for e in trace.exchanges]


@pytest.mark.parametrize("fmt", EXPORTS)
def test_export_then_import_replays_the_same_purchase(tmp_path: Path, fmt: str) -> None:
    c = cards(tmp_path)
    out = tmp_path / "buy.jsonl"
    code, text = purchase(f"virtual:{c['iep']}", f"virtual:{c['psam']}", "--trace-out", str(out))
    assert code == 0
    recorded = json.loads(text)
    replay = {}
    for name in ("buy", "buy.psam"):
        code, exported = run("trace", "export", str(tmp_path / f"{name}.jsonl"), "--format", fmt)
        assert code == 0, exported
        (tmp_path / f"{name}.{fmt}").write_text(exported)
        replay[name] = tmp_path / f"{name}.back.jsonl"
        assert run("trace", "import", "--from", fmt, str(tmp_path / f"{name}.{fmt}"),
                   str(replay[name]))[0] == 0
        assert pairs(load_trace(replay[name])) == pairs(load_trace(tmp_path / f"{name}.jsonl"))
        assert load_trace(replay[name]).atr == load_trace(tmp_path / f"{name}.jsonl").atr
    # the imported exports replay byte for byte: the same receipt
    code, text = purchase(f"trace:{replay['buy']}", f"trace:{replay['buy.psam']}")
    assert code == 0, text
    assert json.loads(text) == recorded


@pytest.mark.parametrize("fmt", EXPORTS)
def test_export_keeps_every_kind_of_command(tmp_path: Path, fmt: str) -> None:
    trace = Trace(reader="Virtual PCD 00 00", atr=ATR, source="recorded", exchanges=[
        Exchange(bytes.fromhex(cmd), bytes.fromhex(resp), t, ms) for cmd, resp, t, ms in [
            ("00A40400", "9000", 0.0, 1.2),                                # case 1
            ("805C000204", "000027109000", 0.01, 2.0),                     # case 2
            ("80CA000003AABBCC", "6A88", None, None),                      # case 3
            ("80CA0000000003AABBCC0100", "00" * 256 + "9000", None, 1500.4),  # extended 4
            ("80CA000000", "6C08", None, None),                            # case 2, Le 256
            ("80CA00000004", "6700", None, None),          # fits no ISO 7816-4 case at all
        ]], resets=[(2, ATR)])
    path = tmp_path / "all.jsonl"
    trace.save(path)
    code, text = run("trace", "export", str(path), "--format", fmt, "--out",
                     str(tmp_path / "all.out"))
    assert code == 0 and "wrote" in text
    back = import_file(fmt, tmp_path / "all.out")
    assert pairs(back) == pairs(trace) and back.atr == ATR
    if fmt == "cardpeek":
        assert back.resets == [(2, ATR)]  # the only format with a reset line
    if fmt == "gp":  # whole milliseconds
        assert [e.ms for e in back.exchanges] == [1, 2, None, 1500, None, None]
    if fmt == "pcsc-spy":
        assert back.reader == "Virtual PCD 00 00"
        assert [e.ms for e in back.exchanges][:2] == [pytest.approx(1.2), pytest.approx(2.0)]


def test_gp_export_looks_like_apdu4j(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    assert run("trace", "import", "--from", "gp", str(DATA / "gp.log"), str(out))[0] == 0
    code, text = run("trace", "export", str(out), "--format", "gp")
    assert code == 0
    lines = text.splitlines()
    assert lines[0] == f"# ATR: {ATR.hex().upper()}"
    assert "A>> (4+0009) 00A40400 09 F05356434152440101 00" in lines
    assert "A<< (0004+2) (1ms) 00002710 9000" in lines
    assert "A<< (0000+2) 6A82" in lines
    assert import_file("gp", DATA / "gp.log").exchanges[0].ms == 12


def test_gp_import_reads_seconds_and_export_refuses_bad_input(tmp_path: Path) -> None:
    log = tmp_path / "slow.log"
    log.write_text("A>> T=1 (4+0000) 805C0002 04\nA<< (0004+2) (2s15ms) 00002710 9000\n")
    assert import_file("gp", log).exchanges[0].ms == 2015
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope")
    code, text = run("trace", "export", str(bad), "--format", "gp")
    assert code == 3 and "not JSON" in text
    code, text = run("trace", "export", str(tmp_path / "missing.jsonl"), "--format", "gp")
    assert code == 2 and not (tmp_path / "missing.jsonl").exists()
    with pytest.raises(TraceError, match="unknown export format"):
        export_trace(Trace("r", ATR), "nope")


def test_a_recorded_pin_never_reaches_the_trace_and_the_trace_still_replays(
        tmp_path: Path) -> None:
    c = cards(tmp_path)
    out = tmp_path / "ed.jsonl"
    code, text = run("terminal", "balance", "--card", f"virtual:{c['iep']}", "--purse", "ed",
                     "--pin", "123456", "--json", "--trace-out", str(out))
    assert code == 0, text
    raw = out.read_text()
    assert "123456" not in raw  # the PIN's BCD digits
    verify = [e for e in load_trace(out).exchanges if e.command[1] == 0x20]
    assert len(verify) == 1 and verify[0].redacted
    assert verify[0].command == bytes.fromhex("0020000003FFFFFF")
    # replay matches the VERIFY on its header and size, so the recorded session replays
    code, replayed = run("terminal", "balance", "--card", f"trace:{out}", "--purse", "ed",
                         "--pin", "123456", "--json")
    assert code == 0, replayed
    assert json.loads(replayed) == json.loads(text)
    # a PIN of another length is another command
    code, text = run("terminal", "balance", "--card", f"trace:{out}", "--purse", "ed",
                     "--pin", "1234", "--json")
    assert code == 9 and "got 0020000002FFFF" in text and "1234" not in text


def test_a_redacted_flag_that_is_not_a_boolean_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"format": "svcard-trace", "version": 1, "atr": "3B00"}) + "\n"
                    + json.dumps({"command": "0020000001FF", "response": "9000",
                                  "redacted": "yes"}) + "\n")
    with pytest.raises(TraceError, match=r"t.jsonl:2: 'redacted' is true or false"):
        load_trace(path)
