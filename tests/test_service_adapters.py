"""Adapter routes and the store: validation, content addressing, names, atomicity, crash recovery."""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from rvc_lora.adapters import AdapterInfo
from rvc_lora.errors import AdapterNotFoundError
from service.errors import NameConflict
from service.store import AdapterStore
from tests.test_service_engine import (
    FAKE_LAYER,
    GOOD_INDEX,
    BlockingEngine,
    adapter_bytes,
    running_app,
    sine_wav,
    upload,
)

META = AdapterInfo(name="v", r=4, lora_alpha=4.0, target_modules=(FAKE_LAYER,), base_fingerprint="f" * 64,
                   sr=40000, version="v2", f0=True)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with running_app(tmp_path, max_adapter_bytes=64 * 1024, max_index_bytes=1024) as c:
        yield c


def error_of(r: object) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]  # type: ignore[attr-defined]


def stored_files(tmp_path: Path) -> list[str]:
    root = tmp_path / "store"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_upload_list_get_delete(client: TestClient, tmp_path: Path) -> None:
    data = adapter_bytes(tmp_path, 1)
    r = upload(client, data, name="alice")
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["extraction"] is None  # an adapter upload: nothing was extracted
    assert info["id"] == __import__("hashlib").sha256(data).hexdigest()[:16]
    assert (info["name"], info["rank"], info["label"], info["has_index"]) == ("alice", 4, "voice", False)
    brief = ("id", "name", "label", "rank", "has_index", "size_bytes", "created_at")
    assert client.get("/adapters").json()["adapters"] == [{k: info[k] for k in brief}]  # no target-module lists
    assert client.get(f"/adapters/{info['id']}").json() == info == client.get("/adapters/alice").json()
    assert info["target_modules"]  # the details
    assert client.delete("/adapters/alice").status_code == 204
    assert error_of(client.get(f"/adapters/{info['id']}")) == (404, "adapter_not_found")
    assert error_of(client.delete(f"/adapters/{info['id']}")) == (404, "adapter_not_found")
    assert stored_files(tmp_path) == []


def test_same_bytes_twice_same_id(client: TestClient, tmp_path: Path) -> None:
    data = adapter_bytes(tmp_path, 1)
    first, again, named_again = upload(client, data, "bob"), upload(client, data), upload(client, data, "bob")
    assert (first.status_code, again.status_code, named_again.status_code) == (201, 200, 200)
    assert first.json() == again.json() == named_again.json()
    assert len(client.get("/adapters").json()["adapters"]) == 1


def test_name_conflicts_are_409(client: TestClient, tmp_path: Path) -> None:
    assert upload(client, adapter_bytes(tmp_path, 1), "carol").status_code == 201
    assert error_of(upload(client, adapter_bytes(tmp_path, 2), "carol")) == (409, "conflict")  # other bytes
    assert error_of(upload(client, adapter_bytes(tmp_path, 1), "dave")) == (409, "conflict")  # renaming
    assert len(client.get("/adapters").json()["adapters"]) == 1


def test_index_upload_and_wrong_dimension(client: TestClient, tmp_path: Path) -> None:
    r = upload(client, adapter_bytes(tmp_path, 1), index=b"wrong-dim-256")
    assert error_of(r) == (422, "bad_index")
    assert "index file" in r.json()["error"]["message"] and str(tmp_path) not in r.json()["error"]["message"]
    r = upload(client, adapter_bytes(tmp_path, 1), index=GOOD_INDEX)
    assert r.status_code == 201 and r.json()["has_index"]
    assert error_of(upload(client, adapter_bytes(tmp_path, 1), index=GOOD_INDEX + b"x")) == (409, "conflict")


def _safetensors_with(tmp_path: Path, tensors: dict[str, torch.Tensor], **meta: str) -> bytes:
    info = AdapterInfo(name="x", r=4, lora_alpha=4.0, target_modules=(FAKE_LAYER,), base_fingerprint="f" * 64,
                       sr=40000, version="v2", f0=True)
    path = tmp_path / "raw.safetensors"
    save_file(tensors, str(path), metadata={**info.to_metadata(), **meta})
    return path.read_bytes()


