"""What the web console adds to the API: `POST /convert?include=f0`, `GET /status`, `PATCH /adapters/{ref}`,
`GET /adapters?q=`, and the page and its files at `/` and `/console/` (open without the key, nothing else is)."""

from __future__ import annotations

import base64
import io
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from service.console import STATIC
from service.settings import Settings
from tests.test_service_engine import BlockingEngine, FakeEngine, adapter_bytes, running_app, sine_wav, upload

KEY = "console-key"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with running_app(tmp_path) as c:
        yield c


def convert(client: TestClient, query: str = "", wav: bytes | None = None, **fields: object) -> Any:
    data = {k: str(v) for k, v in fields.items()}
    return client.post(f"/convert{query}", data=data, files={"audio": ("in.wav", wav or sine_wav(0.5))})


# POST /convert?include=f0

def test_include_f0_answers_json_with_the_same_audio_and_the_track(client: TestClient) -> None:
    plain = convert(client, seed=4, f0_up_key=5)
    r = convert(client, "?include=f0", seed=4, f0_up_key=5)
    assert r.status_code == plain.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.headers["X-Adapter"] == "base" and "f0;" in r.headers["Server-Timing"]
    body = r.json()
    audio = base64.b64decode(body["audio"]["data"], validate=True)
    assert audio == plain.content  # the same bytes as without include
    samples, sr = sf.read(io.BytesIO(audio))
    assert (body["audio"]["media_type"], body["audio"]["sr"], body["audio"]["samples"]) == ("audio/wav", sr,
                                                                                           len(samples))
    assert body["audio"]["duration_s"] == pytest.approx(len(samples) / sr)
    f0 = body["f0"]
    default = client.get("/model").json()["default_f0_method"]
    assert (f0["frame_s"], f0["f0_method"], f0["f0_up_key"]) == (0.01, default, 5)
    assert r.headers["X-F0-Method"] == default
    assert convert(client, "?include=f0", f0_method="harvest").json()["f0"]["f0_method"] == "harvest"
    assert len(f0["source_hz"]) == len(f0["used_hz"]) == 0.5 * 16000 // 160
    assert f0["source_hz"][:12] == [0.0] * 12 and f0["source_hz"][12] == 212.0  # the fake engine's track
    np.testing.assert_allclose(f0["used_hz"], np.array(f0["source_hz"]) * 2 ** (5 / 12), atol=0.006)


def test_include_f0_keeps_the_chosen_format_and_refuses_other_values(client: TestClient) -> None:
    r = convert(client, "?include=f0", format="flac")
    assert r.status_code == 200 and r.json()["audio"]["media_type"] == "audio/flac"
    assert base64.b64decode(r.json()["audio"]["data"])[:4] == b"fLaC"
    r = convert(client, "?include=waveform")
    assert r.status_code == 422 and "include" in r.json()["error"]["message"]


def test_include_f0_with_the_real_engine(tmp_path: Path, tiny_service_assets: dict[str, Any]) -> None:
    """The track is what the pipeline used: a 220 Hz tone reads about 220 Hz, and the used track is it shifted."""
    from service.rvc_engine import load_engine

    with running_app(tmp_path, factory=load_engine, model=tiny_service_assets["model"],
                     hubert=tiny_service_assets["hubert"], max_rank=8) as c:
        r = convert(c, "?include=f0", wav=sine_wav(0.6, freq=220.0), f0_up_key=-12, seed=1)
        plain = convert(c, wav=sine_wav(0.6, freq=220.0), f0_up_key=-12, seed=1)
    assert r.status_code == 200, r.text
    body = r.json()
    assert base64.b64decode(body["audio"]["data"]) == plain.content
    source, used = np.array(body["f0"]["source_hz"]), np.array(body["f0"]["used_hz"])
    assert len(source) == len(used) == 0.6 * 16000 // 160
    voiced = source > 0
    assert voiced.mean() > 0.5 and np.median(source[voiced]) == pytest.approx(220.0, rel=0.02)
    np.testing.assert_allclose(used, source / 2, atol=0.006)


# GET /status

def test_status_reports_queue_throughput_jobs_and_adapters(client: TestClient) -> None:
    s = client.get("/status").json()
    assert (s["state"], s["model"]["device"], s["model"]["sr"]) == ("ready", "cpu", 40000)
    assert s["queue"] == {"jobs": 0, "audio_s": 0.0, "max_audio_s": 300.0, "wait_s": 0.0}
    assert s["adapters_stored"] == 0 and s["jobs"].get("ok", 0) == 0 and s["rtf_mean"] is None
    assert upload(client, adapter_bytes(client.app.state.settings.work_dir, 1), name="a").status_code == 201
    assert convert(client, adapter="a").status_code == 200
    s = client.get("/status").json()
    assert s["jobs"]["ok"] == 1 and s["adapters_stored"] == 1
    assert (s["adapters_on_device"], s["adapters_in_host_memory"]) == (1, 1)
    assert s["throughput"] > 0 and s["rtf"] == pytest.approx(1 / s["throughput"]) and s["rtf_mean"] > 0
    assert s["uptime_s"] > 0


