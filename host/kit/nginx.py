"""Debian's nginx in front of several server processes (payment or load nodes), started by the
tests and the benchmarks with a generated configuration under a private prefix folder (its pid,
logs and temp folders there: no root path), stopped by its pid (docs/deploy-nodes.md, "nginx").

Every POST the nodes serve must be idempotent (the same message again gets the same answer):
nginx sends a request that met a dead node, or a node that answered 503, to the next one
(``proxy_next_upstream ... non_idempotent``).

nginx sets ``X-Forwarded-For`` to the address its client connected from, replacing whatever
header that client sent (``$remote_addr``, not ``$proxy_add_x_forwarded_for``, which appends to
it): a node started with ``--trusted-proxy`` naming nginx's address (``proxies`` of
:func:`~.serving.serve`) counts its per-client limits under the real client's address, and a
client cannot choose it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx

from .serving import free_port

# where nginx's connections to nodes on loopback come from: what a node behind it trusts
# (``proxies`` of :func:`~.serving.serve`) to name the client in X-Forwarded-For
NGINX_ADDRESS = "127.0.0.1"


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)


def nginx_config(prefix: Path, port: int, upstreams: list[str], host: str = "127.0.0.1",
                 name: str = "payment_nodes") -> str:
    """An nginx configuration: the nodes (``HOST:PORT``) as one upstream called ``name``,
    everything under ``prefix``, listening on ``host:port``."""
    servers = "\n".join(f"    server {u} max_fails=0;" for u in upstreams)
    temps = "\n".join(f"  {kind}_temp_path {prefix / kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""worker_processes 1;
error_log {prefix / 'error.log'} warn;
pid {prefix / 'nginx.pid'};
events {{ worker_connections 1024; }}
http {{
  access_log off;
{temps}
  upstream {name} {{
{servers}
    keepalive 32;
  }}
  server {{
    listen {host}:{port};
    client_max_body_size 64k;
    location / {{
      proxy_pass http://{name};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_next_upstream error timeout http_502 http_503 non_idempotent;
      proxy_next_upstream_tries 4;
      proxy_connect_timeout 1s;
      proxy_read_timeout 30s;
    }}
  }}
}}
"""


class Nginx:
    """Debian's nginx in front of ``upstreams``, started with a generated configuration."""

    def __init__(self, prefix: Path, upstreams: list[str], port: int | None = None,
                 name: str = "payment_nodes") -> None:
        binary = find_nginx()
        if binary is None:
            raise FileNotFoundError("nginx is not installed (apt-get install nginx)")
        self.binary = binary
        self.prefix = prefix
        self.port = port or free_port()
        prefix.mkdir(parents=True, exist_ok=True)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(nginx_config(prefix, self.port, upstreams, name=name),
                             encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Nginx:
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.prefix), "-c", str(self.conf), "-e",
             str(self.prefix / "error.log"), "-g", "daemon off; user root;"
             if os.geteuid() == 0 else "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited ({self.proc.returncode}): "
                                   + (self.prefix / "error.log").read_text()[-500:])
            try:
                httpx.get(self.url + "/", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise TimeoutError("nginx did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)   # graceful: finish requests, then exit
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
