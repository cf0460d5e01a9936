"""The ``svcard`` command line.

Exit codes: 0 done; 1 the transaction was refused (a chip's status word or a terminal check);
2 usage error; 3 a reader, card image, trace or profile could not be used; 4 no PC/SC service;
5 no such reader; 6 no card in the reader; 7 card removed mid-transaction; 8 sharing violation;
9 a replayed trace differs; 10 jCardSim failed.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from ...card.image import save_new_image
from ...card.personalise import ProfileError, image_from_profile
from ...card.storage import ImageError, read_image
from ...protocols import sw as SW
from ...protocols.apdu import APDUFormatError, parse_command, parse_response
from ...reader import Reader, ReaderError
from ...reader.trace import RecordingReader
from ..terminal import purse as T
from ..terminal.reader_specs import open_reader
from .describe import describe_image, render_image

EXIT_OK = 0
EXIT_DECLINED = 1
EXIT_USAGE = 2
EXIT_DEVICE = 3

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"svcard: {message}", err=True)
    sys.exit(code)


@contextmanager
def handled() -> Iterator[None]:
    """Turn our errors into a one-line message and a meaningful exit code."""
    try:
        yield
    except T.TerminalError as exc:
        fail(str(exc), EXIT_DECLINED)
    except ReaderError as exc:
        fail(str(exc), exc.exit_code)
    except (ImageError, ProfileError) as exc:
        fail(str(exc), EXIT_DEVICE)


def emit(as_json: bool, data: Any, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the result as JSON (for scripts).")(f)


def trace_paths(base: Path, slots: list[str]) -> list[Path]:
    """One trace file per reader: ``base`` itself for the first, ``NAME.SLOT.EXT`` for others."""
    return [base if i == 0 else base.with_name(f"{base.stem}.{slot}{base.suffix or '.jsonl'}")
            for i, slot in enumerate(slots)]


@contextmanager
def readers(*specs: tuple[str, str], trace_out: Path | None = None) -> Iterator[list[Reader]]:
    """Open and connect ``(slot, spec)`` readers; record each to a trace if asked."""
    with ExitStack() as stack:
        opened: list[Reader] = []
        paths = trace_paths(trace_out, [slot for slot, _ in specs]) if trace_out else []
        for i, (_slot, spec) in enumerate(specs):
            reader = open_reader(spec)
            if trace_out:
                reader = RecordingReader(reader, paths[i])
            stack.enter_context(reader)
            opened.append(reader)
        yield opened


def trace_option(f: F) -> F:
    return click.option(
        "--trace-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help="Record every APDU to this JSON Lines trace (with two readers, the second "
             "goes to NAME.psam.jsonl or NAME.hsm.jsonl).")(f)


def at_option(f: F) -> F:
    return click.option(
        "--at", "at", type=click.DateTime(["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]),
        default=None, help="Transaction date and time (default: now); fixed values make "
                           "traces reproducible.")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="svcard")
def main() -> None:
    """svcard: an emulated PBOC ED/EP purse card, PSAM and load HSM, and host software
    that pays with them and loads them.

    Cards live in JSON card images; a reader spec names where a card is:
    virtual:IMAGE.json opens an image in this process.

    \b
    Quick tour:
      svcard demo                                   a load and a purchase, end to end
      svcard card new fixtures/iep-demo.toml --out card.json
      svcard terminal balance --card virtual:card.json
    """


# --- svcard card ---------------------------------------------------------------------------
@main.group()
def card() -> None:
    """Make and inspect card images (IEP purse, PSAM, load HSM)."""


@card.command("new")
@click.argument("profile", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the card image (JSON).")
@click.option("--force", is_flag=True, help="Replace an existing image.")
def card_new(profile: Path, out: Path, force: bool) -> None:
    """Personalise a card from a TOML PROFILE (see docs/profiles.md)."""
    with handled():
        image = image_from_profile(profile)
        save_new_image(out, image, overwrite=force)
    click.echo(f"wrote {image['kind']} card image {out}")


@card.command("show")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
def card_show(image: Path, as_json: bool) -> None:
    """Print what a card image holds: balances, counters, the decoded log (never keys)."""
    with handled():
        raw = read_image(image)
        try:
            data = describe_image(raw)
        except (KeyError, ValueError, TypeError) as exc:
            raise ImageError(f"{image}: damaged card image ({exc!r})") from None
    emit(as_json, data, render_image(data))


# --- svcard terminal -----------------------------------------------------------------------
@main.group()
def terminal() -> None:
    """A local terminal (seed FIG. 2): a card slot plus a PSAM or load HSM slot."""


card_option = click.option("--card", "card_spec", required=True, metavar="SPEC",
                           help="Reader spec of the purse card, e.g. virtual:card.json.")
purse_option = click.option("--purse", type=click.Choice(["ep", "ed"], case_sensitive=False),
                            default="ep", show_default=True,
                            help="EP purse, or the PIN-protected ED passbook.")
pin_option = click.option("--pin", default=None, help="Cardholder PIN (ED passbook only).")
amount_option = click.option("--amount", required=True, type=click.IntRange(0, 0xFFFFFFFF),
                             help="Amount in integer minor units (1234 = 12.34 at exponent 2).")


@terminal.command("balance")
@card_option
@purse_option
@pin_option
@json_option
@trace_option
def terminal_balance(card_spec: str, purse: str, pin: str | None, as_json: bool,
                     trace_out: Path | None) -> None:
    """Read a purse's balance (GET BALANCE)."""
    with handled(), readers(("card", card_spec), trace_out=trace_out) as (card_r,):
        info, balance = T.read_balance(card_r, T.purse_id(purse), pin)
    emit(as_json, {"card_serial": info.app_serial, "purse": purse.upper(), "balance": balance,
                   "currency_code": info.currency_code,
                   "currency_exponent": info.currency_exponent},
         f"{purse.upper()} balance: {T.format_amount(balance, info.currency_exponent)} "
         f"(currency {info.currency_code}, card {info.app_serial})")


