"""What every ``svcard`` command that talks to a card shares: opening its readers (and
recording them to a trace), turning card, reader and terminal errors into an exit code, and the
card options (--card and --aid, --purse, --pin, --amount or --minor, --trace-out, --at)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, cast

import click

from ...card.storage import ImageError, ProfileError
from ...protocols import purse as P
from ...reader import Reader, ReaderError
from ...reader.trace import RecordingReader
from ..kit.command_line import EXIT_DECLINED, EXIT_DEVICE, EXIT_USAGE, F, fail
from .money import MAX_MINOR, Amount, AmountError, minor_amount, parse_amount
from .purse import TerminalError
from .reader_specs import open_reader


@contextmanager
def handled() -> Iterator[None]:
    """Turn our errors into a one-line message and a meaningful exit code."""
    try:
        yield
    except AmountError as exc:
        fail(str(exc), EXIT_USAGE)
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


AID_BYTES = (5, 16)  # ISO 7816-4: an application identifier is 5 to 16 bytes


def parse_aid(value: str) -> bytes:
    """``--aid HEX`` as bytes: 5 to 16 bytes of hex (spaces and colons allowed between bytes);
    anything else is a one-line usage error naming ``--aid`` (exit code 2)."""
    text = value.replace(" ", "").replace(":", "")
    try:
        aid = bytes.fromhex(text)
    except ValueError:
        aid = b""
    if not AID_BYTES[0] <= len(aid) <= AID_BYTES[1]:
        fail(f"--aid {value[:40]!r}: an AID is {AID_BYTES[0]} to {AID_BYTES[1]} bytes of hex, "
             f"e.g. {P.DEFAULT_IEP_AID.hex().upper()}", EXIT_USAGE)
    return aid


def _aid_callback(_ctx: click.Context, _param: click.Parameter, value: str) -> bytes:
    return parse_aid(value)


def card_option(f: F) -> F:
    """``--card SPEC`` (the command gets ``card_spec``) and ``--aid HEX`` (it gets ``aid``, the
    purse application's AID as bytes; default svcard's own): every command that takes a purse
    card takes both."""
    with_aid = click.option(
        "--aid", "aid", default=P.DEFAULT_IEP_AID.hex().upper(), show_default=True,
        metavar="HEX", callback=_aid_callback,
        help="AID of the purse application to SELECT (5 to 16 bytes of hex), e.g. "
             "A00000000386980701 for a PBOC ED/EP purse at the common AID.")(f)
    return click.option("--card", "card_spec", required=True, metavar="SPEC",
                        help="Reader spec of the purse card, e.g. virtual:card.json.")(with_aid)


purse_option = click.option("--purse", type=click.Choice(["ep", "ed"], case_sensitive=False),
                            default="ep", show_default=True,
                            help="EP purse, or the PIN-protected ED passbook.")
pin_option = click.option("--pin", default=None, help="Cardholder PIN (ED passbook only).")


def parse_amount_option(ctx: click.Context, param: click.Parameter,
                        value: str | None) -> Amount | None:
    """The click callback of an amount option: ``12.34`` (in the currency's unit) or ``1234u``
    (minor units), as an :class:`Amount`; the currency's exponent places a decimal later, once
    the card (or the account) is read. A malformed amount is a usage error naming the option."""
    if value is None:
        return None
    try:
        name = param.opts[0] if isinstance(param, click.Option) else param.human_readable_name
        return parse_amount(value, name)
    except AmountError as exc:
        raise click.BadParameter(f"{value[:40]}: {exc.reason}", ctx, param) from None


AMOUNT_HELP = ("12.34 in the card's currency (exact: no more decimals than the currency has), "
               "or 1234u in minor units.")


def amount_option(f: F) -> F:
    """``--amount 12.34`` / ``--amount 1234u`` or ``--minor 1234``, exactly one: the command
    gets one ``amount`` parameter, an :class:`Amount` to place with the card's exponent
    (``Amount.minor_units``)."""

    @functools.wraps(f)
    def with_amount(*args: Any, amount: Amount | None, minor: int | None,
                    **kwargs: Any) -> Any:
        if (amount is None) == (minor is None):
            raise click.UsageError("give the amount once: --amount 12.34 (or 1234u), or "
                                   "--minor 1234 (minor units)")
        return f(*args, amount=amount if amount is not None else minor_amount(cast(int, minor)),
                 **kwargs)

    with_minor = click.option("--minor", type=click.IntRange(0, MAX_MINOR), default=None,
                              metavar="N", help="The amount in integer minor units "
                                                "(instead of --amount).")(with_amount)
    return cast(F, click.option("--amount", default=None, metavar="AMOUNT",
                                callback=parse_amount_option, help=AMOUNT_HELP)(with_minor))