def _bad_adapters(tmp_path: Path) -> dict[str, bytes]:
    a, b = torch.randn(4, 12), torch.randn(6, 4)
    good = {f"{FAKE_LAYER}.lora_A": a, f"{FAKE_LAYER}.lora_B": b}
    return {
        "pickle": pickle.dumps({"weight": [1, 2, 3]}),
        "huge header": struct.pack("<Q", 2**40) + b"{" + bytes(100),
        "empty": b"",
        "text": b"hello" * 100,
        "int dtype": _safetensors_with(tmp_path, {**good, f"{FAKE_LAYER}.lora_A": a.to(torch.int32)}),
        "nan": _safetensors_with(tmp_path, {**good, f"{FAKE_LAYER}.lora_B": b * float("nan")}),
        "inf": _safetensors_with(tmp_path, {**good, f"{FAKE_LAYER}.lora_B": b * float("inf")}),
        "missing key": _safetensors_with(tmp_path, {f"{FAKE_LAYER}.lora_A": a}),
        "extra key": _safetensors_with(tmp_path, {**good, "enc_p.lora_A": a.clone()}),
        "rank lie": _safetensors_with(tmp_path, good, r="2"),
        "other base": adapter_bytes(tmp_path, 3, fingerprint="0" * 64),
        "rank above max": adapter_bytes(tmp_path, 4, rank=16),
    }


@pytest.mark.parametrize("case", ["pickle", "huge header", "empty", "text", "int dtype", "nan", "inf",
                                  "missing key", "extra key", "rank lie", "other base", "rank above max"])
def test_bad_adapters_are_422_and_leave_nothing(client: TestClient, tmp_path: Path, case: str) -> None:
    r = upload(client, _bad_adapters(tmp_path)[case])
    assert r.status_code == 422, r.text
    # a pickle is told apart by content: read (weights only) as a voice model, and refused as one
    expected = ("bad_checkpoint",) if case == "pickle" else ("bad_adapter", "adapter_mismatch")
    assert r.json()["error"]["code"] in expected
    assert str(tmp_path) not in r.json()["error"]["message"]  # no server paths in messages
    assert stored_files(tmp_path) == [] and client.get("/adapters").json()["adapters"] == []


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "a\\b", "nul\x00byte", "x" * 10_000, "voice\U0001f3a4",
                                  ".hidden", "0123456789abcdef", " "])
def test_bad_names_are_422(client: TestClient, tmp_path: Path, name: str) -> None:
    files = {"file": ("v.safetensors", adapter_bytes(tmp_path, 1))}
    r = client.post("/adapters", files=files, data={"name": name})
    assert error_of(r) == (422, "invalid_request")
    assert stored_files(tmp_path) == []


def test_oversized_adapter_is_413(client: TestClient, tmp_path: Path) -> None:
    assert error_of(upload(client, bytes(200 * 1024))) == (413, "payload_too_large")  # past the body limit
    assert error_of(upload(client, bytes(70 * 1024))) == (413, "payload_too_large")  # past the file limit
    assert error_of(upload(client, adapter_bytes(tmp_path, 1), index=bytes(2048))) == (413, "payload_too_large")
    assert stored_files(tmp_path) == []


