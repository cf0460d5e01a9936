"""Several load-server processes (nodes) on one database behind Debian's nginx, for the tests
(docs/deploy-nodes.md, "Load nodes").

A node is ``python -m svcard.host.load.nodes SPEC.json``: the load server with every HSM of the
deployment named (each node names the same HSM images; a node opens only those it leases, see
:mod:`svcard.host.load.server.leases`). nginx (:class:`~svcard.host.kit.nginx.Nginx`) spreads
the bank's and the clients' requests over the nodes: every POST of the load server is
idempotent (the same request, result or probe result again gets the same answer), so a request
that met a dead node or a node holding no HSM (503) may go to the next node. A node believes
nginx's ``X-Forwarded-For`` only from ``trusted_proxies`` (default: nginx's address), so its
request log names each real client.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..kit.nginx import NGINX_ADDRESS, Nginx
from ..kit.serving import NodeProcess
from ..terminal.reader_specs import OnDemandReader, slot_name

__all__ = ["LoadNode", "LoadNodeSpec", "Nginx", "OnDemandReader", "serve_node", "slot_name"]


@dataclass
class LoadNodeSpec:
    """What a load node process is started with (a JSON file, mode 0600: it holds a key)."""

    name: str
    port: int
    db_url: str = field(repr=False)
    hsms: list[str]                        # reader specs, the same for every node
    bank_id: str                           # hex
    shared_key: str = field(repr=False)    # hex
    terminal_id: str                       # hex
    lease_seconds: float = 10.0
    acquire_timeout: float = 2.0
    # whose X-Forwarded-For names the client (serve's proxies): nginx's; [] believes none
    trusted_proxies: list[str] = field(default_factory=lambda: [NGINX_ADDRESS])


def serve_node(spec_path: Path) -> None:
    """Run one load node in this process until it is stopped (or killed)."""
    from ..kit.serving import serve
    from .server.app import BankAccount, LoadConfig, LoadServer

    spec = LoadNodeSpec(**json.loads(spec_path.read_text(encoding="utf-8")))
    bank = bytes.fromhex(spec.bank_id)
    config = LoadConfig({bank: BankAccount(bank, bytes.fromhex(spec.shared_key))},
                        bytes.fromhex(spec.terminal_id), db_url=spec.db_url,
                        acquire_timeout=spec.acquire_timeout, node_name=spec.name,
                        lease_seconds=spec.lease_seconds)
    server = LoadServer(config, [OnDemandReader(h) for h in spec.hsms])
    sys.exit(serve(server.app(), host="127.0.0.1", port=spec.port, log_level="warning",
                   drain=server.drain, proxies=spec.trusted_proxies))


class LoadNode(NodeProcess):
    """A load node process: started, SIGKILLed, SIGSTOPped and continued, started again."""

    def __init__(self, folder: Path, spec: LoadNodeSpec) -> None:
        super().__init__(folder, spec.name, spec.port, "svcard.host.load.nodes", asdict(spec),
                         ready_below=600)
        self.spec = spec


if __name__ == "__main__":
    serve_node(Path(sys.argv[1]))
