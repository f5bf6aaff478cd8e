"""End to end against a real uvicorn on 127.0.0.1 (a child process on a free port, always killed at the end):
HTTP round trip with JSON logs, SIGTERM drain, SIGKILL mid-upload and a clean restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.test_service_engine import adapter_bytes, sine_wav

ROOT = Path(__file__).resolve().parents[1]
SERVER = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from service.app import create_app, run_server
from service.logs import configure_logging
from service.settings import Settings
from tests.test_service_engine import FileGateEngine

port, store, gate, grace = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
settings = Settings(adapter_dir=store, shutdown_grace_s=grace, api_key="k3y")
configure_logging("INFO")
run_server(create_app(settings, engine_factory=lambda _: FileGateEngine(gate)), "127.0.0.1", port, grace)
"""
AUTH = {"Authorization": "Bearer k3y"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def server(tmp_path: Path, grace: float = 5.0) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """A server process; yields (process, base url, gate dir). Killed on exit whatever happened."""
    script, gate = tmp_path / "server.py", tmp_path / "gate"
    script.write_text(SERVER.format(root=str(ROOT)))
    gate.mkdir(exist_ok=True)
    for marker in ("started", "release"):
        (gate / marker).unlink(missing_ok=True)
    port = _free_port()
    log = (tmp_path / "server.log").open("ab")
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(tmp_path / "store"), str(gate), str(grace)],
                            cwd=ROOT, stdout=log, stderr=log)
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
        yield proc, url, gate
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        log.close()


def _log_entries(tmp_path: Path) -> list[dict[str, object]]:
    lines = (tmp_path / "server.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_round_trip_then_sigterm_drains(tmp_path: Path) -> None:
    with server(tmp_path, grace=5.0) as (proc, url, gate):
        (gate / "release").touch()
        r = httpx.post(f"{url}/convert", data={"seed": "1"}, files={"audio": ("a.wav", sine_wav())},
                       headers={**AUTH, "X-Request-Id": "e2e-1"}, timeout=30)
        assert (r.status_code, r.headers["content-type"], r.headers["X-Request-Id"]) == (200, "audio/wav", "e2e-1")
        assert httpx.post(f"{url}/convert", files={"audio": ("a.wav", sine_wav())}, timeout=30).status_code == 401
        (gate / "release").unlink()
        (gate / "started").unlink()

        running: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: running.append(httpx.post(
            f"{url}/convert", files={"audio": ("a.wav", sine_wav())}, headers=AUTH, timeout=30)))
        thread.start()
        for _ in range(1000):
            if (gate / "started").exists():
                break
            time.sleep(0.01)
        assert (gate / "started").exists()
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.3)
        try:  # new work is refused: 503 while the listener is still open, else the connection is refused
            late = httpx.post(f"{url}/convert", files={"audio": ("a.wav", sine_wav())}, headers=AUTH, timeout=5)
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        except httpx.TransportError:
            pass
        (gate / "release").touch()
        thread.join(30)
        assert running and running[0].status_code == 200  # the running request finished
        proc.wait(10)
        assert time.monotonic() - signalled < 5.0 + 1.0
    entries = _log_entries(tmp_path)
    assert any(e["msg"] == "request" and e["request_id"] == "e2e-1" and e["status"] == 200 for e in entries)
    assert not any("k3y" in json.dumps(e) for e in entries)


def test_sigterm_exits_within_grace_even_if_work_hangs(tmp_path: Path) -> None:
    with server(tmp_path, grace=1.0) as (proc, url, gate):
        thread = threading.Thread(target=lambda: _swallow(lambda: httpx.post(
            f"{url}/convert", files={"audio": ("a.wav", sine_wav())}, headers=AUTH, timeout=30)))
        thread.start()
        for _ in range(1000):
            if (gate / "started").exists():
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        proc.wait(10)
        assert time.monotonic() - signalled < 1.0 + 2.0
        (gate / "release").touch()
        thread.join(30)


def _swallow(call: object) -> None:
    try:
        call()  # type: ignore[operator]
    except httpx.TransportError:
        pass


def _slow_body(head: bytes, stop: threading.Event) -> Iterator[bytes]:
    yield head
    while not stop.wait(0.02):
        yield b"\0" * 1024


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_sigkill_mid_upload_then_clean_restart(tmp_path: Path) -> None:
    kept = adapter_bytes(tmp_path, 1)
    with server(tmp_path) as (proc, url, _):
        assert httpx.post(f"{url}/adapters", files={"file": ("a.safetensors", kept)}, data={"name": "kept"},
                          headers=AUTH, timeout=30).status_code == 201
        boundary = "b0undary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"v.safetensors\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + adapter_bytes(tmp_path, 2)
        stop = threading.Event()
        uploader = threading.Thread(target=lambda: _swallow(lambda: httpx.post(
            f"{url}/adapters", content=_slow_body(head, stop), timeout=30,
            headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"})))
        uploader.start()
        time.sleep(0.5)  # the upload is streaming in
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        stop.set()
        uploader.join(30)
    with server(tmp_path) as (_, url, gate):
        (gate / "release").touch()
        listing = httpx.get(f"{url}/adapters", headers=AUTH, timeout=10).json()["adapters"]
        assert [a["name"] for a in listing] == ["kept"]
        r = httpx.post(f"{url}/convert", data={"adapter": "kept"}, files={"audio": ("a.wav", sine_wav())},
                       headers=AUTH, timeout=30)
        assert r.status_code == 200
    leftovers = [p.name for p in (tmp_path / "store").rglob("*") if p.name.endswith(".part")]
    assert leftovers == []