def test_disk_error_is_507_and_nothing_is_stored(client: TestClient, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("service.store.os.fsync", full)
    r = upload(client, adapter_bytes(tmp_path, 1))
    assert error_of(r) == (507, "storage_error") and "No space left" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert stored_files(tmp_path) == [] and client.get("/adapters").json()["adapters"] == []


def test_delete_while_queued_lets_the_request_finish(tmp_path: Path) -> None:
    engine = BlockingEngine()
    with running_app(tmp_path, engine) as c:
        adapter_id = upload(c, adapter_bytes(tmp_path, 1)).json()["id"]
        results = []
        blocker = threading.Thread(target=lambda: c.post("/convert", files={"audio": ("a.wav", sine_wav())}))
        blocker.start()
        assert engine.started.wait(10)
        queued = threading.Thread(target=lambda: results.append(
            c.post("/convert", data={"adapter": adapter_id}, files={"audio": ("a.wav", sine_wav())})))
        queued.start()
        worker = c.app.state.worker  # type: ignore[attr-defined]
        for _ in range(200):
            if worker.queued_audio_s > 0:
                break
            threading.Event().wait(0.01)
        assert c.delete(f"/adapters/{adapter_id}").status_code == 204
        assert (tmp_path / "store" / "objects" / f"{adapter_id}.safetensors").exists()  # held by the queued job
        engine.gate.set()
        blocker.join(20)
        queued.join(20)
        assert results[0].status_code == 200 and results[0].headers["X-Adapter"] == adapter_id
        assert stored_files(tmp_path) == []  # released with the job


# the store on its own: crash recovery and atomicity

def _stage_bytes(store: AdapterStore, data: bytes) -> object:
    import io

    return store.stage(io.BytesIO(data), 1 << 20, "adapter file")


def test_store_sweeps_crash_leftovers_and_keeps_committed(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    rec, created = store.commit(_stage_bytes(store, b"adapter-one"), None, "one", META)  # type: ignore[arg-type]
    assert created
    # a crash mid-upload (temp file), and one after the rename but before the commit record, 2 hours ago
    leftovers = [tmp_path / "objects" / ".upload-abc.part", tmp_path / "objects" / "0123456789abcdef.safetensors",
                 tmp_path / "meta" / ".0123456789abcdef-x.part"]
    for path in leftovers:
        path.write_bytes(b"half")
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    reopened = AdapterStore(tmp_path)
    assert [r.id for r in reopened.all()] == [rec.id]
    assert reopened.resolve("one") == rec
    assert sorted(p.name for p in (tmp_path / "objects").iterdir()) == [f"{rec.id}.safetensors"]
    assert sorted(p.name for p in (tmp_path / "meta").iterdir()) == [f"{rec.id}.json"]


def test_store_ignores_unreadable_records(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    rec, _ = store.commit(_stage_bytes(store, b"adapter-two"), None, None, META)  # type: ignore[arg-type]
    (tmp_path / "meta" / "fedcba9876543210.json").write_text("not json")
    (tmp_path / "meta" / "1111111111111111.json").write_text(json.dumps({**rec.to_json(), "id": "1111111111111111"}))
    assert [r.id for r in AdapterStore(tmp_path).all()] == [rec.id]


def test_store_lease_defers_deletion(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    rec, _ = store.commit(_stage_bytes(store, b"adapter-three"), None, None, META)  # type: ignore[arg-type]
    with store.lease(rec):
        store.delete(rec.id)
        assert store.adapter_path(rec).exists()
        again, created = store.commit(_stage_bytes(store, b"adapter-three"), None, None, META)  # type: ignore
        assert created and again.id == rec.id
    assert store.adapter_path(rec).exists()  # re-uploaded meanwhile: not removed by the old lease


def test_client_disconnect_mid_upload_leaves_nothing(client: TestClient, tmp_path: Path) -> None:
    boundary = "xyz"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"v.safetensors\"\r\n\r\n"
            ).encode() + adapter_bytes(tmp_path, 1)[:300]
    messages = iter([{"type": "http.request", "body": head, "more_body": True}, {"type": "http.disconnect"}])
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/adapters", "raw_path": b"/adapters", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())],
             "client": ("127.0.0.1", 1), "server": ("testserver", 80), "state": {}}
    assert client.portal is not None
    client.portal.call(client.app, scope, receive, send)  # type: ignore[arg-type]
    assert stored_files(tmp_path) == [] and not list(tmp_path.glob("rvc-upload-*"))
    assert client.get("/adapters").json()["adapters"] == []  # and the server carries on


# a store shared by replicas (one volume, several processes): see each other's commits, sweep only stale leftovers

def test_replicas_see_each_others_adapters(tmp_path: Path) -> None:
    one, two = AdapterStore(tmp_path), AdapterStore(tmp_path)  # two processes on one volume
    rec, _ = one.commit(_stage_bytes(one, b"adapter-shared"), None, "shared", META)  # type: ignore[arg-type]
    assert two.resolve("shared") == rec and two.resolve(rec.id) == rec  # a miss re-reads the disk
    assert [r.id for r in two.all()] == [rec.id]
    with pytest.raises(NameConflict):  # the name is taken on disk, though `two` never looked it up
        fresh = AdapterStore(tmp_path)
        one.delete(rec.id)
        other, _ = one.commit(_stage_bytes(one, b"adapter-other"), None, "taken", META)  # type: ignore[arg-type]
        fresh.commit(_stage_bytes(fresh, b"adapter-third"), None, "taken", META)  # type: ignore[arg-type]
    assert two.all() == [other] and fresh.resolve("taken") == other  # the delete is seen too
    with pytest.raises(AdapterNotFoundError):
        two.resolve("shared")


def test_replicas_over_http(tmp_path: Path) -> None:
    shared = {"adapter_dir": tmp_path / "volume"}
    with running_app(tmp_path / "a", **shared) as a, running_app(tmp_path / "b", **shared) as b:
        adapter_id = upload(a, adapter_bytes(tmp_path, 1), name="alice").json()["id"]
        r = b.post("/convert", data={"adapter": "alice"}, files={"audio": ("a.wav", sine_wav())})
        assert r.status_code == 200 and r.headers["X-Adapter"] == adapter_id
        assert b.get(f"/adapters/{adapter_id}").json()["name"] == "alice"
        assert b.delete("/adapters/alice").status_code == 204
        assert error_of(a.get("/adapters/alice")) == (404, "adapter_not_found")
        assert a.get("/adapters").json()["adapters"] == []


def _aged(path: Path, seconds: float, data: bytes = b"x") -> Path:
    path.write_bytes(data)
    os.utime(path, (time.time() - seconds, time.time() - seconds))
    return path


def test_start_sweeps_only_what_no_live_process_can_be_writing(tmp_path: Path) -> None:
    from service.spool import process_tag

    objects, meta = tmp_path / "objects", tmp_path / "meta"
    objects.mkdir()
    meta.mkdir()
    other = "otherpod.7"  # another replica's uploads in flight: young temp files, an object not yet committed
    kept = [_aged(objects / f".upload-{other}-a1.part", 60), _aged(meta / f".0123456789abcdef-{other}-b2.part", 60),
            _aged(objects / "0123456789abcdef.safetensors", 60)]
    swept = [_aged(objects / f".upload-{other}-c3.part", 7200),  # stale: its writer is long gone
             _aged(meta / f".fedcba9876543210-{other}-d4.part", 7200),
             _aged(objects / "fedcba9876543210.safetensors", 7200),
             _aged(objects / f".upload-{process_tag()}-e5.part", 1)]  # this host and pid: an earlier run of ours
    AdapterStore(tmp_path, stale_after_s=3600)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in swept)


def test_start_sweeps_stale_audio_spool_files(tmp_path: Path) -> None:
    from service.spool import process_tag

    young = _aged(tmp_path / "rvc-upload-otherpod.7-x.part", 10)
    stale = _aged(tmp_path / "rvc-upload-otherpod.7-y.part", 7200)
    mine = _aged(tmp_path / f"rvc-upload-{process_tag()}-z.part", 1)
    with running_app(tmp_path) as c:
        assert c.get("/healthz").status_code == 200
    assert young.exists() and not stale.exists() and not mine.exists()


def test_deleted_by_another_replica_while_queued_is_404(tmp_path: Path) -> None:
    engine = BlockingEngine()
    with running_app(tmp_path, engine) as c:
        adapter_id = upload(c, adapter_bytes(tmp_path, 1)).json()["id"]
        results: list[object] = []
        blocker = threading.Thread(target=lambda: c.post("/convert", files={"audio": ("a.wav", sine_wav())}))
        blocker.start()
        assert engine.started.wait(10)
        queued = threading.Thread(target=lambda: results.append(
            c.post("/convert", data={"adapter": adapter_id}, files={"audio": ("a.wav", sine_wav())})))
        queued.start()
        worker = c.app.state.worker  # type: ignore[attr-defined]
        for _ in range(200):
            if worker.queued_audio_s > 0:
                break
            threading.Event().wait(0.01)
        AdapterStore(tmp_path / "store").delete(adapter_id)  # another process: no lease of ours holds the files
        engine.gate.set()
        blocker.join(20)
        queued.join(20)
        assert error_of(results[0]) == (404, "adapter_not_found")
        assert str(tmp_path) not in results[0].json()["error"]["message"]  # type: ignore[attr-defined]
        assert c.post("/convert", files={"audio": ("a.wav", sine_wav())}).status_code == 200
