"""What every ``svcard`` command that talks to a card shares: opening its readers (and
recording them to a trace), turning card, reader and terminal errors into an exit code, and the
card options (--card, --purse, --pin, --amount, --trace-out, --at)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import click

from ...card.personalise import ProfileError
from ...card.storage import ImageError
from ...reader import Reader, ReaderError
from ...reader.trace import RecordingReader
from ..kit.command_line import EXIT_DECLINED, EXIT_DEVICE, F, fail
from .purse import TerminalError
from .reader_specs import open_reader


@contextmanager
def handled() -> Iterator[None]:
    """Turn our errors into a one-line message and a meaningful exit code."""
    try:
        yield
    except TerminalError as exc:
        fail(str(exc), EXIT_DECLINED)
    except ReaderError as exc:
        fail(str(exc), exc.exit_code)
    except (ImageError, ProfileError) as exc:
        fail(str(exc), EXIT_DEVICE)


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


card_option = click.option("--card", "card_spec", required=True, metavar="SPEC",
                           help="Reader spec of the purse card, e.g. virtual:card.json.")
purse_option = click.option("--purse", type=click.Choice(["ep", "ed"], case_sensitive=False),
                            default="ep", show_default=True,
                            help="EP purse, or the PIN-protected ED passbook.")
pin_option = click.option("--pin", default=None, help="Cardholder PIN (ED passbook only).")
amount_option = click.option("--amount", required=True, type=click.IntRange(0, 0xFFFFFFFF),
                             help="Amount in integer minor units (1234 = 12.34 at exponent 2).")
