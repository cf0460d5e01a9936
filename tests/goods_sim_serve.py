"""The goods payment server as a process holding PSAMs (for goods the purse pays), for the
randomised run (tests/goods_sim.py), until ``svcard serve goods-payment`` takes PSAMs itself:

    python tests/goods_sim_serve.py GOODS_TOML PSAM_IMAGE...

It serves the same app as ``svcard serve goods-payment`` on the port of the payment server's
url in the file, with a virtual reader on each PSAM image."""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlsplit

from svcard.host.goods.config import goods_config
from svcard.host.goods.server.payment import PaymentServer
from svcard.host.kit.serving import serve
from svcard.host.terminal.reader_specs import open_reader


def main(argv: list[str]) -> int:
    config = goods_config(Path(argv[0]), "payment")
    server = PaymentServer(config, psams=[open_reader(f"virtual:{p}") for p in argv[1:]])
    port = urlsplit(config.me.url).port or 80
    return serve(server.app(), host="127.0.0.1", port=port, log_level="warning", drain=server)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