@terminal.command("log")
@card_option
@json_option
@trace_option
def terminal_log(card_spec: str, as_json: bool, trace_out: Path | None) -> None:
    """Read the transaction log (READ RECORD, newest first)."""
    with handled(), readers(("card", card_spec), trace_out=trace_out) as (card_r,):
        entries = T.read_log(card_r)
    lines = [f"{e.date} {e.time}  {e.type_name:<20} {e.amount:>10}  counter {e.counter:<5} "
             f"terminal {e.terminal_id}" for e in entries] or ["(empty log)"]
    emit(as_json, [e.__dict__ for e in entries], "\n".join(lines))


@terminal.command("purchase")
@card_option
@click.option("--psam", "psam_spec", required=True, metavar="SPEC",
              help="Reader spec of the PSAM, e.g. virtual:psam.json.")
@amount_option
@purse_option
@pin_option
@click.option("--key-index", default=1, show_default=True, type=click.IntRange(0, 255))
@click.option("--issuer-factor", is_flag=True,
              help="Use the 24-byte INIT SAM form (issuer id as a second diversification).")
@json_option
@trace_option
@at_option
def terminal_purchase(card_spec: str, psam_spec: str, amount: int, purse: str,
                      pin: str | None, key_index: int, issuer_factor: bool,
                      as_json: bool, trace_out: Path | None, at: dt.datetime | None) -> None:
    """Pay AMOUNT from the card: card <-> PSAM, MAC1/MAC2/TAC, the PSAM records it."""
    with handled(), readers(("card", card_spec), ("psam", psam_spec),
                            trace_out=trace_out) as (card_r, psam_r):
        r = T.purchase(card_r, psam_r, amount, purse=T.purse_id(purse), key_index=key_index,
                       pin=pin, issuer_factor=issuer_factor, when=at)
    exp = r.currency_exponent
    emit(as_json, r.to_json(),
         f"purchase of {T.format_amount(r.amount, exp)} approved\n"
         f"  balance {T.format_amount(r.balance_before, exp)} -> "
         f"{T.format_amount(r.balance_after, exp)}\n"
         f"  terminal {r.terminal_id} txn {r.terminal_txn_number}, card counter "
         f"{r.offline_counter}\n  MAC1 {r.mac1}  MAC2 {r.mac2}  TAC {r.tac}")


@terminal.command("load")
@card_option
@click.option("--hsm", "hsm_spec", required=True, metavar="SPEC",
              help="Reader spec of the load HSM, e.g. virtual:hsm.json.")
@amount_option
@purse_option
@pin_option
@click.option("--terminal-id", default="000000000001", show_default=True,
              help="The loading terminal's 6-byte id, hex.")
