"""Network faults for the tests: a real HTTP client whose link drops once."""

from __future__ import annotations

from typing import Any

import httpx


class CutOff(httpx.Client):
    """A real HTTP client whose link drops once at ``path`` (before or after sending)."""

    def __init__(self, path: str, *, after_send: bool) -> None:
        super().__init__(timeout=30)
        self.cut_path, self.after_send, self.cut = path, after_send, False

    def post(self, url: Any, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
        if not self.cut and self.cut_path in str(url):
            self.cut = True
            if self.after_send:
                super().post(url, **kwargs)  # the server got it; the answer is lost
            raise httpx.ConnectError("link down")
        return super().post(url, **kwargs)
