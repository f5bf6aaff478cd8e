"""In-process tests of every route and every error status (fake engine, lifespan running)."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from service.logs import JsonFormatter
from service.settings import Settings
from tests.test_service_engine import (
    FAIL_SEED,
    OOM_SEED,
    BlockingEngine,
    FakeEngine,
    adapter_bytes,
    running_app,
    sine_wav,
    upload,
)

KEY = "s3cret-key-for-tests"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with running_app(tmp_path) as c:
        yield c


def convert(client: TestClient, wav: bytes | None = None, **fields: object) -> object:
    data = {k: str(v) for k, v in fields.items()}
    return client.post("/convert", data=data, files={"audio": ("in.wav", sine_wav() if wav is None else wav)})


def error_of(r: object) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]  # type: ignore[attr-defined]


# health, readiness, model, metrics

def test_health_ready_and_model(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert (r.status_code, r.json()["state"], r.json()["ready"]) == (200, "ready", True)
    info = client.get("/model").json()
    assert (info["fingerprint"], info["content_dim"], info["n_speakers"]) == ("f" * 64, 768, 2)
    assert info["limits"]["max_audio_s"] == 120.0


def test_not_ready_while_loading_then_ready(tmp_path: Path) -> None:
    release = threading.Event()

    def slow_factory(_: Settings) -> FakeEngine:
        release.wait(timeout=20)
        return FakeEngine()

    with running_app(tmp_path, wait=False, factory=slow_factory) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert (r.status_code, r.json()["state"]) == (503, "loading")
        r = c.get("/model")
        assert error_of(r) == (503, "not_ready") and "Retry-After" in r.headers
        release.set()
        assert c.portal is not None
        c.portal.call(c.app.state.worker.wait_loaded)  # type: ignore[attr-defined]
        assert c.get("/readyz").status_code == 200


def test_failed_model_load_is_reported(tmp_path: Path) -> None:
    def broken(_: Settings) -> FakeEngine:
        raise RuntimeError("no such checkpoint")

    with running_app(tmp_path, factory=broken) as c:
        assert c.get("/healthz").status_code == 503
        assert c.get("/readyz").json()["state"] == "failed"
        assert error_of(convert(c)) == (503, "not_ready")


def test_metrics_are_exposed(client: TestClient) -> None:
    assert convert(client).status_code == 200  # type: ignore[attr-defined]
    text = client.get("/metrics").text
    for name in ("rvc_lora_http_requests_total", "rvc_lora_queue_wait_seconds", "rvc_lora_compute_seconds",
                 "rvc_lora_queued_audio_seconds", "rvc_lora_adapter_swaps_total",
                 "rvc_lora_adapter_cache_lookups_total", "rvc_lora_resident_adapters", "rvc_lora_real_time_factor",
                 "rvc_lora_ready 1.0"):
        assert name in text
    assert 'route="/convert",status="200"' in text


# /convert

@pytest.mark.parametrize(("fmt", "media"), [("wav", "audio/wav"), ("flac", "audio/flac"), ("ogg", "audio/ogg")])
def test_convert_formats_and_headers(client: TestClient, fmt: str, media: str) -> None:
    r = convert(client, format=fmt, seed=1)
    assert r.status_code == 200, r.text  # type: ignore[attr-defined]
    assert r.headers["content-type"] == media  # type: ignore[attr-defined]
    assert r.headers["X-Adapter"] == "base" and r.headers["X-Adapter-Cache"] == "hit"  # type: ignore[attr-defined]
    timing = r.headers["Server-Timing"].split(", ")  # type: ignore[attr-defined]
    assert [part.split(";")[0] for part in timing] == ["queue", "decode", "f0", "synth", "encode"]
    # the fake model offers pm, harvest and fcpe: the default is fcpe, and the response says so twice
    assert r.headers["X-F0-Method"] == "fcpe" and timing[2].startswith("f0;desc=fcpe;dur=")  # type: ignore
    audio, sr = sf.read(io.BytesIO(r.content))  # type: ignore[attr-defined]
    assert sr == 16000 and len(audio) == 8000


def test_convert_runs_the_asked_f0_method(client: TestClient) -> None:
    r = convert(client, f0_method="pm", seed=1)
    assert r.headers["X-F0-Method"] == "pm" and "f0;desc=pm;dur=" in r.headers["Server-Timing"]  # type: ignore
    assert client.get("/model").json()["default_f0_method"] == "fcpe"


def test_convert_with_adapter_by_id_and_name(client: TestClient, tmp_path: Path) -> None:
    adapter_id = upload(client, adapter_bytes(tmp_path, 1), name="alice").json()["id"]
    first = convert(client, adapter=adapter_id, seed=3)
    second = convert(client, adapter="alice", seed=3)
    assert first.headers["X-Adapter"] == adapter_id == second.headers["X-Adapter"]  # type: ignore[attr-defined]
    assert (first.headers["X-Adapter-Cache"], second.headers["X-Adapter-Cache"]) == ("miss", "hit")  # type: ignore
    assert first.content == second.content  # type: ignore[attr-defined]
    assert first.content != convert(client, seed=3).content  # type: ignore[attr-defined]


BAD_FIELDS = [
    ({"f0_up_key": 1000}, "f0_up_key"), ({"f0_up_key": -1000}, "f0_up_key"), ({"f0_up_key": "1.5"}, "f0_up_key"),
    ({"f0_method": "yin"}, "f0_method"), ({"f0_method": "crepe"}, "not available here"),
    ({"index_rate": 2}, "index_rate"), ({"index_rate": "nan"}, "index_rate"),
    ({"filter_radius": -1}, "filter_radius"), ({"rms_mix_rate": "inf"}, "rms_mix_rate"), ({"protect": 0.9}, "protect"),
    ({"resample_sr": 100}, "resample_sr"), ({"format": "aiff"}, "format"), ({"seed": -1}, "seed"),
    ({"sid": "x"}, "sid"), ({"sid": 2}, "sid"), ({"f0_method": "rmvpe"}, "RVC_LORA_RMVPE"), ({"bogus": 1}, "bogus"),
    ({"adapter": "x" * 500}, "adapter"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_FIELDS)
def test_convert_bad_parameters_are_422(client: TestClient, fields: dict[str, object], field: str) -> None:
    r = convert(client, **fields)
    assert error_of(r) == (422, "invalid_request")
    assert field in r.json()["error"]["message"]  # type: ignore[attr-defined]


def test_convert_missing_audio_is_422(client: TestClient) -> None:
    assert error_of(client.post("/convert", data={"seed": "1"})) == (422, "invalid_request")


def _silence() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(8000, dtype=np.float32), 16000, format="WAV")
    return buf.getvalue()


def _float_wav(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, values.astype(np.float32), 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


@pytest.mark.parametrize(("payload", "status", "code"), [
    (b"", 422, "bad_audio"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt garbage", 415, "unsupported_audio"),
    (b"\x89PNG\r\n\x1a\n" + bytes(64), 415, "unsupported_audio"),
    (b"hello, this is text\n" * 20, 415, "unsupported_audio"),
    (bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)), 415, "unsupported_audio"),
    (sine_wav(0.5)[:200], 422, "bad_audio"),  # truncated: a header and almost no samples
    (_silence(), 422, "bad_audio"),
    (_float_wav(np.full(8000, np.nan)), 422, "bad_audio"),
    (_float_wav(np.full(8000, np.inf)), 422, "bad_audio"),
])
def test_convert_bad_audio(client: TestClient, payload: bytes, status: int, code: str, tmp_path: Path) -> None:
    r = convert(client, wav=payload)
    assert error_of(r) == (status, code)
    assert str(tmp_path) not in r.json()["error"]["message"] and "rvc-upload" not in r.json()["error"]["message"]  # type: ignore
    assert not list(tmp_path.glob("rvc-upload-*"))  # the spooled upload is gone


def _flac_claiming(hours: float) -> bytes:
    """A short FLAC whose STREAMINFO says it lasts `hours`: only the header is long."""
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(np.arange(8000) / 10)).astype(np.float32), 16000, format="FLAC")
    data = bytearray(buf.getvalue())
    head = int.from_bytes(data[18:26], "big")  # rate 20 bits, channels 3, bits 5, total samples 36
    data[18:26] = ((head & ~((1 << 36) - 1)) | int(hours * 3600 * 16000)).to_bytes(8, "big")
    return bytes(data)


def _wav_with_sizes(riff: int, data: int, channels: int = 1) -> bytes:
    import struct

    samples = (0.3 * 32767 * np.sin(np.arange(8000) / 10)).astype("<i2").tobytes()
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, channels, 16000, 32000 * max(channels, 1), 2 * channels, 16)
    return struct.pack("<4sI4s", b"RIFF", riff, b"WAVE") + fmt + struct.pack("<4sI", b"data", data) + samples


def test_three_hour_header_is_refused_before_decoding(client: TestClient) -> None:
    r = convert(client, wav=_flac_claiming(3.0))
    assert error_of(r) == (413, "audio_too_long") and "10800" in r.json()["error"]["message"]  # type: ignore


@pytest.mark.parametrize("payload", [
    _wav_with_sizes(0xFFFFFFF0, 0xFFFFFFD0),  # a header that declares gigabytes
    _wav_with_sizes(36 + 16000, 16000, channels=0),
    sine_wav(1 / 16000),  # one sample
])
def test_hostile_headers_get_a_4xx(client: TestClient, payload: bytes) -> None:
    status = convert(client, wav=payload).status_code  # type: ignore[attr-defined]
    assert 400 <= status < 500 or status == 200  # decodable garbage may convert; never a 5xx
    assert client.get("/healthz").status_code == 200


def test_eight_channels_at_192k_are_converted(client: TestClient) -> None:
    buf = io.BytesIO()
    sf.write(buf, np.random.default_rng(0).uniform(-0.3, 0.3, (38400, 8)).astype(np.float32), 192000, format="WAV")
    r = convert(client, wav=buf.getvalue())
    assert r.status_code == 200  # type: ignore[attr-defined]
    assert len(sf.read(io.BytesIO(r.content))[0]) == 3200  # type: ignore[attr-defined]  # 0.2 s at 16 kHz


def test_convert_unknown_adapter_is_404(client: TestClient) -> None:
    assert error_of(convert(client, adapter="0123456789abcdef")) == (404, "adapter_not_found")
    assert error_of(convert(client, adapter="nobody")) == (404, "adapter_not_found")


def test_upload_too_large_is_413_and_too_long_is_413(tmp_path: Path) -> None:
    with running_app(tmp_path, max_audio_bytes=30_000, max_audio_s=1.0) as c:
        assert error_of(convert(c, wav=sine_wav(4.0))) == (413, "payload_too_large")  # body > limit + form slack
        assert error_of(convert(c, wav=sine_wav(1.0))) == (413, "payload_too_large")  # file > limit
        assert error_of(convert(c, wav=sine_wav(1.5, sr=8000))) == (413, "audio_too_long")  # 24 KB, 1.5 s
        assert convert(c, wav=sine_wav(0.5, sr=8000)).status_code == 200  # type: ignore[attr-defined]


def test_worker_exception_is_500_with_request_id_and_others_succeed(client: TestClient) -> None:
    r = client.post("/convert", data={"seed": str(FAIL_SEED)}, files={"audio": ("a.wav", sine_wav())},
                    headers={"X-Request-Id": "req-42"})
    assert error_of(r) == (500, "internal")
    assert "req-42" in r.json()["error"]["message"] and r.headers["X-Request-Id"] == "req-42"
    assert convert(client, seed=1).status_code == 200  # type: ignore[attr-defined]


def test_device_oom_is_503_and_worker_survives(client: TestClient) -> None:
    r = convert(client, seed=OOM_SEED)
    assert error_of(r) == (503, "device_out_of_memory") and r.headers["Retry-After"] == "5"  # type: ignore
    assert convert(client, seed=1).status_code == 200  # type: ignore[attr-defined]


def test_queue_full_is_503_with_retry_after(tmp_path: Path) -> None:
    engine = BlockingEngine()
    with running_app(tmp_path, engine, max_queued_audio_s=1.0, max_audio_s=1.0) as c:
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(convert(c, wav=sine_wav(0.6)).status_code))
                   for _ in range(2)]  # one runs (blocked), one waits: 0.6 s queued
        threads[0].start()
        assert engine.started.wait(10)
        threads[1].start()
        assert c.portal is not None
        worker = c.app.state.worker  # type: ignore[attr-defined]
        for _ in range(200):  # the second request is decoded and queued within a few ms
            if worker.queued_audio_s > 0:
                break
            threading.Event().wait(0.01)
        r = convert(c, wav=sine_wav(0.6))
        assert error_of(r) == (503, "queue_full")
        assert int(r.headers["Retry-After"]) >= 1  # type: ignore[attr-defined]
        engine.gate.set()
        for t in threads:
            t.join(20)
        assert results == [200, 200]


def test_deadline_is_504_and_the_job_is_dropped(tmp_path: Path) -> None:
    engine = BlockingEngine()
    with running_app(tmp_path, engine, request_timeout_s=1.0) as c:
        blocker = threading.Thread(target=lambda: convert(c))
        blocker.start()
        assert engine.started.wait(10)
        assert error_of(convert(c)) == (504, "deadline_exceeded")  # waited in the queue past its deadline
        assert c.app.state.worker.queued_audio_s == 0  # type: ignore[attr-defined]
        engine.gate.set()
        blocker.join(20)
        assert convert(c).status_code == 200  # type: ignore[attr-defined]  # runs after everything before it
        assert engine.calls == ["convert", "convert"]  # the blocker and this one: the expired job never ran


def test_draining_refuses_new_work(client: TestClient) -> None:
    assert client.portal is not None
    client.portal.call(lambda: _drain(client))
    assert error_of(convert(client)) == (503, "shutting_down")
    assert client.get("/readyz").status_code == 503


async def _drain(client: TestClient) -> None:
    client.app.state.worker.begin_drain()  # type: ignore[attr-defined]


# /infer

def _npz(frames: int = 20, dim: int = 768, f0: bool = True, **override: np.ndarray) -> bytes:
    rng = np.random.default_rng(0)
    arrays = {"phone": rng.normal(size=(frames, dim)).astype(np.float32)}
    if f0:
        arrays["pitch"] = rng.integers(1, 256, frames)
        arrays["nsff0"] = rng.uniform(100, 300, frames).astype(np.float32)
    arrays.update(override)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_infer_returns_wav(client: TestClient, tmp_path: Path) -> None:
    adapter_id = upload(client, adapter_bytes(tmp_path, 2)).json()["id"]
    r = client.post("/infer", data={"adapter": adapter_id, "seed": "1"}, files={"features": ("f.npz", _npz())})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    audio, sr = sf.read(io.BytesIO(r.content))
    assert (sr, len(audio)) == (40000, 20 * 400)


@pytest.mark.parametrize("payload", [
    b"not a zip", _npz(dim=256), _npz(f0=False), _npz(pitch=np.zeros(20, dtype=np.int64)),
    _npz(nsff0=np.full(20, np.nan, dtype=np.float32)), _npz(extra=np.zeros(3)), _npz(frames=0),
])
def test_infer_bad_features_are_422(client: TestClient, payload: bytes) -> None:
    r = client.post("/infer", files={"features": ("f.npz", payload)})
    assert error_of(r) == (422, "bad_features")


def test_infer_refuses_pickles(client: TestClient) -> None:
    buf = io.BytesIO()
    np.savez(buf, phone=np.array([{"evil": 1}], dtype=object))
    assert error_of(client.post("/infer", files={"features": ("f.npz", buf.getvalue())})) == (422, "bad_features")


# auth, request ids, unknown routes, logs

def test_api_key_is_required_except_on_open_routes(tmp_path: Path) -> None:
    with running_app(tmp_path, api_key=KEY) as c:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert c.get(path).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": KEY}):
            r = c.get("/adapters", headers=headers)
            assert error_of(r) == (401, "unauthorized") and r.headers["WWW-Authenticate"] == "Bearer"
        r = c.post("/convert", files={"audio": ("a.wav", sine_wav())})
        assert error_of(r) == (401, "unauthorized")
        assert c.get("/adapters", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        r = c.post("/convert", files={"audio": ("a.wav", sine_wav())}, headers={"Authorization": f"bearer {KEY}"})
        assert r.status_code == 200


def test_request_ids(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-Id": "abc-1"}).headers["X-Request-Id"] == "abc-1"
    generated = client.get("/healthz", headers={"X-Request-Id": "bad id\twith spaces"}).headers["X-Request-Id"]
    assert len(generated) == 32 and generated != client.get("/healthz").headers["X-Request-Id"]


def test_unknown_routes_use_the_error_envelope(client: TestClient) -> None:
    assert error_of(client.get("/nope")) == (404, "not_found")
    assert error_of(client.put("/convert")) == (405, "method_not_allowed")
    assert error_of(client.get("/adapters/" + "x" * 200)) == (422, "invalid_request")


def test_json_logs_carry_request_id_and_never_the_key_or_bytes(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    marker = b"UPLOADED-BYTES-MARKER"
    with caplog.at_level(logging.INFO), running_app(tmp_path, api_key=KEY) as c:
        c.post("/convert", files={"audio": ("a.wav", sine_wav() + marker)}, headers={
            "Authorization": f"Bearer {KEY}", "X-Request-Id": "log-test-1"})
        c.post("/convert", files={"audio": ("a.wav", marker)}, headers={"Authorization": f"Bearer {KEY}"})
    lines = [JsonFormatter().format(record) for record in caplog.records]
    entries = [json.loads(line) for line in lines]
    access = [e for e in entries if e["msg"] == "request" and e["request_id"] == "log-test-1"]
    assert access and access[0]["route"] == "/convert" and access[0]["status"] == 200
    assert not any(KEY in line or marker.decode() in line for line in lines)


# seed adapters and the demo wiring

def test_seed_adapters_are_added_at_start(tmp_path: Path) -> None:
    from tests.test_service_engine import GOOD_INDEX, make_adapter

    voice = make_adapter(tmp_path / "alice.safetensors", 1)
    (tmp_path / "alice.index").write_bytes(GOOD_INDEX)
    (tmp_path / "broken.safetensors").write_bytes(b"not an adapter")
    seeds = {"alice": voice, "broken": tmp_path / "broken.safetensors", "missing": tmp_path / "nope.safetensors"}
    with running_app(tmp_path, seed_adapters=seeds, seed_indexes={"alice": tmp_path / "alice.index"}) as c:
        assert c.get("/readyz").status_code == 200
        listing = c.get("/adapters").json()["adapters"]
        assert [(a["name"], a["has_index"]) for a in listing] == [("alice", True)]
    with running_app(tmp_path, seed_adapters={"alice": voice}) as c:  # a restart: the same adapter, not a copy
        assert [a["name"] for a in c.get("/adapters").json()["adapters"]] == ["alice"]


def test_demo_settings_point_at_the_demo_assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.app import demo_overrides

    manifest = {"model": "base.pth", "hubert": "hubert.pt", "adapters": {"demo-voice-a": "a.safetensors"},
                "indexes": {"demo-voice-a": "a.index"}}
    monkeypatch.setattr("rvc_lora.demo.ensure_demo_assets", lambda folder: manifest)
    overrides = demo_overrides(tmp_path)
    settings = Settings(**overrides)
    assert (settings.model, settings.hubert, settings.adapter_dir) == (
        tmp_path / "base.pth", tmp_path / "hubert.pt", tmp_path / "store")
    assert settings.seed_adapters == {"demo-voice-a": tmp_path / "a.safetensors"}
    assert settings.seed_indexes == {"demo-voice-a": tmp_path / "a.index"}


def test_cors_is_off_unless_configured(client: TestClient, tmp_path: Path) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/convert", headers=preflight).headers
    with running_app(tmp_path / "cors", cors_origins=["https://app.example"], api_key=KEY) as c:
        r = c.options("/convert", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"


def test_client_that_leaves_while_queued_is_dropped(tmp_path: Path) -> None:
    engine = BlockingEngine()
    with running_app(tmp_path, engine) as c:
        assert c.portal is not None
        blocker = threading.Thread(target=lambda: convert(c))
        blocker.start()
        assert engine.started.wait(10)
        boundary = "b"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"a.wav\"\r\n\r\n").encode()
        body += sine_wav() + f"\r\n--{boundary}--\r\n".encode()
        leave = threading.Event()
        sent: list[dict[str, object]] = []
        chunks = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive() -> dict[str, object]:
            chunk = next(chunks, None)
            if chunk is not None:
                return chunk
            while not leave.is_set():  # the client is connected until the test lets it go
                await __import__("anyio").sleep(0.01)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/convert", "raw_path": b"/convert", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())],
                 "client": ("127.0.0.1", 1), "server": ("testserver", 80), "state": {}}
        leaver = c.portal.start_task_soon(c.app, scope, receive, send)  # type: ignore[arg-type]
        worker = c.app.state.worker  # type: ignore[attr-defined]
        for _ in range(3000):  # generous: a loaded CI machine may take seconds to parse the upload
            if worker.queued_audio_s > 0:
                break
            threading.Event().wait(0.01)
        assert worker.queued_audio_s > 0
        leave.set()
        leaver.result(30)
        assert sent[0]["status"] == 499 and worker.queued_audio_s == 0
        engine.gate.set()
        blocker.join(20)
        assert convert(c).status_code == 200  # type: ignore[attr-defined]
        assert engine.calls == ["convert", "convert"]  # the leaver's job never reached the device


MULTIPART_HEAD = b"--b\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"a.wav\"\r\n\r\n"


def post_raw(c: TestClient, receive: Any) -> list[dict[str, Any]]:
    """Run one multipart POST /convert straight through the ASGI app with a hand-written `receive`."""
    assert c.portal is not None
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/convert", "raw_path": b"/convert", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"multipart/form-data; boundary=b")],
             "client": ("127.0.0.1", 1), "server": ("testserver", 80), "state": {}}
    c.portal.call(c.app, scope, receive, send)  # type: ignore[arg-type]
    return sent


def error_sent(sent: list[dict[str, Any]]) -> tuple[int, str, str]:
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    return sent[0]["status"], body["error"]["code"], body["error"]["message"]


def test_stalled_upload_is_408(tmp_path: Path) -> None:
    anyio = pytest.importorskip("anyio")
    first = iter([MULTIPART_HEAD + b"RIFF"])

    async def receive() -> dict[str, Any]:
        chunk = next(first, None)
        if chunk is None:
            await anyio.sleep(20)  # the client sends nothing more (bounded, so a broken test cannot hang)
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunk, "more_body": True}

    with running_app(tmp_path, upload_idle_timeout_s=0.3) as c:
        status, code, message = error_sent(post_raw(c, receive))
        assert (status, code) == (408, "request_timeout") and "nothing arrived for 0.3 s" in message
        assert convert(c).status_code == 200  # type: ignore[attr-defined]


def test_trickling_upload_is_408(tmp_path: Path) -> None:
    anyio = pytest.importorskip("anyio")

    head = iter([MULTIPART_HEAD])

    sent = iter(range(200))

    async def receive() -> dict[str, Any]:  # then a byte of the file every 50 ms, for 10 s: never idle
        await anyio.sleep(0.05)
        return {"type": "http.request", "body": next(head, b"\0"), "more_body": next(sent, None) is not None}

    with running_app(tmp_path, upload_idle_timeout_s=0.3, upload_timeout_s=0.8) as c:
        status, code, message = error_sent(post_raw(c, receive))
        assert (status, code) == (408, "request_timeout") and "longer than 0.8 s" in message


def test_upload_timeouts_do_not_cut_a_long_conversion(tmp_path: Path) -> None:
    engine = BlockingEngine()
    with running_app(tmp_path, engine, upload_idle_timeout_s=0.2, upload_timeout_s=0.4) as c:
        threading.Timer(1.0, engine.gate.set).start()  # the conversion outlasts both upload timeouts
        assert convert(c).status_code == 200  # type: ignore[attr-defined]
