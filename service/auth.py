"""API-key check: `Authorization: Bearer <key>` on every route but health, readiness, metrics and the web
console's static files (the page asks for the key and sends it with its API calls).

It runs as ASGI middleware, before the body is read: an unauthenticated upload is refused without
being received. Keys are compared as sha256 digests with `hmac.compare_digest`: constant time, and
independent of the presented key's length.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi.security import HTTPBearer
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import Unauthorized
from service.handlers import error_json

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# the web console's page and static files, to read only: no data in them, and the page asks for the key itself
CONSOLE_PAGE, CONSOLE_PREFIX = "/", "/console/"
READ = frozenset({"GET", "HEAD"})


def is_open(scope: Scope) -> bool:
    path: str = scope["path"]
    return path in OPEN_PATHS or (scope["method"] in READ and (path == CONSOLE_PAGE or path.startswith(CONSOLE_PREFIX)))

# documents the scheme in OpenAPI; the check itself is `BearerAuth` below
bearer_scheme = HTTPBearer(auto_error=False, description="required when RVC_LORA_API_KEY is set")


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def token_matches(token: str, api_key: str) -> bool:
    """Constant-time comparison of a presented token with the key (WebSocket clients send it in a message)."""
    return hmac.compare_digest(_digest(token.strip()), _digest(api_key.strip()))


class BearerAuth:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        if not api_key.strip():
            raise ValueError("the API key is empty: every 'Bearer ' header would match it")
        self.app = app
        self._key_digest = _digest(api_key.strip())

    def authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        presented = _digest(token.strip()) if scheme.lower() == "bearer" else b""
        return hmac.compare_digest(presented, self._key_digest)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope):
            await self.app(scope, receive, send)
            return
        if self.authorized(Headers(scope=scope).get("authorization")):
            await self.app(scope, receive, send)
            return
        exc = Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")
        await error_json(exc.status, exc.code, str(exc), {"WWW-Authenticate": "Bearer"})(scope, receive, send)
