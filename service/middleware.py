"""Pure ASGI middleware (no BaseHTTPMiddleware: the request keeps one task, one context, its receive).

`RequestContext`: request id (header, log context, `request.state`), arrival time, access log, metrics.
`BodyLimit`: the per-route upload cap, enforced while the body streams in: past it the client gets 413
at once and the app sees a disconnect, so no oversized upload is ever fully received. Likewise a body that
stalls (idle timeout) or keeps trickling (total timeout) gets 408: a slow client cannot hold a connection
and a request slot for ever; and a multipart body that ends before its closing boundary (cut short, or a
Content-Length below its size) gets 400, where the form parser would silently drop its last field.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import MalformedBody, PayloadTooLarge, ServiceError, ServiceStopping, UploadTimeout
from service.handlers import error_json
from service.logs import REQUEST_ID
from service.metrics import Metrics

log = logging.getLogger("service.access")

INCOMING_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get("x-request-id", "")
        request_id = incoming if INCOMING_ID.fullmatch(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["arrived"] = asyncio.get_running_loop().time()
        token = REQUEST_ID.set(request_id)
        status, start, started = 500, time.perf_counter(), False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # the server cancels what is still running when its shutdown grace period ends: the client gets a
            # retryable 503 (a load balancer sends it elsewhere), not a 500
            if not started:
                exc = ServiceStopping("the server shut down before this request finished; retry on another replica",
                                      retry_after=5)
                with contextlib.suppress(Exception):
                    await error_json(exc.status, exc.code, str(exc), {"Retry-After": "5", "Connection": "close"})(
                        scope, receive, send_with_id)
            raise
        finally:
            elapsed = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or "unmatched"  # the template: bounded labels
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(route=route, method=method, status=str(status)).inc()
            self.metrics.request_seconds.labels(route=route).observe(elapsed)
            log.info("request", extra={"request_id": request_id, "method": method, "route": route, "status": status,
                                       "duration_ms": round(elapsed * 1000, 2)})
            REQUEST_ID.reset(token)


class ClosingBoundary:
    """Watches a multipart body stream for its closing delimiter `--<boundary>--` (RFC 2046), which may span
    chunks. Without it the body was cut short: the form parser would take what came as the whole form."""

    def __init__(self, content_type: str) -> None:
        media_type, _, params = content_type.partition(";")
        boundary = next((value.strip().strip('"') for key, _, value in (p.partition("=") for p in params.split(";"))
                         if key.strip().lower() == "boundary"), "")
        self.active = media_type.strip().lower() == "multipart/form-data" and bool(boundary)
        self._delimiter = f"--{boundary}--".encode("latin-1", "replace")
        self._tail = b""
        self.seen = False

    def feed(self, chunk: bytes) -> None:
        if not self.active or self.seen:
            return
        window = self._tail + chunk
        self.seen = self._delimiter in window
        self._tail = window[-(len(self._delimiter) - 1):]


class BodyLimit:
    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], int], idle_timeout_s: float = 30.0,
                 total_timeout_s: float = 600.0) -> None:
        self.app = app
        self.limit_for = limit_for  # (method, path) -> bytes
        self.idle_timeout_s, self.total_timeout_s = idle_timeout_s, total_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        too_large = PayloadTooLarge(f"request body is larger than the limit of {limit} bytes for this route")
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        closing = ClosingBoundary(headers.get("content-type", ""))
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(too_large, scope, receive, send)
            return
        received, refused, started, body_done = 0, False, False, False
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.total_timeout_s

        async def refuse(exc: ServiceError) -> Message:
            nonlocal refused
            refused = True
            if not started:
                await self._refuse(exc, scope, receive, send)
            return {"type": "http.disconnect"}  # the app stops reading; its reply is dropped

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if refused:
                return {"type": "http.disconnect"}
            if body_done:  # after the body, receive() waits for a disconnect: no deadline applies
                return await receive()
            wait = min(self.idle_timeout_s, give_up_at - loop.time())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.0))
            except TimeoutError:
                return await refuse(UploadTimeout(
                    f"the request body stalled: nothing arrived for {self.idle_timeout_s:g} s"
                    if wait == self.idle_timeout_s else
                    f"the request body took longer than {self.total_timeout_s:g} s to arrive"))
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                body_done = not message.get("more_body", False)
                if received > limit:
                    return await refuse(too_large)
                closing.feed(chunk)
                if body_done and closing.active and not closing.seen:
                    return await refuse(MalformedBody("the multipart body ends before its closing boundary: it was "
                                                      "cut short, or its Content-Length is less than its size"))
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    @staticmethod
    async def _refuse(exc: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_json(exc.status, exc.code, str(exc), {"Connection": "close"})
        await response(scope, receive, send)
