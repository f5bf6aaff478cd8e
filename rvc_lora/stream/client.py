"""`StreamClient`: a small synchronous client for the service's `WebSocket /stream` (protocol in the README).

    with StreamClient("ws://127.0.0.1:8000/stream", sample_rate=48000, adapter="alice", api_key=key) as client:
        out = client.convert(audio)              # float32 [N] or [N, channels]; realtime pacing: realtime=True
        client.update(f0_up_key=3)               # hot change, from the next block on
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from rvc_lora.errors import RVCLoraError
from rvc_lora.stream.params import StreamParams

FORMATS: dict[str, np.dtype[Any]] = {"pcm16": np.dtype("<i2"), "float32": np.dtype("<f4")}


class StreamError(RVCLoraError):
    """The server closed the stream or refused a message; `close_code` is the WebSocket close code (4xxx are the
    server's: 4400 malformed, 4401 unauthorized, 4404 unknown adapter, 4408 not reading, 4413 too fast, 4429 too
    many streams, 4503 not ready)."""

    code = "stream_closed"

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


@dataclass
class OutputBlock:
    """One converted block: float32 `[block]` or `[block, channels]`, and the server's header for it
    (seq, offset, server_ms, compute_ms, late_blocks)."""

    audio: NDArray[np.float32]
    header: dict[str, Any]


class StreamClient:
    """One stream. `params`: the stream's settings (block, crossfade, pitch, ...); `format`: the wire format
    both ways (float32 is lossless, pcm16 is half the bytes); `api_key`: sent as `Authorization: Bearer`, or
    as the config's `token` with `token_in_config=True` (what browsers must do)."""

    def __init__(self, url: str, *, sample_rate: int, channels: int = 1, adapter: str | None = None,
                 params: StreamParams | None = None, format: str = "float32", api_key: str | None = None,
                 token_in_config: bool = False, open_timeout: float = 30.0) -> None:
        if format not in FORMATS:
            raise ValueError(f"format must be pcm16 or float32, got {format!r}")
        self.dtype, self.channels = FORMATS[format], channels
        headers = {"Authorization": f"Bearer {api_key}"} if api_key and not token_in_config else None
        try:
            self.ws: ClientConnection = connect(url, additional_headers=headers, open_timeout=open_timeout,
                                                max_size=None)
        except (OSError, ConnectionClosed) as exc:
            raise StreamError(f"cannot open {url}: {exc}") from exc
        config: dict[str, Any] = {"adapter": adapter, "format": format, "sample_rate": sample_rate,
                                  "channels": channels, **(params or StreamParams()).to_dict()}
        if api_key and token_in_config:
            config["token"] = api_key
        self.ws.send(json.dumps(config))
        self.ready = self._message()
        if self.ready.get("type") != "ready":
            raise StreamError(f"unexpected answer to the config: {self.ready}")
        self.block_samples: int = self.ready["block_samples"]
        self.sample_rate = sample_rate
        self.latency_samples = round(self.ready["latency_s"] * sample_rate)
        self.sent_blocks = 0
        self._sent_bytes = 0

    def __enter__(self) -> StreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.ws.close()

    def _message(self, timeout: float | None = None) -> dict[str, Any]:
        try:
            raw = self.ws.recv(timeout)
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            code = None if rcvd is None else rcvd.code
            reason = "" if rcvd is None else rcvd.reason
            raise StreamError(f"the server closed the stream: {code} {reason}", code) from exc
        if isinstance(raw, bytes):
            raise StreamError("expected a JSON message, got binary data")
        data: dict[str, Any] = json.loads(raw)
        if data.get("type") == "error":
            raise StreamError(f"{data.get('code')}: {data.get('message')}")
        return data

    def send(self, audio: ArrayLike) -> None:
        """Audio of any length, float32 `[n]` or `[n, channels]` in [-1, 1]; the server re-blocks it."""
        x = np.asarray(audio, dtype=np.float32)
        data = (np.clip(np.round(x * 32768), -32768, 32767) if self.dtype.kind == "i" else x).astype(self.dtype)
        self._sent_bytes += data.nbytes
        self.sent_blocks = self._sent_bytes // (self.block_samples * self.dtype.itemsize * self.channels)
        try:
            self.ws.send(data.tobytes())
        except ConnectionClosed as exc:
            code = None if exc.rcvd is None else exc.rcvd.code
            raise StreamError(f"the server closed the stream: {exc}", code) from exc

    def receive(self, timeout: float | None = None) -> OutputBlock:
        """The next output block (JSON messages in between, e.g. `updated`, are skipped)."""
        while True:
            header = self._message(timeout)
            if header.get("type") == "block":
                break
        try:
            raw = self.ws.recv(timeout)
        except ConnectionClosed as exc:
            raise StreamError(f"the server closed the stream: {exc}") from exc
        assert isinstance(raw, bytes)
        x = np.frombuffer(raw, dtype=self.dtype).astype(np.float32)
        if self.dtype.kind == "i":
            x /= 32768
        return OutputBlock(x if self.channels == 1 else x.reshape(-1, self.channels), header)

    def update(self, **changes: Any) -> None:
        """Change hot settings (f0_up_key, formant, index_rate, threshold, rms_mix_rate, f0_method) from the next
        block sent on; the server confirms with an `updated` message, which `receive` skips."""
        self.ws.send(json.dumps({"type": "update", **changes}))

    def reset(self) -> None:
        self.ws.send(json.dumps({"type": "reset"}))

    def convert(self, audio: ArrayLike, *, realtime: bool = False,
                window: int | None = None) -> tuple[NDArray[np.float32], list[dict[str, Any]]]:
        """Stream a whole signal and collect what comes back -> (output `[blocks * block]`, headers per block).

        The input is zero-padded so that its last sample is emitted (the output lags by the latency).
        realtime: send one block per block time; else as fast as the server takes it, with at most `window`
        blocks in flight (default: the server's buffer)."""
        x = np.asarray(audio, dtype=np.float32)
        b = self.block_samples
        n_blocks = -(-(x.shape[0] + self.latency_samples) // b)
        x = np.pad(x, [(0, n_blocks * b - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
        window = window or max(1, int(self.ready.get("buffer_blocks", 1)))
        block_s = b / self.sample_rate
        out: list[OutputBlock] = []
        start = time.monotonic()
        for i in range(n_blocks):
            if realtime:
                time.sleep(max(0.0, start + i * block_s - time.monotonic()))
            while i - len(out) >= window:
                out.append(self.receive(60))
            self.send(x[i * b : (i + 1) * b])
        while len(out) < n_blocks:
            out.append(self.receive(60))
        return np.concatenate([o.audio for o in out]), [o.header for o in out]
