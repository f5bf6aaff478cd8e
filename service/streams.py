"""WebSocket /stream: realtime conversion, one `StreamConverter` per connection, blocks on the device thread.

Each block: `StreamConverter.begin` on the device thread ahead of queued work, in one call with the other
streams' blocks waiting then (one content-encoder forward for all: `RVCEngine.stream_blocks`); then, with the
pipelined worker, its synthesizer row goes to the worker's batcher, which synthesizes the blocks of every open
stream (any voices) in one batch, ahead of conversions' rows; then `finish` on the device thread. One at a time
(`RVC_LORA_BATCHING=false`) a block is `process`ed whole on the device thread.

Protocol (JSON text messages and binary audio frames; README "Realtime streams" has the full table):

1. The client sends a config message: `adapter` (id or name; absent or null = the base voice), `format`
   ("pcm16" or "float32", little-endian, interleaved), `sample_rate` (a multiple of 100 Hz), `channels`,
   the `StreamParams` fields (`block_time`, `crossfade_time`, `extra_time`, `threshold`, `f0_up_key`,
   `formant`, `f0_method`, `index_rate`, `rms_mix_rate`, `seed`), and `token` when the server has an API
   key and the client could not send `Authorization: Bearer` (browsers).
2. The server answers `{"type": "ready", "block_samples", "block_bytes", "latency_s", ...}`.
3. The client sends binary frames of any size; the server cuts them into blocks. For each block it sends
   `{"type": "block", "seq", "offset", "server_ms", "compute_ms", "late_blocks"}` and then one binary frame
   with the output block in the input's format and channel count.
4. Control messages, applied in stream order (from the next block on): `{"type": "update", <hot params>}`
   -> `{"type": "updated", "params"}`, `{"type": "reset"}` -> `{"type": "reset"}`, `{"type": "flush"}`
   (pads the partial block with zeros).

Close codes: 4400 malformed config or message, 4401 unauthorized, 4404 unknown adapter, 4408 client not
reading (or no config in time), 4413 more than `stream_buffer_s` of audio waiting, 4429 too many streams
(`max_streams`), 4503 not ready, shutting down, or the device out of memory opening the stream or for a block
(try again in a few seconds; `rvc_lora_stream_out_of_memory_total`), 1011 internal error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from numpy.typing import NDArray
from prometheus_client import Counter, Gauge, Histogram

from rvc_lora.errors import AdapterNotFoundError, ParameterError, RVCLoraError
from rvc_lora.stream.params import StreamParams
from service.auth import token_matches
from service.errors import DeviceOutOfMemory
from service.metrics import LATENCY_BUCKETS
from service.settings import Settings
from service.store import AdapterStore
from service.worker import Worker

log = logging.getLogger(__name__)

FORMATS: dict[str, np.dtype[Any]] = {"pcm16": np.dtype("<i2"), "float32": np.dtype("<f4")}
STREAM_KEYS = ("adapter", "format", "sample_rate", "channels", "token", "type")


class StreamClosed(Exception):
    """Ends a stream with a WebSocket close code and a reason the client sees."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason[:120]  # a close reason must fit in a control frame


