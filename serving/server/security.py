"""Who may call the server: an ASGI guard in front of every route (ours and any added later).

Trust model: a client that can open a TCP connection to the port is trusted (it can push weights);
bind to loopback or set an API key to narrow that. What the guard stops is a *browser* being used
as that client by a web page the user visits:
  * a foreign `Origin` (or a cross-site `Sec-Fetch-Site`) is refused unless --allowed-origins
    names it: browsers send one on every cross-origin POST, even the "simple" ones that skip the
    CORS preflight;
  * a `Host` that is not an IP literal, a loopback name, the bound address or this machine's name
    is refused unless --allowed-hosts names it: that is DNS rebinding (an attacker's domain
    re-pointed at 127.0.0.1);
  * a request with a body must say `Content-Type: application/json`, which no simple
    cross-origin request can;
  * with an API key, every route but /health* and /metrics needs `Authorization: Bearer KEY`.
Refusals are JSON errors (401, 403 or 415) that name the header.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from rollout_accel.serving.server.settings import ServerSettings

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

_UNAUTHENTICATED_PREFIXES = ("/health", "/metrics")
_BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def _split_host(value: str) -> str:
    """The host part of a Host header / URL netloc, lower-cased, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        return value.rsplit(":", 1)[0]
    return value


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class RequestGuard:
    """ASGI middleware enforcing the trust rules in the module docstring."""

    def __init__(
        self, app: ASGIApp, settings: ServerSettings, bound_host: str, api_key: str | None
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.any_origin = "*" in settings.allowed_origins
        self.origins = {o.rstrip("/").lower() for o in settings.allowed_origins}
        self.any_host = "*" in settings.allowed_hosts
        names = set(_LOOPBACK_NAMES) | {_split_host(h) for h in settings.allowed_hosts}
        names.add(_split_host(bound_host))
        for name in (socket.gethostname(), socket.getfqdn()):
            if name:
                names.add(name.lower())
        self.hosts = names

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(scope["method"], scope["path"], headers)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, message = refusal
        body = json.dumps({"error": {"message": message, "code": status}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def refusal(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str] | None:
        """(status, message) when the request must be refused, else None."""
        host = headers.get("host")
        if host is not None and not self.any_host:
            name = _split_host(host)
            if not _is_ip(name) and name not in self.hosts:
                return 403, f"Host: {name!r} is not served here (pass --allowed-hosts to allow it)"
        origin = headers.get("origin")
        if origin is not None and not self._origin_ok(origin, host):
            return 403, f"Origin: {origin!r} is not allowed (pass --allowed-origins to allow it)"
        site = headers.get("sec-fetch-site")
        if site in ("cross-site", "same-site") and not (
            origin is not None and self._origin_ok(origin, host)
        ):
            return 403, f"Sec-Fetch-Site: {site} requests are not allowed without an allowed Origin"
        needs_key = (
            self.api_key and method != "OPTIONS" and not path.startswith(_UNAUTHENTICATED_PREFIXES)
        )
        if needs_key and headers.get("authorization") != f"Bearer {self.api_key}":
            return 401, "Authorization: missing or wrong API key"
        if method in _BODY_METHODS and _has_body(headers):
            kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if kind != "application/json":
                return 415, f"Content-Type: expected application/json, got {kind or 'none'!r}"
        return None

    def _origin_ok(self, origin: str, host: str | None) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if self.any_origin or origin in self.origins:
            return True
        # Same origin: a page served by this very server (the /docs UI) under the Host asked for.
        netloc = urlsplit(origin).netloc
        return bool(netloc) and host is not None and netloc == host.strip().lower()


def _has_body(headers: dict[str, str]) -> bool:
    if "transfer-encoding" in headers:
        return True
    try:
        return int(headers.get("content-length", "0")) > 0
    except ValueError:
        return True
