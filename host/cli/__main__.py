"""``python -m svcard.host.cli``: the same as the ``svcard`` command."""

from .main import main

main()
