"""The project's one rule for its local HTTP servers (``qwen-cls dashboard`` and ``qwen-cls serve``, which notebook
07 starts): answer only requests addressed to the server's own host and port (a page on another site cannot
reach it through DNS rebinding), accept changes (POST, PUT, DELETE) only from the server's own pages, and
refuse another site's page that fetches the API.

Plumbing under: 07 (the server 07 starts in the background is guarded by it).
"""

from __future__ import annotations

import ipaddress
import json

HOST = "127.0.0.1"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}  # they change nothing


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and the loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def request_headers(scope) -> dict[str, str]:
    """An ASGI request's headers by lower-case name (a repeated header: its last value)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


class LocalGuard:
    """ASGI wrapper with the rule above. ``hosts``: the ``Host`` values (``name:port``, lower case) the server
    answers; ``check_host=False`` answers any (``serve`` bound beyond loopback, where its API key guards it);
    ``cross_site_prefix``: the paths another site's page may not fetch. A subclass writes its refusals
    (``refuse``, with the messages in ``messages``) and guards more in ``inner`` (the request passed the rule)."""

    messages = {"host": "this server answers only requests to {base}",
                "origin": "requests from another site's page are refused",
                "cross-site": "requests from another site's page are refused"}

    def __init__(self, app, hosts: set[str], *, base: str, check_host: bool = True, cross_site_prefix: str = "/"):
        self.app, self.base, self.check_host, self.cross_site_prefix = app, base, check_host, cross_site_prefix
        self.hosts = {h.lower() for h in hosts}
        self.origins = {f"http://{h}" for h in self.hosts}

    def refusal(self, scope, headers: dict[str, str]) -> str | None:
        """Which part of the rule the request breaks (a key of ``messages``), or None."""
        if self.check_host and headers.get("host", "").lower() not in self.hosts:
            return "host"
        origin = headers.get("origin")
        if scope.get("method", "GET") not in SAFE_METHODS and origin is not None and origin.lower() not in self.origins:
            return "origin"
        if scope["path"].startswith(self.cross_site_prefix) and headers.get("sec-fetch-site") == "cross-site":
            return "cross-site"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = request_headers(scope)
        broken = self.refusal(scope, headers)
        if broken is not None:
            return await self.refuse(send, 403, self.messages[broken].format(base=self.base))
        return await self.inner(scope, receive, send, headers)

    async def inner(self, scope, receive, send, headers: dict[str, str]):
        """The request kept the rule: hand it on (a subclass adds its own checks)."""
        return await self.app(scope, receive, send)

    async def refuse(self, send, status: int, message: str, headers: list | None = None) -> None:
        """A JSON answer ``{"detail": message}`` (FastAPI's shape) with ``status`` and any extra ``headers``."""
        body = json.dumps({"detail": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *(headers or [])]})
        await send({"type": "http.response.body", "body": body})
