"""The HTTP layer against idle and slow clients, on real sockets: a uvicorn server on 127.0.0.1 (a child
process with a low connection limit and a short request-head timeout, always killed at the end)."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_service_engine import BlockingEngine, FakeEngine, running_app, sine_wav

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = """
import json, sys
sys.path.insert(0, {root!r})
from service.app import create_app, run_server
from service.settings import Settings
from {module} import {engine}

port, overrides = int(sys.argv[1]), json.loads(sys.argv[2])
settings = Settings(**overrides)
run_server(create_app(settings, engine_factory=lambda _: {engine}()), "127.0.0.1", port, settings.shutdown_grace_s)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def live_server(tmp_path: Path, engine: str = "FakeEngine", module: str = "tests.test_service_engine",
                **overrides: Any) -> Iterator[tuple[subprocess.Popen[bytes], str, int]]:
    """A server process on a free port with `overrides` as settings; yields (process, url, port)."""
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER.format(root=str(ROOT), engine=engine, module=module))
    port = free_port()
    settings = {"adapter_dir": str(tmp_path / "store"), "work_dir": str(tmp_path / "work"), **overrides}
    log = (tmp_path / "server.log").open("ab")
    proc = subprocess.Popen([sys.executable, str(script), str(port), json.dumps(settings)], cwd=ROOT, stdout=log,
                            stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        else:
            raise AssertionError("server did not become ready within 60 s")
        yield proc, url, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        log.close()


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + want + '}') if want else ''} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    assert found, f"{name} {labels} not in /metrics"
    return float(found.group(1))


def closed_by_server(s: socket.socket) -> bool:
    s.settimeout(0.5)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_cannot_lock_out_health_checks_or_requests(tmp_path: Path) -> None:
    """Was: past max_connections silent sockets, every request (health included) was uvicorn's plain 503."""
    with live_server(tmp_path, max_connections=8, header_timeout_s=30) as (_, url, port), ExitStack() as stack:
        silent = [stack.enter_context(socket.create_connection(("127.0.0.1", port))) for _ in range(30)]
        time.sleep(0.2)
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        r = httpx.post(f"{url}/convert", files={"audio": ("a.wav", sine_wav())}, timeout=10)
        assert r.status_code == 200, r.text
        assert metric(url, "rvc_lora_http_connection_limit") == 8
        assert metric(url, "rvc_lora_http_connections_closed_total", reason="evicted") >= len(silent) - 8
        assert metric(url, "rvc_lora_http_open_connections") <= 8 + 1
        closed = [closed_by_server(s) for s in silent]
        assert closed[: len(silent) - 8] == [True] * (len(silent) - 8)  # the oldest made room ...
        assert sum(closed[len(silent) - 8:]) <= 3  # ... and only they (the requests above took up to 3 places)


def test_a_request_head_must_arrive_within_the_timeout(tmp_path: Path) -> None:
    """Was: a silent or trickling request head held its connection forever."""
    with live_server(tmp_path, header_timeout_s=1.0) as (_, url, port), ExitStack() as stack:
        silent = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
        trickling = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
        start = time.monotonic()
        trickling.sendall(b"GET /healthz HTTP/1.1\r\n")
        for _ in range(3):  # a byte every 0.25 s: the timeout counts from the connection, not the last byte
            trickling.sendall(b"X")
            time.sleep(0.25)
        for s in (silent, trickling):
            s.settimeout(5)
        answer = trickling.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"request_timeout"' in answer
        assert silent.recv(1) == b""
        assert time.monotonic() - start < 4
        assert metric(url, "rvc_lora_http_connections_closed_total", reason="head_timeout") >= 2
        # a keep-alive connection gets a fresh head timeout after each response, and works meanwhile
        with httpx.Client(timeout=5) as client:
            for _ in range(3):
                assert client.get(f"{url}/healthz").status_code == 200
                time.sleep(0.4)


def test_requests_past_the_limit_get_503_but_health_answers(tmp_path: Path) -> None:
    engine = BlockingEngine()
    with running_app(tmp_path, engine, max_connections=2) as client, ExitStack() as stack:
        from concurrent.futures import ThreadPoolExecutor

        pool = stack.enter_context(ThreadPoolExecutor(2))
        running = [pool.submit(client.post, "/convert", files={"audio": ("a.wav", sine_wav())}) for _ in range(2)]
        assert engine.started.wait(10)
        deadline = time.monotonic() + 10
        while client.app.state.connections.in_flight < 2 and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.01)
        r = client.post("/convert", files={"audio": ("a.wav", sine_wav())})
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded" and "Retry-After" in r.headers
        assert client.get("/healthz").status_code == 200
        metrics = client.get("/metrics").text
        assert 'rvc_lora_rejected_total{reason="connections"} 1.0' in metrics
        assert 'method="POST",route="unmatched",status="503"} 1.0' in metrics  # logged and counted like any
        engine.gate.set()
        assert [f.result().status_code for f in running] == [200, 200]


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