@click.option("--key-index", default=1, show_default=True, type=click.IntRange(0, 255))
@json_option
@trace_option
@at_option
def terminal_load(card_spec: str, hsm_spec: str, amount: int, purse: str, pin: str | None,
                  terminal_id: str, key_index: int, as_json: bool, trace_out: Path | None,
                  at: dt.datetime | None) -> None:
    """Load AMOUNT onto the card: S1 from the card, S2 from the HSM, S3 checked."""
    try:
        tid = bytes.fromhex(terminal_id)
    except ValueError:
        fail("--terminal-id must be hex", EXIT_USAGE)
    with handled(), readers(("card", card_spec), ("hsm", hsm_spec),
                            trace_out=trace_out) as (card_r, hsm_r):
        r = T.load(card_r, hsm_r, amount, terminal_id=tid, purse=T.purse_id(purse),
                   key_index=key_index, pin=pin, when=at)
    exp = r.currency_exponent
    emit(as_json, r.to_json(),
         f"load of {T.format_amount(r.amount, exp)} done\n"
         f"  balance {T.format_amount(r.balance_before, exp)} -> "
         f"{T.format_amount(r.balance_after, exp)}\n"
         f"  online counter {r.online_counter}\n  S1 {r.s1}  S2 {r.s2}  S3 {r.s3}")


# --- svcard apdu ---------------------------------------------------------------------------
@main.command("apdu")
@click.option("--reader", "reader_spec", required=True, metavar="SPEC", help="Reader spec.")
@click.argument("apdus", nargs=-1, required=True, metavar="HEX...")
@json_option
@trace_option
def apdu_cmd(reader_spec: str, apdus: tuple[str, ...], as_json: bool,
             trace_out: Path | None) -> None:
    """Send raw command APDUs and print each answer and its status word (like opensc-tool -s).

    Spaces and colons inside a HEX argument are ignored: "00 A4 04 00 ..." works quoted.
    """
    commands: list[bytes] = []
    for text in apdus:
        try:
            raw = bytes.fromhex(text.replace(":", "").replace(" ", ""))
            parse_command(raw)
        except (ValueError, APDUFormatError) as exc:
            fail(f"{text!r} is not a command APDU: {exc}", EXIT_USAGE)
        commands.append(raw)
    results = []
    with handled(), readers(("card", reader_spec), trace_out=trace_out) as (reader,):
        for raw in commands:
            answer = parse_response(reader.transmit(raw))
            results.append({"command": raw.hex().upper(), "data": answer.data.hex().upper(),
                            "sw": f"{answer.sw:04X}", "meaning": SW.meaning(answer.sw)})
    text = "\n".join(
        f"Sending: {r['command']}\nReceived ({r['sw']}, {r['meaning']}):"
        + (f"\n{r['data']}" if r["data"] else "") for r in results)
    emit(as_json, results, text)


# --- svcard readers ------------------------------------------------------------------------
@main.command("readers")
@json_option
def readers_cmd(as_json: bool) -> None:
    """List PC/SC readers, whether a card is present, and its ATR."""
    from ...reader.pcsc import list_readers

    with handled():
        found = list_readers()
    rows = [{"index": i, "name": r.name, "card_present": r.card_present,
             "atr": r.atr.hex().upper() if r.card_present else None}
            for i, r in enumerate(found)]
    text = "\n".join(f"#{r['index']}  {r['name']}  " + (f"card, ATR {r['atr']}"
                     if r["card_present"] else "no card") for r in rows) or "no readers"
    emit(as_json, rows, text)


# --- svcard card serve -----------------------------------------------------------------------
@card.command("serve")
@click.argument("images", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--vpcd", "address", default="127.0.0.1:35963", show_default=True,
              help="vpcd's HOST:PORT; further images go to the following ports "
                   "(reader 'Virtual PCD 00 01' is port+1).")
@click.option("--quiet", is_flag=True, help="Do not report connections and power events.")
def card_serve(images: tuple[Path, ...], address: str, quiet: bool) -> None:
    """Serve card IMAGES to the system's pcscd through the vsmartcard vpcd driver.

    Each image becomes a card in a "Virtual PCD 00 0N" reader, seen by every PC/SC program
    (pcsc_scan, opensc-tool, pyscard, svcard pcsc:...). Runs until Ctrl-C; every card write
    is atomic, so stopping at any moment leaves the images consistent.
    """
    from .card_serve import serve_images

    try:
        from ...reader.vpcd import parse_address
        host, port = parse_address(address)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    with handled():
        serve_images(list(images), host, port, quiet=quiet)


# --- svcard trace ----------------------------------------------------------------------------
@main.group()
def trace() -> None:
    """Show, import and replay APDU traces (replay: the reader spec trace:FILE)."""


