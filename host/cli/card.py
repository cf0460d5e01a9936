"""``svcard card``: make card images from profiles, show what one holds, serve images to
pcscd through vpcd."""

from __future__ import annotations

from pathlib import Path

import click

from ...card.image import save_new_image
from ...card.personalise import image_from_profile
from ...card.storage import ImageError, read_image
from ..kit.command_line import EXIT_USAGE, emit, fail, json_option
from ..terminal.card_commands import handled
from .describe import describe_image, render_image


@click.group()
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