@dataclass(frozen=True)
class StreamConfig:
    """The first message, validated: params + adapter reference + wire format."""

    params: StreamParams
    adapter: str | None
    format: str
    sample_rate: int
    channels: int

    @classmethod
    def parse(cls, text: str) -> tuple[StreamConfig, str | None]:
        """(config, token) from the first message; `StreamClosed(4400)` naming the field at fault."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StreamClosed(4400, f"config: not JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise StreamClosed(4400, "config: expected a JSON object")
        fmt, sr, channels = data.get("format", "pcm16"), data.get("sample_rate"), data.get("channels", 1)
        adapter, token = data.get("adapter"), data.get("token")
        if fmt not in FORMATS:
            raise StreamClosed(4400, f"config.format: {str(fmt)[:20]!r}, expected pcm16 or float32")
        if isinstance(sr, bool) or not isinstance(sr, int) or not 8000 <= sr <= 192000 or sr % 100:
            raise StreamClosed(4400, f"config.sample_rate: {str(sr)[:20]}, expected a multiple of 100 in 8000..192000")
        if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= 8:
            raise StreamClosed(4400, f"config.channels: {str(channels)[:20]}, expected 1..8")
        if adapter is not None and not isinstance(adapter, str):
            raise StreamClosed(4400, "config.adapter: expected an adapter id or name (a string) or null")
        if token is not None and not isinstance(token, str):
            raise StreamClosed(4400, "config.token: expected a string")
        try:
            params = StreamParams.from_dict({k: v for k, v in data.items() if k not in STREAM_KEYS})
        except (ParameterError, TypeError) as exc:
            raise StreamClosed(4400, f"config: {exc}") from exc
        return cls(params, adapter, fmt, sr, channels), token


@dataclass
class _Stats:
    received_s: float = 0.0
    started: float = field(default_factory=time.monotonic)
    late: int = 0
    seq: int = 0


class StreamMetrics:
    def __init__(self, registry: Any) -> None:
        self.open = Gauge("rvc_lora_streams_open", "open realtime streams", registry=registry)
        self.blocks = Counter("rvc_lora_stream_blocks_total", "realtime blocks converted", registry=registry)
        self.late = Counter("rvc_lora_stream_late_blocks_total", "realtime blocks sent later than one block time "
                            "after their input was complete", registry=registry)
        self.out_of_memory = Counter("rvc_lora_stream_out_of_memory_total", "realtime streams closed (4503) "
                                     "because the device ran out of memory opening them or for one of their blocks",
                                     registry=registry)
        self.closed = Counter("rvc_lora_streams_closed_total", "realtime streams ended, by close code", ["code"],
                              registry=registry)
        self.block_seconds = Histogram("rvc_lora_stream_block_seconds", "from a block's last input byte to its "
                                       "output being sent", buckets=LATENCY_BUCKETS, registry=registry)


class StreamHub:
    """The app's open streams: admission against `max_streams`, and the metrics."""

    def __init__(self, settings: Settings, metrics: StreamMetrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.open = 0

    @contextlib.contextmanager
    def slot(self) -> Any:
        if self.open >= self.settings.max_streams:
            raise StreamClosed(4429, f"{self.open} streams are open, the limit is {self.settings.max_streams}")
        self.open += 1
        self.metrics.open.set(self.open)
        try:
            yield
        finally:
            self.open -= 1
            self.metrics.open.set(self.open)


def decode_frames(data: bytes, dtype: np.dtype[Any], channels: int) -> NDArray[np.float32]:
    """Interleaved little-endian samples -> float32 `[n]` (mono) or `[n, channels]`, PCM16 scaled by 1/32768."""
    x = np.frombuffer(data, dtype=dtype).astype(np.float32)
    if dtype.kind == "i":
        x /= 32768
    return x if channels == 1 else x.reshape(-1, channels)


def encode_frames(audio: NDArray[np.float32], dtype: np.dtype[Any]) -> bytes:
    """float32 `[n]` or `[n, channels]` -> interleaved little-endian bytes (PCM16: `x * 32768`, clipped)."""
    if dtype.kind == "i":
        return np.clip(np.round(audio * 32768), -32768, 32767).astype(dtype).tobytes()
    return audio.astype(dtype).tobytes()


class StreamSession:
    """One WebSocket stream: receives and re-blocks audio, converts in order on the device thread, sends back."""

    def __init__(self, ws: WebSocket, hub: StreamHub, worker: Worker, store: AdapterStore) -> None:
        self.ws, self.hub, self.worker, self.store = ws, hub, worker, store
        self.settings = hub.settings
        self.stats = _Stats()
        self.inbox: asyncio.Queue[tuple[str, Any, float]] = asyncio.Queue()
        self.waiting_blocks = 0
        self.engine: Any = None
        self.sending_since: float | None = None  # when the pump started the send it is waiting in

    async def run(self) -> None:
        await self.ws.accept()
        code, reason = 1000, "end of stream"
        try:
            with self.hub.slot():
                await self._serve()
        except StreamClosed as exc:
            code, reason = exc.code, exc.reason
        except WebSocketDisconnect:
            code, reason = 1000, "client closed"
        except Exception:
            log.exception("stream failed")
            code, reason = 1011, "internal error; the server log has the details"
        self.hub.metrics.closed.labels(code=str(code)).inc()
        log.info("stream closed", extra={"code": code, "reason": reason, "blocks": self.stats.seq,
                                         "late_blocks": self.stats.late})
        with contextlib.suppress(Exception):
            await self.ws.close(code, reason)

    async def _serve(self) -> None:
        settings = self.settings
        try:
            text = await asyncio.wait_for(self.ws.receive_text(), settings.header_timeout_s)
        except asyncio.TimeoutError as exc:
            raise StreamClosed(4408, f"no config message within {settings.header_timeout_s:g} s") from exc
        except KeyError as exc:  # a binary frame where the config should be
            raise StreamClosed(4400, "the first message must be the JSON config, got binary data") from exc
        config, token = StreamConfig.parse(text)
        self._authorize(token)
        stream = await self._open(config)
        block = stream.block_frame
        dtype = FORMATS[config.format]
        frame_bytes = dtype.itemsize * config.channels
        await self.ws.send_json({"type": "ready", "block_samples": block, "block_bytes": block * frame_bytes,
                                 "sample_rate": config.sample_rate, "channels": config.channels,
                                 "format": config.format, "latency_s": stream.sizes.latency_samples / stream.sr,
                                 "seed": stream.seed, "params": stream.params.to_dict(),
                                 "buffer_blocks": self._limit(block / stream.sr)})
        pump = asyncio.create_task(self._pump(stream, dtype))
        try:
            await self._receive(config, block * frame_bytes, block / stream.sr, pump)
        finally:
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump

    def _authorize(self, token: str | None) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, header_token = (self.ws.headers.get("authorization") or "").partition(" ")
        presented = header_token if scheme.lower() == "bearer" else token
        if presented is None or not token_matches(presented, key.get_secret_value()):
            raise StreamClosed(4401, "missing or invalid API key: send 'Authorization: Bearer <key>' or "
                                     "'token' in the config message")

    async def _open(self, config: StreamConfig) -> Any:
        worker = self.worker
        if worker.state in ("draining", "stopped", "failed"):
            raise StreamClosed(4503, f"the server is {worker.state}; retry on another replica")
        try:
            engine = await worker.engine(timeout=self.settings.header_timeout_s)
        except RVCLoraError as exc:
            raise StreamClosed(4503, str(exc)) from exc
        info = engine.info
        self.engine = engine
        if info.f0 and config.params.f0_method not in info.f0_methods:
            raise StreamClosed(4400, f"config.f0_method: {config.params.f0_method!r} is not available here "
                                     f"(available: {', '.join(info.f0_methods)})")
        open_stream = getattr(engine, "open_stream", None)
        if open_stream is None:
            raise StreamClosed(4503, "this server's engine does not support realtime streams")
        rec = None
        if config.adapter is not None:
            try:
                rec = self.store.resolve(config.adapter)
            except AdapterNotFoundError as exc:
                raise StreamClosed(4404, str(exc)) from exc

        def build() -> Any:  # on the device thread; the stream holds its voice, so a later delete cannot take it
            voice = None if rec is None else worker.voice(rec)[0]
            return open_stream(config.params, config.sample_rate, config.channels, voice)

        stage = getattr(engine, "stream_stage", None)  # device out of memory -> DeviceOutOfMemory (the engine's rule)
        with self.store.lease(rec):
            try:
                return await worker.on_device(build if stage is None else functools.partial(stage, build))
            except DeviceOutOfMemory as exc:  # loading the voice into a bank slot, or the stream's buffers
                self.hub.metrics.out_of_memory.inc()
                raise StreamClosed(4503, f"opening the stream: {exc}") from exc
            except AdapterNotFoundError as exc:
                raise StreamClosed(4404, str(exc)) from exc
            except ParameterError as exc:
                raise StreamClosed(4400, f"config: {exc}") from exc

    async def _receive(self, config: StreamConfig, block_bytes: int, block_s: float, pump: asyncio.Task[None]) -> None:
        pending = bytearray()
        limit = self._limit(block_s)
        while True:
            receiving = asyncio.ensure_future(self.ws.receive())
            done, _ = await asyncio.wait({receiving, pump}, return_when=asyncio.FIRST_COMPLETED)
            if pump in done:
                receiving.cancel()
                pump.result()  # re-raises the pump's StreamClosed
                return
            message = receiving.result()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            if message.get("bytes") is not None:
                pending += message["bytes"]
                self.stats.received_s += len(message["bytes"]) / (block_bytes / block_s)
                while len(pending) >= block_bytes:
                    self._queue_block(bytes(pending[:block_bytes]), limit, block_s)
                    del pending[:block_bytes]
            elif message.get("text") is not None:
                control = self._control(message["text"])
                if control == "flush" and pending:
                    self._queue_block(bytes(pending) + bytes(block_bytes - len(pending)), limit, block_s)
                    pending.clear()
                elif control != "flush":
                    self.inbox.put_nowait(("control", control, time.monotonic()))

    def _limit(self, block_s: float) -> int:
        """Blocks that may wait for conversion: `stream_buffer_s` of audio, at least one."""
        return max(1, math.floor(self.settings.stream_buffer_s / block_s + 1e-9))

    def _queue_block(self, data: bytes, limit: int, block_s: float) -> None:
        if self.waiting_blocks >= limit and self.sending_since is not None:
            raise StreamClosed(4408, f"the client has not taken its output for "
                                     f"{time.monotonic() - self.sending_since:.1f} s and input keeps coming")
        if self.waiting_blocks >= limit:
            elapsed = time.monotonic() - self.stats.started
            raise StreamClosed(4413, f"more than {self.settings.stream_buffer_s:g} s of audio waiting: "
                                     f"{self.stats.received_s:.1f} s received in {elapsed:.1f} s "
                                     f"({self.stats.late} late blocks)")
        self.waiting_blocks += 1
        self.inbox.put_nowait(("block", data, time.monotonic()))

    def _control(self, text: str) -> Any:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StreamClosed(4400, f"control message: not JSON ({exc})") from exc
        kind = data.get("type") if isinstance(data, dict) else None
        if kind in ("reset", "flush"):
            return kind
        if kind != "update":
            raise StreamClosed(4400, f"control message type {str(kind)[:20]!r}: expected update, reset or flush")
        return {k: v for k, v in data.items() if k != "type"}

    async def _pump(self, stream: Any, dtype: np.dtype[Any]) -> None:
        """Converts queued blocks in order on the device thread and sends each back, with its header."""
        block_s = stream.block_frame / stream.sr
        while True:
            kind, payload, arrived = await self.inbox.get()
            if kind == "control":
                await self._apply(stream, payload)
                continue
            self.waiting_blocks -= 1
            x = decode_frames(payload, dtype, stream.channels)
            try:
                result = await self._convert(stream, x, block_s)
            except DeviceOutOfMemory as exc:  # the server's limit, not the client's fault: it may try again
                self.hub.metrics.out_of_memory.inc()
                raise StreamClosed(4503, f"block {self.stats.seq}: {exc}") from exc
            except RVCLoraError as exc:
                raise StreamClosed(4400, f"block {self.stats.seq}: {exc}") from exc
            wait_s = time.monotonic() - arrived
            if wait_s > block_s:
                self.stats.late += 1
                self.hub.metrics.late.inc()
            header = {"type": "block", "seq": self.stats.seq, "offset": result.offset,
                      "server_ms": round(wait_s * 1000, 2), "compute_ms": round(result.timings["total"] * 1000, 2),
                      "late_blocks": self.stats.late}
            try:
                await asyncio.wait_for(self._send(header, encode_frames(result.audio, dtype)),
                                       self.settings.stream_send_timeout_s)
            except asyncio.TimeoutError as exc:
                raise StreamClosed(4408, f"the client took no output for {self.settings.stream_send_timeout_s:g} s"
                                   ) from exc
            self.hub.metrics.blocks.inc()
            self.hub.metrics.block_seconds.observe(time.monotonic() - arrived)
            self.stats.seq += 1

    async def _convert(self, stream: Any, x: NDArray[np.float32], block_s: float) -> Any:
        """One block -> its `StreamBlock`: in stages, its synthesis batched with other streams' blocks (pipelined
        worker, an engine that cuts stream blocks), else whole on the device thread."""
        worker, engine = self.worker, self.engine
        stage = engine.stream_stage  # device out of memory -> DeviceOutOfMemory (the engine's rule)
        cut = getattr(engine, "stream_blocks", None)
        if cut is None:  # an engine that does not cut blocks: the stream alone
            return await worker.on_device(functools.partial(stage, functools.partial(stream.process, x)))
        if not worker.batches_rows:  # whole, in the stream's adapter bank slot
            return await worker.on_device(functools.partial(stage, functools.partial(engine.stream_process, stream, x)))
        step, row = await worker.stream_step((stream, x), cut)  # with the other streams' blocks ready now
        if row is None:  # a shifted formant: synthesized alone, in the stream's bank slot
            alone = functools.partial(engine.stream_alone, stream, step)
            return await worker.on_device(functools.partial(stage, alone))
        audio = await worker.synthesize_block(row, block_s)
        return await worker.on_device(functools.partial(stage, functools.partial(stream.finish, step, audio)))

    async def _send(self, header: dict[str, Any], data: bytes) -> None:
        self.sending_since = time.monotonic()
        try:
            await self.ws.send_text(json.dumps(header))
            await self.ws.send_bytes(data)
        finally:
            self.sending_since = None

    async def _apply(self, stream: Any, control: Any) -> None:
        if control == "reset":
            await self.worker.on_device(stream.reset)
            await self.ws.send_json({"type": "reset"})
            return
        def update() -> StreamParams:
            params: StreamParams = stream.update(**control)
            return params

        try:
            params = await self.worker.on_device(update)
        except (ParameterError, TypeError) as exc:
            await self.ws.send_json({"type": "error", "code": "invalid_parameter", "message": str(exc)})
            return
        await self.ws.send_json({"type": "updated", "params": params.to_dict()})


OPENAPI_NOTE = """

**Realtime streams: `WebSocket /stream`** (OpenAPI cannot describe WebSockets; the README has the full protocol).
First message: JSON config (`adapter`, `format` pcm16|float32, `sample_rate`, `channels`, RVC's realtime parameters,
`token` when no `Authorization` header can be sent); the server answers `{"type": "ready", ...}`. Then binary audio
frames of any size in; per block a JSON header (`seq`, `offset`, `server_ms`, `compute_ms`, `late_blocks`) and one
binary frame out. `{"type": "update", ...}` changes pitch, formant, index rate, gate or RMS mix from the next block.
Close codes: 4400 malformed, 4401 unauthorized, 4404 unknown adapter, 4408 client not reading, 4413 sending faster
than realtime past the buffer, 4429 too many streams, 4503 not ready or out of device memory (try again)."""


def register(app: FastAPI) -> None:
    """Add `WebSocket /stream` to `app` (its settings, worker and store come from `app.state`)."""
    app.description += OPENAPI_NOTE
    settings: Settings = app.state.settings
    hub = StreamHub(settings, StreamMetrics(app.state.metrics.registry))
    app.state.streams = hub

    @app.websocket("/stream")
    async def stream(ws: WebSocket) -> None:
        await StreamSession(ws, hub, ws.app.state.worker, ws.app.state.store).run()