@trace.command("show")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
def trace_show(path: Path, as_json: bool) -> None:
    """Decode a trace: command names, fields, status words, log records."""
    from ...protocols.decode import decode, render
    from ...reader.trace import load_trace

    with handled():
        loaded = load_trace(path)
    decoded = [decode(ex.command, ex.response) for ex in loaded.exchanges]
    if as_json:
        emit(True, {"reader": loaded.reader, "atr": loaded.atr.hex().upper(),
                    "source": loaded.source,
                    "exchanges": [{"command": ex.command.hex().upper(),
                                   "response": ex.response.hex().upper(), "name": d.name,
                                   "fields": d.fields, "sw": f"{d.sw:04X}" if d.sw else None,
                                   "meaning": d.meaning, "answer": d.answer,
                                   "log_records": d.records}
                                  for ex, d in zip(loaded.exchanges, decoded, strict=True)]},
             "")
        return
    lines = [f"trace of {loaded.reader or '?'}, ATR {loaded.atr.hex().upper() or '?'}"
             f" ({loaded.source}), {len(loaded.exchanges)} exchanges"]
    for i, d in enumerate(decoded):
        lines.append(f"#{i} {render(d)}")
    emit(False, None, "\n".join(lines))


@trace.command("import")
@click.option("--from", "fmt", required=True,
              type=click.Choice(["pcsc-spy", "gp", "apdu4j", "cardpeek"]),
              help="pcsc-spy text, GlobalPlatformPro/apdu4j A>>/A<< lines, apdu4j dump, "
                   "Cardpeek .clf")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def trace_import(fmt: str, source: Path, out: Path) -> None:
    """Convert another tool's APDU log into an svcard trace."""
    from ...reader.trace_import import import_file

    with handled():
        converted = import_file(fmt, source)
        converted.save(out)
    click.echo(f"wrote {out}: {len(converted.exchanges)} exchanges from {fmt} log {source}")


# --- svcard pay / svcard serve -------------------------------------------------------------
@main.command("pay")
@click.argument("checkout_url")
@card_option
@purse_option
@pin_option
@click.option("--journal", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The local payment journal (default: $SVCARD_JOURNAL or "
                   "~/.local/state/svcard/journal.jsonl).")
@click.option("--timeout", default=30.0, show_default=True, help="HTTP timeout, seconds.")
@click.option("--terminal-key", "terminal_key", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="This client terminal's Ed25519 key (svcard terminal-key new): names the "
                   "terminal at checkout and signs FIG. 7 confirmations. Without it the "
                   "client never asks for FIG. 7.")
@click.option("--terminal-id", "terminal_id", default=None, metavar="HEX",
              help="The terminal id registered with the merchant (8 bytes hex; default: "
                   "derived from the key).")
@json_option
def pay_cmd(checkout_url: str, card_spec: str, purse: str, pin: str | None,
            journal: Path | None, timeout: float, terminal_key: Path | None,
            terminal_id: str | None, as_json: bool) -> None:
    """Pay a merchant's CHECKOUT_URL with the card (seed steps 608-640).

    First finishes any payment of this card that an interruption left in the journal (or proves
    with the card that it never happened), then pays: one draw request to the payment server,
    the card debits itself, the confirmation goes to the merchant, the goods come back.
    """
    import httpx

    from ..pay import client as C
    from ..pay import client_terminal as CT
    from ..terminal.journal import Journal, default_journal

    book = Journal(journal or default_journal())
    terminal = None
    if terminal_id is not None and terminal_key is None:
        fail("--terminal-id needs --terminal-key", EXIT_USAGE)
    if terminal_key is not None:
        with handled():
            terminal = CT.ClientTerminal.load(terminal_key, _terminal_id(terminal_id))
    with handled(), httpx.Client(timeout=timeout) as http, \
            readers(("card", card_spec)) as (card_r,):
        try:
            resumed = C.resume(card_r, journal=book, http=http, terminal=terminal)
            outcome = C.pay(checkout_url, card_r, journal=book, http=http, pin=pin,
                            purse=T.purse_id(purse), terminal=terminal)
        except httpx.HTTPError as exc:
            fail(f"network: {exc} (the journal keeps the payment; run again to finish it)",
                 EXIT_DEVICE)
    exp = outcome.currency_exponent
    text = "\n".join(
        [f"resumed {r['txn_id']}: {r['outcome']}" for r in resumed]
        + [f"paid {T.format_amount(outcome.amount, exp)} ({outcome.variant}, "
           f"{outcome.round_trips} round trips): {outcome.item}",
           f"  balance {T.format_amount(outcome.balance_before, exp)} -> "
           f"{T.format_amount(outcome.balance_after, exp)}",
           f"  goods: {outcome.goods}" + ("" if outcome.proven else
                                          " (unproven until the card's proof is cleared)"),
           f"  receipt: {json.dumps(outcome.receipt)}"])
    emit(as_json, {"resumed": resumed, "payment": outcome.to_json()}, text)


def _terminal_id(value: str | None) -> bytes | None:
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != 8:
        fail("--terminal-id: 8 bytes of hex", EXIT_USAGE)
    return raw


@main.group("terminal-key")
def terminal_key_group() -> None:
    """A client terminal's Ed25519 key (merchants register it to allow FIG. 7)."""


@terminal_key_group.command("new")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--terminal-id", "terminal_id", default=None, metavar="HEX",
              help="The terminal id (8 bytes hex; default: derived from the public key).")
