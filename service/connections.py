"""Connection-level limits of the HTTP server: what uvicorn lacks against idle and slow clients.

uvicorn times out nothing before a request head is complete, and its `limit_concurrency` counts open
connections: a thousand silent sockets made every request a plain-text 503 (health checks included, in
neither the access log nor the metrics). Here instead:

- a connection must deliver each request head within `head_timeout_s` of connecting or of its previous
  response, else it is closed (408 when it had sent part of a head); trickling header bytes does not reset it;
- a client must read its response: one that takes nothing of it for `send_idle_timeout_s` is disconnected
  (the unsent rest of a response, megabytes of audio, would otherwise stay in memory for as long as it likes);
- past `limit` open connections, the oldest idle ones (waiting for a request head) are closed to make room,
  so idle sockets cannot lock anyone out;
- past `limit` requests in progress, new requests get a JSON 503 `overloaded` with Retry-After, except the
  health routes, which always answer;
- open connections, the limit, requests in progress and every closing are in `/metrics`.

`Connections` is shared by the protocol class (`protocol_class`, given to uvicorn) and the `ConnectionLimit`
middleware. Everything runs on the event loop: no locking.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import HeadTooLarge, Overloaded
from service.handlers import error_json
from service.metrics import Metrics

log = logging.getLogger(__name__)

HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
OVERLOAD_RETRY_S = 1
MAX_HEAD_BYTES, MAX_HEADERS = 16 * 1024, 100  # h11's own bound on an incomplete head; nginx's field count


class Connections:
    """Open connections (idle ones in arrival order) and requests in progress."""

    def __init__(self, limit: int, head_timeout_s: float, metrics: Metrics, send_idle_timeout_s: float = 30.0) -> None:
        self.limit, self.head_timeout_s, self.send_idle_timeout_s = limit, head_timeout_s, send_idle_timeout_s
        self.in_flight = 0
        self._open: set[Any] = set()
        self._idle: OrderedDict[Any, asyncio.TimerHandle] = OrderedDict()  # connection -> its head timer
        self._metrics = metrics
        metrics.connection_limit.set(limit)

    @property
    def open(self) -> int:
        return len(self._open)

    def opened(self, conn: Any) -> None:
        self._open.add(conn)
        while len(self._open) > self.limit and self._idle:  # the oldest idle sockets make room
            oldest = next(iter(self._idle))
            self._close(oldest, "evicted")
        self.wait_for_head(conn)
        self._metrics.open_connections.set(len(self._open))

    def closed(self, conn: Any) -> None:
        self._open.discard(conn)
        self.busy(conn)
        self._metrics.open_connections.set(len(self._open))

    def wait_for_head(self, conn: Any) -> None:
        """`conn` waits for a request head (just connected, or its last response is out): idle, on a timer.
        While the last response is still being read, the client's reading is watched instead."""
        if conn in self._open and conn not in self._idle and not conn.in_request():
            loop = asyncio.get_running_loop()
            unsent = conn.unsent_bytes()
            if unsent:
                loop.call_later(self.send_idle_timeout_s, self._check_reading, conn, unsent)
                return
            self._idle[conn] = loop.call_later(self.head_timeout_s, self._head_timed_out, conn)

    def _check_reading(self, conn: Any, unsent_before: int) -> None:
        if conn not in self._open or conn.in_request():  # read it all and asked again meanwhile
            return
        unsent = conn.unsent_bytes()
        if unsent and unsent >= unsent_before:  # nothing read for send_idle_timeout_s
            self._open.discard(conn)
            self._metrics.connections_closed.labels(reason="send_stalled").inc()
            self._metrics.open_connections.set(len(self._open))
            conn.abort()
        else:
            self.wait_for_head(conn)

    def busy(self, conn: Any) -> None:
        """A request head arrived on `conn` (or it closed): no longer idle."""
        timer = self._idle.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def _head_timed_out(self, conn: Any) -> None:
        if conn in self._idle:
            self._close(conn, "head_timeout")

    def _close(self, conn: Any, reason: str) -> None:
        self.busy(conn)
        self._open.discard(conn)  # now: its transport reports the loss a loop turn later
        self._metrics.connections_closed.labels(reason=reason).inc()
        self._metrics.open_connections.set(len(self._open))
        conn.close_idle(reason)


def protocol_class(connections: Connections) -> type[H11Protocol]:
    """uvicorn's h11 protocol, reporting to `connections` (pass it as `uvicorn.Config(http=...)`)."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            connections.opened(self)

        def connection_lost(self, exc: Exception | None) -> None:
            connections.closed(self)
            super().connection_lost(exc)

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request head was parsed: a new request-response cycle
                connections.busy(self)

        def handle_websocket_upgrade(self, event: Any) -> None:
            connections.closed(self)  # the socket now belongs to the websocket protocol, which counts itself
            super().handle_websocket_upgrade(event)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                connections.wait_for_head(self)

        def in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def unsent_bytes(self) -> int:
            return 0 if self.transport.is_closing() else int(self.transport.get_write_buffer_size())

        def abort(self) -> None:
            self.transport.abort()  # close() would wait for the client to read what is buffered

        def close_idle(self, reason: str) -> None:
            """Close this connection, which has no request in progress; 408 if part of a head had arrived."""
            if self.transport.is_closing():
                return
            partial = bool(self.conn.trailing_data[0])
            if partial and reason == "head_timeout":
                body = json.dumps({"error": {"code": "request_timeout", "message": "the request head did not "
                                             f"arrive within {connections.head_timeout_s:g} s"}}).encode()
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    return GuardedH11Protocol


class ConnectionLimit:
    """Past `limit` requests in progress, a request gets 503 `overloaded` at once, health routes excepted; a request
    head of more than `MAX_HEAD_BYTES` or `MAX_HEADERS` fields gets 431 (h11 bounds only a head that arrives in
    pieces: one read of up to 256 KB was taken whole). Sits inside `RequestContext`, so these refusals are
    logged and counted like any response."""

    def __init__(self, app: ASGIApp, connections: Connections, metrics: Metrics) -> None:
        self.app, self.connections, self.metrics = app, connections, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conns = self.connections
        head = scope["headers"]
        if len(head) > MAX_HEADERS or sum(len(k) + len(v) for k, v in head) > MAX_HEAD_BYTES:
            too_large = HeadTooLarge(f"request headers: {len(head)} fields, at most {MAX_HEADERS} fields and "
                               f"{MAX_HEAD_BYTES} bytes are accepted")
            await error_json(too_large.status, too_large.code, str(too_large), {"Connection": "close"})(
                scope, receive, send)
            return
        if conns.in_flight >= conns.limit and scope["path"] not in HEALTH_PATHS:
            self.metrics.rejected.labels(reason="connections").inc()
            exc = Overloaded(f"{conns.in_flight} requests are in progress, the limit is {conns.limit}; retry shortly")
            await error_json(exc.status, exc.code, str(exc), {"Retry-After": str(OVERLOAD_RETRY_S)})(
                scope, receive, send)
            return
        conns.in_flight += 1
        self.metrics.in_flight.set(conns.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            conns.in_flight -= 1
            self.metrics.in_flight.set(conns.in_flight)
