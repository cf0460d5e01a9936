"""A real card "mailed": an IEP purse personalised with NO holder data (EF 0x16 all zero: no
name, no id number) and written, with its letter (the number and the secret), to the mail
folder. The purse's application serial is the card number, so the card and the financial
system's row name each other; its keys are the demo issuer's (TEST KEYS ONLY)."""

from __future__ import annotations

import os
from pathlib import Path

from ....card.image import save_new_image
from ....card.personalise import image_from_profile
from ....fixtures import fixture_path


def mail_real_card(folder: Path, number: str, secret: str, currency: int) -> Path:
    """Write ``NUMBER.json`` (the card image) and ``NUMBER.letter.txt`` (mode 0600) into
    ``folder``; the image's path."""
    folder.mkdir(parents=True, exist_ok=True)
    image = image_from_profile(fixture_path("iep-demo.toml"), app_serial="0000" + number,
                               holder={}, currency_code=currency)
    image["app"]["ep"]["balance"] = 0
    image["app"]["ed"]["balance"] = 0
    path = folder / f"{number}.json"
    save_new_image(path, image, overwrite=True)
    letter = folder / f"{number}.letter.txt"
    fd = os.open(letter, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"Your anonymous prepaid card\nnumber: {number}\nsecret: {secret}\n")
    return path
