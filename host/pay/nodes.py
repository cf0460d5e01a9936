"""Several payment-server processes (nodes) on one database behind Debian's nginx, for the tests
and the benchmarks (docs/deploy-nodes.md).

A node is ``python -m svcard.host.pay.nodes SPEC.json``: the payment server with every PSAM of
the deployment named (each node names the same PSAM images; a node opens only those it leases,
see :mod:`svcard.host.pay.server.leases`). :class:`Nginx` writes a configuration whose upstream
is the nodes, under a private prefix folder (its pid, logs and temp folders there: no root
path), and starts ``nginx -p PREFIX -c nginx.conf -g 'daemon off;'`` as a child process,
stopped by its pid. Every POST of the payment server is idempotent (the same draw, debit
response or proof again gets the same answer), so nginx may send a request that met a dead
node, or a node holding no PSAM (503), to the next node (``proxy_next_upstream ...
non_idempotent``). A node believes the ``X-Forwarded-For`` that nginx sets only on connections
from ``trusted_proxies`` (default: nginx's address), so its FIG. 5 holds per client count each
real client, not nginx.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..kit.nginx import (  # noqa: F401 - Nginx, find_nginx, nginx_config: their old home
    NGINX_ADDRESS,
    Nginx,
    find_nginx,
    nginx_config,
)
from ..kit.serving import NodeProcess, write_private_json
from ..terminal.reader_specs import (  # noqa: F401 - their old home
    OnDemandReader,
    node_readers,
    slot_name,
)


@dataclass
class NodeSpec:
    """What a node process is started with (a JSON file, mode 0600: it holds a key)."""

    name: str
    port: int
    db_url: str = field(repr=False)
    psams: list[str]                      # reader specs, the same for every node
    merchant_id: str                      # hex
    shared_key: str = field(repr=False)   # hex
    lease_seconds: float = 10.0
    acquire_timeout: float = 2.0
    hold_timeout: float = 10.0
    concentration_dir: str = ""
    admin_token: str = field(default="", repr=False)
    max_holds: int | None = None          # FIG. 5 holds per merchant and per client address
    max_client_holds: int | None = None   # FIG. 5 holds per client address (None: max_holds)
    # whose X-Forwarded-For names the client (serve's proxies): nginx's; [] believes none
    trusted_proxies: list[str] = field(default_factory=lambda: [NGINX_ADDRESS])


def write_spec(path: Path, spec: NodeSpec) -> None:
    write_private_json(path, asdict(spec))


def serve_node(spec_path: Path) -> None:
    """Run one node in this process until it is stopped (or killed)."""
    from ..kit.serving import serve
    from .server.app import MerchantAccount, PaymentConfig, PaymentServer

    spec = NodeSpec(**json.loads(spec_path.read_text(encoding="utf-8")))
    merchant = bytes.fromhex(spec.merchant_id)
    config = PaymentConfig(
        {merchant: MerchantAccount(merchant, bytes.fromhex(spec.shared_key))},
        db_url=spec.db_url, acquire_timeout=spec.acquire_timeout,
        hold_timeout=spec.hold_timeout, admin_token=spec.admin_token,
        concentration_dir=spec.concentration_dir, node_name=spec.name,
        lease_seconds=spec.lease_seconds, max_holds_per_merchant=spec.max_holds,
        max_holds_per_client=spec.max_holds if spec.max_client_holds is None
        else spec.max_client_holds)
    server = PaymentServer(config, [OnDemandReader(p) for p in spec.psams])
    sys.exit(serve(server.app(), host="127.0.0.1", port=spec.port, log_level="warning",
                   drain=server, proxies=spec.trusted_proxies))


class Node(NodeProcess):
    """A payment node process (started, killed with SIGKILL, started again on its port)."""

    def __init__(self, folder: Path, spec: NodeSpec) -> None:
        super().__init__(folder, spec.name, spec.port, "svcard.host.pay.nodes", asdict(spec))
        self.spec = spec


if __name__ == "__main__":
    serve_node(Path(sys.argv[1]))