def test_status_counts_the_queue_in_seconds_of_audio(tmp_path: Path) -> None:
    engine = BlockingEngine()
    with running_app(tmp_path, engine) as c:
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(convert(c, wav=sine_wav(1.0)).status_code))
                   for _ in range(3)]
        for t in threads:
            t.start()
        try:
            assert engine.started.wait(10)
            for _ in range(200):  # the other two are queued behind the one on the device
                s = c.get("/status").json()
                if s["queue"]["jobs"] == 2:
                    break
                threading.Event().wait(0.02)
            assert (s["queue"]["jobs"], s["queue"]["audio_s"]) == (2, 2.0)
            assert s["queue"]["wait_s"] == pytest.approx(2.0 / s["throughput"], abs=0.001)
        finally:
            engine.gate.set()
            for t in threads:
                t.join(20)
    assert results == [200, 200, 200]


def test_status_answers_while_loading(tmp_path: Path) -> None:
    release = threading.Event()

    def slow(_: Settings) -> FakeEngine:
        release.wait(timeout=20)
        return FakeEngine()

    with running_app(tmp_path, wait=False, factory=slow) as c:
        s = c.get("/status").json()
        assert (s["state"], s["model"], s["throughput"]) == ("loading", None, None)
        release.set()


# PATCH /adapters/{ref} and GET /adapters?q=

def test_rename_an_adapter(client: TestClient, tmp_path: Path) -> None:
    a = upload(client, adapter_bytes(tmp_path, 1), name="alice").json()
    b = upload(client, adapter_bytes(tmp_path, 2), name="bob").json()
    r = client.patch("/adapters/alice", json={"name": "carol"})
    assert r.status_code == 200 and (r.json()["id"], r.json()["name"]) == (a["id"], "carol")
    assert client.get("/adapters/carol").json()["id"] == a["id"]
    assert client.get("/adapters/alice").status_code == 404
    assert convert(client, adapter="carol").status_code == 200
    r = client.patch(f"/adapters/{a['id']}", json={"name": "bob"})
    assert (r.status_code, r.json()["error"]["code"]) == (409, "conflict")
    assert client.patch("/adapters/bob", json={"name": "bob"}).json()["name"] == "bob"  # its own name: no change
    r = client.patch("/adapters/bob", json={"name": None})
    assert r.status_code == 200 and r.json()["name"] is None
    assert client.get(f"/adapters/{b['id']}").json()["name"] is None
    assert client.patch("/adapters/nobody", json={"name": "x"}).status_code == 404
    for bad in ({"name": "has space"}, {"name": "0123456789abcdef"}, {}, {"name": "ok", "extra": 1}):
        assert client.patch(f"/adapters/{a['id']}", json=bad).status_code == 422, bad


def test_a_rename_survives_a_restart(tmp_path: Path) -> None:
    with running_app(tmp_path) as c:
        adapter_id = upload(c, adapter_bytes(tmp_path, 1), name="before").json()["id"]
        assert c.patch("/adapters/before", json={"name": "after"}).status_code == 200
    with running_app(tmp_path) as c:
        assert c.get("/adapters/after").json()["id"] == adapter_id
        assert c.get("/adapters/before").status_code == 404


def test_search_adapters(client: TestClient, tmp_path: Path) -> None:
    ids = [upload(client, adapter_bytes(tmp_path, s), name=n).json()["id"]
           for s, n in ((1, "Alto-1"), (2, "alto-2"), (3, "bass"))]
    page = client.get("/adapters", params={"q": "ALTO", "limit": 1}).json()
    assert (page["total"], page["next_offset"], [a["name"] for a in page["adapters"]]) == (2, 1, ["Alto-1"])
    page = client.get("/adapters", params={"q": "alto", "offset": 1}).json()
    assert [a["name"] for a in page["adapters"]] == ["alto-2"] and page["next_offset"] is None
    assert client.get("/adapters", params={"q": ids[2][:6]}).json()["adapters"][0]["name"] == "bass"
    assert client.get("/adapters", params={"q": "voice"}).json()["total"] == 3  # the label in the file
    assert client.get("/adapters", params={"q": "tenor"}).json() == {"adapters": [], "total": 0, "next_offset": None}
    assert client.get("/adapters", params={"q": "x" * 129}).status_code == 422


# the page and its files

def test_the_page_and_its_files_are_served_open_and_nothing_else_is(tmp_path: Path) -> None:
    with running_app(tmp_path, api_key=KEY) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp
        referenced = re.findall(r'(?:src|href)="(/console/[^"]+)"', page.text)
        assert len(referenced) >= 5
        for path in referenced:
            r = c.get(path)
            assert r.status_code == 200, path
            assert (STATIC / path.removeprefix("/console/")).read_bytes() == r.content
        assert c.get("/console/js/main.js").headers["content-type"].startswith(("text/javascript",
                                                                                "application/javascript"))
        assert c.get("/console/nothing.js").status_code == 404
        assert c.get("/console/%2e%2e/settings.py").status_code == 404
        for path in ("/status", "/model", "/adapters", "/openapi.json"):
            assert c.get(path).status_code == 401, path
        for method, path in (("POST", "/"), ("DELETE", "/"), ("POST", "/console/js/main.js")):
            assert c.request(method, path).status_code == 401, (method, path)  # open to read only
        assert c.get("/status", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """No CDN: every URL in the page's files is relative to this server."""
    for path in STATIC.rglob("*"):
        if path.suffix in (".html", ".js", ".css") and "vendor" not in path.parts:
            text = path.read_text()
            assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), path
            assert "localStorage" not in text and "document.cookie" not in text, path