@json_option
def terminal_key_new(file: Path, terminal_id: str | None, as_json: bool) -> None:
    """Write a new key to FILE (mode 0600, never overwritten); print its id and public key
    (the private key is not printed)."""
    from ..pay.client_terminal import ClientTerminal

    terminal = ClientTerminal.generate(_terminal_id(terminal_id))
    try:
        terminal.save(file)
    except FileExistsError:
        fail(f"{file} exists: not overwritten", EXIT_USAGE)
    except OSError as exc:
        fail(f"{file}: {exc.strerror}", EXIT_DEVICE)
    tid, public = terminal.terminal_id.hex().upper(), terminal.public_key.hex().upper()
    emit(as_json, {"file": str(file), "terminal_id": tid, "public_key": public},
         f"wrote {file} (mode 0600)\nterminal id {tid}\npublic key {public}\n"
         f"for the merchant's [client_terminals]:\n\"{tid}\" = \"{public}\"")


@main.group()
def serve() -> None:
    """Run the servers: payment (with its PSAM pool), merchant, bank, load (with its HSM)."""


@serve.command("payment")
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML: merchants and their shared keys, db, timeouts "
                   "(see fixtures/payment-demo.toml).")
@click.option("--psam", "psam_specs", multiple=True, required=True, metavar="SPEC",
              help="A PSAM of the pool (repeat): virtual:psam.json, pcsc:NAME, ...")
@click.option("--db", "db_url", default=None, help="Database URL (overrides the config).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
def serve_payment(config_path: Path, psam_specs: tuple[str, ...], db_url: str | None,
                  host: str, port: int) -> None:
    """The payment server: draw requests in, debit commands out, a pool of PSAMs."""
    import uvicorn

    from ..kit.config import ConfigError
    from ..pay.config import payment_config
    from ..pay.server.app import PaymentServer

    try:
        config = payment_config(config_path, db_url)
    except ConfigError as exc:
        fail(str(exc), EXIT_DEVICE)
    with handled():
        psams = [open_reader(spec) for spec in psam_specs]
        server = PaymentServer(config, psams)
    uvicorn.run(server.app(), host=host, port=port, log_level="info")


@serve.command("merchant")
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML: merchant id, shared key, payment server URL and terminal id, "
                   "variants, client terminals, db, bounds (see fixtures/merchant-demo.toml).")
@click.option("--db", "db_url", default=None, help="Database URL (overrides the config).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8081, show_default=True, type=int)
def serve_merchant(config_path: Path, db_url: str | None, host: str, port: int) -> None:
    """A merchant selling digital goods: checkout and status endpoints."""
    import uvicorn

    from ..kit.config import ConfigError
    from ..pay.config import merchant_config
    from ..pay.merchant.server import MerchantServer

    try:
        config = merchant_config(config_path, db_url)
    except ConfigError as exc:
        fail(str(exc), EXIT_DEVICE)
    uvicorn.run(MerchantServer(config).app(), host=host, port=port, log_level="info")


@serve.command("load")
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML: terminal id, banks and their shared keys, db "
                   "(see fixtures/load-demo.toml).")
@click.option("--hsm", "hsm_specs", multiple=True, required=True, metavar="SPEC",
              help="A load HSM (repeat for a pool): virtual:hsm.json, pcsc:NAME, ...")