def test_a_content_length_short_of_the_body_is_400(tmp_path: Path) -> None:
    """Was: 200 with the last form field dropped (the server read Content-Length bytes, the rest was lost)."""
    from tests.test_service_hardening import MULTIPART, multipart

    body = multipart({"audio": sine_wav(), "seed": "7"})
    with live_server(tmp_path) as (_, url, port), socket.create_connection(("127.0.0.1", port)) as s:
        head = (f"POST /convert HTTP/1.1\r\nHost: x\r\nContent-Type: {MULTIPART['content-type']}\r\n"
                f"Content-Length: {len(body) - 100}\r\nConnection: close\r\n\r\n").encode()
        s.sendall(head + body)
        s.settimeout(10)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
        assert b"closing boundary" in answer


class SlowEngine(FakeEngine):
    """Every conversion takes 5 s of "device" time (for a server in another process): longer than the test's
    grace period, so none can finish however late the signal comes."""

    def convert(self, audio16k: Any, options: Any, voice: object | None) -> Any:
        time.sleep(5.0)
        return super().convert(audio16k, options, voice)


def test_sigterm_answers_unfinished_requests_503_with_retry_after(tmp_path: Path) -> None:
    """Was: what was still queued or running when the grace period ran out got 500 (CancelledError)."""
    from concurrent.futures import ThreadPoolExecutor

    def post(url: str) -> httpx.Response | None:
        try:
            return httpx.post(f"{url}/convert", files={"audio": ("a.wav", sine_wav())}, timeout=20)
        except httpx.TransportError:
            return None

    with live_server(tmp_path, "SlowEngine", "tests.test_service_connections", shutdown_grace_s=2.0) as (proc, url, _):
        with ThreadPoolExecutor(4) as pool:
            replies = [pool.submit(post, url) for _ in range(4)]
            deadline = time.monotonic() + 20
            while metric(url, "rvc_lora_queued_jobs") < 3:  # one runs (5 s), three wait: on a busy machine the
                assert time.monotonic() < deadline, "the requests never queued"  # uploads take a while to arrive
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in replies]
        proc.wait(10)
    statuses = sorted(r.status_code for r in answers if r is not None)
    assert len(statuses) == 4 and set(statuses) == {503}, statuses  # none could finish within the grace
    for r in answers:
        assert r is not None and r.json()["error"]["code"] == "shutting_down" and "Retry-After" in r.headers


def _long_features(frames: int = 12_000) -> bytes:
    """Features whose synthesis by the fake engine is `frames` * 400 samples: 9.6 MB of WAV at 12,000 frames."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, phone=np.zeros((frames, 768), np.float32), pitch=np.full(frames, 60),
                        nsff0=np.full(frames, 150.0, np.float32))
    return buf.getvalue()


def test_a_client_that_reads_nothing_of_its_response_is_disconnected(tmp_path: Path) -> None:
    """Was: the unsent rest of a response (MBs of audio) stayed in server memory for as long as the client did
    not read it: closing the idle connection waited for the buffer to drain."""
    from tests.test_service_hardening import MULTIPART, multipart

    body = multipart({"features": _long_features()})
    head = (f"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: {MULTIPART['content-type']}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with live_server(tmp_path, send_idle_timeout_s=1.0, header_timeout_s=30) as (_, url, port), ExitStack() as stack:
        stalled = stack.enter_context(socket.socket())
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        stalled.connect(("127.0.0.1", port))
        steady = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
        for s in (stalled, steady):
            s.sendall(head + body)
        received, deadline = 0, time.monotonic() + 60
        steady.settimeout(5)
        while received < 12_000 * 400 * 2 and time.monotonic() < deadline:  # a slow reader that keeps reading
            chunk = steady.recv(256 * 1024)
            assert chunk, "the steady reader was cut off"
            received += len(chunk)
            time.sleep(0.02)
        assert received >= 12_000 * 400 * 2
        deadline = time.monotonic() + 10
        while metric(url, "rvc_lora_http_connections_closed_total", reason="send_stalled") < 1:
            assert time.monotonic() < deadline, "the stalled reader was never disconnected"
            time.sleep(0.2)
        stalled.settimeout(5)
        got = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := stalled.recv(1 << 20):  # what the kernels had buffered, then the end
                got += len(chunk)
        assert got < 12_000 * 400 * 2  # the rest was dropped, not kept for it
        assert metric(url, "rvc_lora_http_connections_closed_total", reason="send_stalled") == 1  # not the reader
