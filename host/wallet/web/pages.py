"""The static pages (package data in ``static/``): the wallet page and its script and style,
and the demo mall's page and script. Each is served with a strict Content-Security-Policy
(scripts and styles from the page's own origin only, no inline script, no framing)."""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

KINDS = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
         "css": "text/css; charset=utf-8"}
HEADERS = {
    # connect-src: the page's own server, and the local card helper (svcard helper) on
    # loopback, which a real card is loaded and pays through
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'self'; "
                               "connect-src 'self' http://127.0.0.1:* http://localhost:*",
    "X-Frame-Options": "DENY", "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
}


def static_file(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def page(name: str) -> Route:
    """``GET /PATH`` serving ``static/NAME`` (read once, when the app is built)."""
    body = static_file(name)
    kind = KINDS[name.rsplit(".", 1)[1]]
    path = "/wallet" if name == "wallet.html" else f"/static/{name}"

    async def serve(request: Request) -> Response:
        return Response(body, media_type=kind, headers=HEADERS)

    return Route(path, serve, methods=["GET", "HEAD"])


def static_routes() -> list[Route]:
    return [page(n) for n in ("wallet.html", "wallet.js", "wallet.css")]