@click.option("--db", "db_url", default=None, help="Database URL (overrides the config).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8084, show_default=True, type=int)
def serve_load(config_path: Path, hsm_specs: tuple[str, ...], db_url: str | None, host: str,
               port: int) -> None:
    """The load server: load requests in, load commands (the HSM's S2) out, confirmations
    sealed for the bank."""
    import uvicorn

    from ..kit.config import ConfigError
    from ..load.config import load_config
    from ..load.server.app import LoadServer

    try:
        config = load_config(config_path, db_url)
    except ConfigError as exc:
        fail(str(exc), EXIT_DEVICE)
    with handled():
        server = LoadServer(config, [open_reader(spec) for spec in hsm_specs])
    uvicorn.run(server.app(), host=host, port=port, log_level="info")


@serve.command("bank")
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML: bank id, the key shared with the load server, load server URL "
                   "(see fixtures/bank-demo.toml).")
@click.option("--db", "db_url", default=None, help="Database URL (overrides the config).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8083, show_default=True, type=int)
def serve_bank(config_path: Path, db_url: str | None, host: str, port: int) -> None:
    """The bank: debits customer accounts for loads, registers the load server's
    confirmations (a "not loaded" one re-credits the account)."""
    import uvicorn

    from ..kit.config import ConfigError
    from ..load.bank.server import BankServer
    from ..load.config import bank_config

    try:
        config = bank_config(config_path, db_url)
    except ConfigError as exc:
        fail(str(exc), EXIT_DEVICE)
    uvicorn.run(BankServer(config).app(), host=host, port=port, log_level="info")


# --- svcard bank account ... ----------------------------------------------------------------
@main.group()
def bank() -> None:
    """The bank's customer accounts (straight in the bank's database)."""


db_option = click.option("--db", "db_url", required=True,
                         help="The bank database URL, e.g. sqlite:///bank.db.")


@bank.group("account")
def bank_account() -> None:
    """Create, fund and list accounts (integer minor units)."""


@bank_account.command("create")
@click.argument("account_id")
@db_option
@click.option("--holder", default=None, help="The holder's name (default: the id).")
@click.option("--funds", default=0, show_default=True, type=click.IntRange(0, None),
              help="Opening balance, minor units.")
@click.option("--currency", default=156, show_default=True, type=int)
@click.option("--secret", default=None, help="The account secret (default: a random one).")
@json_option
def bank_account_create(account_id: str, db_url: str, holder: str | None, funds: int,
                        currency: int, secret: str | None, as_json: bool) -> None:
    """Open ACCOUNT_ID. Prints its secret once: `svcard load` needs it."""
    from ..load.bank.db import BankDb, BankError, make_engine

    try:
        secret = BankDb(make_engine(db_url)).create_account(account_id, holder or account_id,
                                                            currency, funds, secret)
    except BankError as exc:
        fail(str(exc), EXIT_DECLINED)
    emit(as_json, {"account": account_id, "balance": funds, "secret": secret},
         f"account {account_id} opened with {funds}; secret: {secret}")


@bank_account.command("fund")
@click.argument("account_id")
@click.argument("amount", type=click.IntRange(1, None))
@db_option
@json_option
def bank_account_fund(account_id: str, amount: int, db_url: str, as_json: bool) -> None:
    """Deposit AMOUNT minor units into ACCOUNT_ID."""
    from ..load.bank.db import BankDb, BankError, make_engine

    try:
        balance = BankDb(make_engine(db_url)).fund(account_id, amount)
    except BankError as exc:
        fail(str(exc), EXIT_DECLINED)
    emit(as_json, {"account": account_id, "balance": balance},
         f"account {account_id}: balance {balance}")


@bank_account.command("list")
@db_option
@json_option
def bank_account_list(db_url: str, as_json: bool) -> None:
    """Every account with its balance."""
    from ..load.bank.db import BankDb, make_engine

    rows = BankDb(make_engine(db_url)).accounts()
    emit(as_json, rows, "\n".join(f"{r['account_id']:<16} {r['balance']:>14}  {r['holder']}"
                                  for r in rows) or "no accounts")


# --- svcard load ----------------------------------------------------------------------------
@main.command("load")
@click.argument("bank_url")
@card_option
@click.option("--account", required=True, help="Your account at the bank.")
@click.option("--secret", required=True, envvar="SVCARD_ACCOUNT_SECRET",
              help="The account secret (or $SVCARD_ACCOUNT_SECRET).")
@amount_option
@click.option("--journal", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The local journal (default: $SVCARD_JOURNAL or "
                   "~/.local/state/svcard/journal.jsonl).")
@click.option("--timeout", default=30.0, show_default=True, help="HTTP timeout, seconds.")
@json_option
def load_cmd(bank_url: str, card_spec: str, account: str, secret: str, amount: int,
             journal: Path | None, timeout: float, as_json: bool) -> None:
    """Load AMOUNT minor units from your bank account onto the card (seed FIG. 18).

    BANK_URL is the bank's load page (e.g. http://127.0.0.1:8083/v1/load). First finishes any
    load of this card an interruption left in the journal, asking the card what happened.
    Exit code 1 if the load was refused or ended "not loaded" (the account is re-credited).
    """
    import httpx

    from ..load import client as LC
    from ..terminal.journal import Journal, default_journal
    from ..terminal.online import PaymentRefused

    book = Journal(journal or default_journal())
    with handled(), httpx.Client(timeout=timeout) as http, \
            readers(("card", card_spec)) as (card_r,):
        try:
            resumed = LC.resume_loads(card_r, journal=book, http=http)
            outcome = LC.load(bank_url, card_r, account=account, secret=secret, amount=amount,
                              journal=book, http=http)
        except httpx.HTTPError as exc:
            fail(f"network: {exc} (the journal keeps the load; run again to finish it)",
                 EXIT_DEVICE)
        except PaymentRefused as exc:
            fail(str(exc), EXIT_DECLINED)
    exp = outcome.currency_exponent
    text = "\n".join(
        [f"resumed {r['txn_id']}: {r['outcome']}" for r in resumed]
        + [f"{outcome.outcome} {T.format_amount(outcome.amount, exp)} "
           f"({outcome.round_trips} round trips): {outcome.reason}",
           f"  card balance {T.format_amount(outcome.balance_before, exp)} -> "
           f"{T.format_amount(outcome.balance_after, exp)}",
           f"  bank: {json.dumps(outcome.bank)}"])
    emit(as_json, {"resumed": resumed, "load": outcome.to_json()}, text)
    if outcome.outcome != "loaded":
        sys.exit(EXIT_DECLINED)


# --- svcard clearing / svcard audit ---------------------------------------------------------
@main.group()
def clearing() -> None:
    """Clear PSAM batches, move loaded funds to the float, pay merchants (seed FIG. 3)."""


@clearing.command("run")
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML: issuers (TAC keys), terminals (batch keys, merchant, acquirer), "
                   "settlement key (see fixtures/clearing-demo.toml).")
@click.option("--batches", "batch_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="The concentration point folder the payment servers write batches to.")
@click.option("--load-db", "load_dbs", multiple=True, metavar="URL",
              help="A load server's database: its confirmed loads fund the float (repeat).")
@click.option("--db", "db_url", required=True, help="The clearing database URL.")
@click.option("--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the settlement file and its JSON Lines twin go.")
@json_option
def clearing_run(config_path: Path, batch_dir: Path, load_dbs: tuple[str, ...], db_url: str,
                 out_dir: Path, as_json: bool) -> None:
    """One clearing run over every batch in the folder. Exit code 1 if any batch or record
    was refused (the rest is still cleared; refused ones are listed with their reason)."""
    from ..kit.config import ConfigError
    from ..settle import clearing as CL
    from ..settle.config import clearing_config

    try:
        config = clearing_config(config_path)
    except ConfigError as exc:
        fail(str(exc), EXIT_DEVICE)
    report = CL.run_clearing(config, batch_dir, CL.make_engine(db_url), out_dir,
                             load_db_urls=load_dbs)
    refused = [b for b in report.batches if b["state"] == "refused"
               or b["counts"].get("refused")]
    refused += [p for p in report.proofs if p["state"] == "refused" or p["counts"].get("refused")]
    text = [f"run {report.run_number}: {report.records_cleared} records cleared, "
            f"{report.total_paid} paid to merchants; {report.loads_moved} loads "
            f"({report.total_loaded}) moved to the float",
            f"  settlement file {report.settlement_file} (+ .jsonl)"]
    for b in report.batches:
        text.append(f"  {b['file']}: {b['state']} ({b['reason']}) {b['counts']}")
        text += [f"    record {p['index']}: {p['state']}: {p['reason']}" for p in b["problems"]]
    for pf in report.proofs:
        text.append(f"  {pf['file']}: {pf['state']} ({pf['reason']}) {pf['counts']}")
        text += [f"    batch {p['batch_number']} TTN {p['terminal_txn_number']}: {p['state']}: "
                 f"{p['reason']}" for p in pf["problems"]]
    emit(as_json, report.to_json(), "\n".join(text))
    if refused:
        sys.exit(EXIT_DECLINED)


@clearing.command("verify")
@click.argument("settlement_file", type=click.Path(exists=True, dir_okay=False,
                                                   path_type=Path))
@click.option("--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
def clearing_verify(settlement_file: Path, config_path: Path, as_json: bool) -> None:
    """Check a settlement file's MAC and layout and print its lines."""
    from ..kit.config import ConfigError
    from ..settle import clearing as CL
    from ..settle.config import clearing_config

    try:
        key = clearing_config(config_path).settlement_key
    except ConfigError as exc:
        fail(str(exc), EXIT_DEVICE)
    try:
        data = CL.verify_settlement_file(key, settlement_file.read_bytes())
    except CL.ClearingError as exc:
        fail(str(exc), EXIT_DECLINED)
    emit(as_json, data, "\n".join([f"run {data['run_number']}: MAC verified"] + [
        f"  kind {ln['kind']} {ln['payer']} -> {ln['payee']}: {ln['count']} x, {ln['amount']}"
        for ln in data["lines"]]))


@main.command("audit")
@click.option("--card", "card_specs", multiple=True, metavar="SPEC",
              help="A card (reader spec, or an image path): its balance counts (repeat).")
@click.option("--payment-db", "payment_dbs", multiple=True, metavar="URL")
@click.option("--load-db", "load_dbs", multiple=True, metavar="URL")
@click.option("--bank-db", "bank_dbs", multiple=True, metavar="URL")
@click.option("--clearing-db", default=None, metavar="URL")
@click.option("--opening", default=0, show_default=True, type=click.IntRange(0, None),
              help="Balances the cards were personalised with (minor units, in total).")
@click.option("--psam", "psam_specs", multiple=True, metavar="SPEC",
              help="A payment server's PSAM (reader spec or image path): its open batch is read, "
                   "so a confirmed payment with no PSAM record is found at once (repeat).")
@click.option("--max-age", "max_age_days", default=7.0, show_default=True,
              type=click.FloatRange(0, None),
              help="Days after which a held record, an open load or a confirmed payment not "
                   "yet cleared fails the audit.")
@json_option
def audit_cmd(card_specs: tuple[str, ...], payment_dbs: tuple[str, ...],
              load_dbs: tuple[str, ...], bank_dbs: tuple[str, ...], clearing_db: str | None,
              opening: int, psam_specs: tuple[str, ...], max_age_days: float,
              as_json: bool) -> None:
    """Prove money is conserved and nothing is hidden: cards + unsettled purchases + settled =
    loads; the float = cards + unsettled; bank debits = confirmed loads; every confirmed payment
    has a PSAM record; every refund a proven "not loaded"; held records, open loads and
    uncleared payments listed, and failing past --max-age. Exit code 1 on any finding."""
    from ..settle.audit import DAY_MS, audit, card_balances, psam_open_batches

    def spec(s: str) -> str:
        return s if ":" in s else f"virtual:{s}"

    with handled(), readers(*[("card", spec(s)) for s in card_specs]) as card_readers:
        cards = card_balances(card_readers)
    open_batches = None
    if psam_specs:
        with handled(), readers(*[("psam", spec(s)) for s in psam_specs]) as psam_readers:
            open_batches = psam_open_batches(psam_readers)
    report = audit(cards, payment_dbs=payment_dbs, load_dbs=load_dbs, bank_dbs=bank_dbs,
                   clearing_db=clearing_db, opening=opening,
                   max_age_ms=int(max_age_days * DAY_MS), open_batches=open_batches)
    emit(as_json, report.to_json(), report.text())
    if not report.clean:
        sys.exit(EXIT_DECLINED)


# --- svcard demo ---------------------------------------------------------------------------
@main.command("demo")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the card images in this folder instead of a temporary one.")
@click.option("--load-amount", default=10000, show_default=True,
              type=click.IntRange(1, 0xFFFFFFFF))
@click.option("--purchase-amount", default=1234, show_default=True,
              type=click.IntRange(0, 0xFFFFFFFF))
@json_option
def demo(keep: Path | None, load_amount: int, purchase_amount: int, as_json: bool) -> None:
    """Run the main job on embedded defaults: personalise a purse card, a PSAM and a load
    HSM from the demo fixtures, load the card, make a purchase, and show the log."""
    from ..demo.story import run_demo

    with handled():
        story = run_demo(keep, load_amount, purchase_amount)
    emit(as_json, story.data, story.text)


if __name__ == "__main__":  # pragma: no cover
    main()
