"""A store of many adapters (per-request cost, pagination) and races between uploads, deletes and conversions."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import service.media
import service.store
from rvc_lora.adapters import AdapterInfo, load_adapter
from rvc_lora.errors import AdapterNotFoundError
from service.schemas import AdapterOut
from service.store import SETTLED_S, AdapterStore, StoredAdapter
from tests.test_service_adapters import META, error_of, stored_files
from tests.test_service_engine import (
    BlockingEngine,
    FakeEngine,
    adapter_bytes,
    make_adapter,
    running_app,
    sine_wav,
    upload,
)


def commit(store: AdapterStore, data: bytes, name: str | None) -> Any:
    return store.commit(store.stage(io.BytesIO(data), 1 << 20, "adapter file"), None, name, META)[0]


def settle(store: AdapterStore) -> None:
    """As if nothing had changed in the store for a while (instead of sleeping SETTLED_S)."""
    old = time.time() - 10 * SETTLED_S
    os.utime(store.meta_dir, (old, old))


@pytest.fixture
def listings(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every directory listing the store makes."""
    seen: list[str] = []
    real = os.scandir

    def scandir(path: Any) -> Any:
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(service.store.os, "scandir", scandir)
    yield seen


def test_lookups_and_misses_do_not_list_or_read_the_store(tmp_path: Path, listings: list[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    store = AdapterStore(tmp_path)
    recs = [commit(store, f"adapter-{i}".encode(), f"voice-{i}") for i in range(300)]
    settle(store)
    store.refresh()
    reads: list[Path] = []
    monkeypatch.setattr(AdapterStore, "_read_record", lambda self, p: reads.append(p))
    listings.clear()
    for _ in range(50):
        assert store.resolve("voice-150") == recs[150] and store.resolve(recs[7].id) == recs[7]
        for ref in ("nobody", "0123456789abcdef"):  # unknown name or id: 404 without reading the folder
            with pytest.raises(AdapterNotFoundError):
                store.resolve(ref)
        assert store.page(100, 10) == (recs[100:110], 300)
    assert listings == [] and reads == []


def test_a_settled_store_still_sees_other_replicas(tmp_path: Path) -> None:
    mine, other = AdapterStore(tmp_path), AdapterStore(tmp_path)
    settle(mine)
    with pytest.raises(AdapterNotFoundError):
        mine.resolve("later")  # the listing is now trusted until meta/ changes
    rec = commit(other, b"adapter-later", "later")
    assert mine.resolve("later") == rec
    settle(mine)
    mine.refresh()
    other.delete(rec.id)
    assert mine.page(0, 10) == ([], 0)


def test_listing_is_paginated(tmp_path: Path) -> None:
    with running_app(tmp_path) as c:
        ids = [upload(c, adapter_bytes(tmp_path, i), name=f"v{i}").json()["id"] for i in range(5)]
        pages, offset = [], 0
        while offset is not None:
            body = c.get("/adapters", params={"limit": 2, "offset": offset}).json()
            assert body["total"] == 5
            pages.append([a["id"] for a in body["adapters"]])
            offset = body["next_offset"]
        assert pages == [ids[:2], ids[2:4], ids[4:]]  # oldest first
        assert c.get("/adapters").json() | {"adapters": None} == {"adapters": None, "total": 5, "next_offset": None}
        assert c.get("/adapters", params={"offset": 9}).json()["adapters"] == []
        for params in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"limit": "x"}):
            assert error_of(c.get("/adapters", params=params)) == (422, "invalid_request")


def test_default_page_is_bounded(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    for i in range(150):
        commit(store, f"adapter-{i}".encode(), None)
    with running_app(tmp_path) as c:
        body = c.get("/adapters").json()
        assert (len(body["adapters"]), body["total"], body["next_offset"]) == (100, 150, 100)
        assert len(c.get("/adapters", params={"limit": 1000}).json()["adapters"]) == 150


# races: requests in threads against one in-process app

class GatedEngine(FakeEngine):
    """Uploads wait at a barrier after their bytes are staged and checked, so two of them commit together."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=20)

    def describe_adapter(self, path: Path) -> AdapterInfo:
        info = super().describe_adapter(path)
        self.barrier.wait()
        return info


def together(*calls: Any) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_two_uploads_of_different_bytes_under_one_name(tmp_path: Path) -> None:
    one, two = adapter_bytes(tmp_path, 1), adapter_bytes(tmp_path, 2)
    with running_app(tmp_path, GatedEngine(2)) as c:
        a, b = together(lambda: upload(c, one, name="alice"), lambda: upload(c, two, name="alice"))
        assert sorted([a.status_code, b.status_code]) == [201, 409]
        winner = a if a.status_code == 201 else b
        assert error_of(b if winner is a else a) == (409, "conflict")
        assert [x["id"] for x in c.get("/adapters").json()["adapters"]] == [winner.json()["id"]]
        assert c.get("/adapters/alice").json()["id"] == winner.json()["id"]
        wid = winner.json()["id"]
        assert stored_files(tmp_path) == [f"meta/{wid}.json", f"objects/{wid}.safetensors"]  # no half of the loser


def test_two_uploads_of_the_same_bytes(tmp_path: Path) -> None:
    data = adapter_bytes(tmp_path, 3)
    with running_app(tmp_path, GatedEngine(2)) as c:
        a, b = together(lambda: upload(c, data, name="bob"), lambda: upload(c, data, name="bob"))
        assert sorted([a.status_code, b.status_code]) == [200, 201] and a.json()["id"] == b.json()["id"]
        assert c.get("/adapters").json()["total"] == 1
        assert len(stored_files(tmp_path)) == 2


def test_delete_while_converting_lets_the_running_request_finish(tmp_path: Path) -> None:
    engine = BlockingEngine()
    with running_app(tmp_path, engine) as c:
        adapter_id = upload(c, adapter_bytes(tmp_path, 1), name="carol").json()["id"]
        running: list[Any] = []
        t = threading.Thread(target=lambda: running.append(
            c.post("/convert", data={"adapter": "carol"}, files={"audio": ("a.wav", sine_wav())})))
        t.start()
        assert engine.started.wait(10)
        assert c.delete("/adapters/carol").status_code == 204
        assert error_of(c.post("/convert", data={"adapter": "carol"}, files={"audio": ("a.wav", sine_wav())})) == (
            404, "adapter_not_found")  # a request arriving after the delete
        engine.gate.set()
        t.join(20)
        assert running[0].status_code == 200 and running[0].headers["X-Adapter"] == adapter_id
        assert stored_files(tmp_path) == []


def test_delete_while_the_upload_is_decoded_lets_the_request_finish(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter was resolved before the audio was decoded; the delete lands in between. (The request used to
    reach the device with the files gone: 404.)"""
    decoding, release = threading.Event(), threading.Event()
    real = service.media.read_audio

    def slow_read_audio(*args: Any, **kwargs: Any) -> Any:
        decoding.set()
        release.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(service.media, "read_audio", slow_read_audio)
    with running_app(tmp_path) as c:
        adapter_id = upload(c, adapter_bytes(tmp_path, 1), name="dave").json()["id"]
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(
            c.post("/convert", data={"adapter": "dave"}, files={"audio": ("a.wav", sine_wav())})))
        t.start()
        assert decoding.wait(10)
        assert c.delete(f"/adapters/{adapter_id}").status_code == 204
        release.set()
        t.join(20)
        assert result[0].status_code == 200 and result[0].headers["X-Adapter"] == adapter_id
        assert stored_files(tmp_path) == []


def test_delete_then_upload_the_same_bytes_again(tmp_path: Path) -> None:
    data = adapter_bytes(tmp_path, 4)
    with running_app(tmp_path) as c:
        first = upload(c, data, name="erin").json()
        assert c.post("/convert", data={"adapter": "erin"}, files={"audio": ("a.wav", sine_wav())}).status_code == 200
        assert c.delete("/adapters/erin").status_code == 204
        again = upload(c, data, name="erin")
        assert again.status_code == 201 and again.json()["id"] == first["id"]
        r = c.post("/convert", data={"adapter": "erin"}, files={"audio": ("a.wav", sine_wav())})
        assert r.status_code == 200 and r.headers["X-Adapter"] == first["id"]
        assert len(stored_files(tmp_path)) == 2


# one adapter record: the file's AdapterInfo is the store's record and the HTTP body's fields

def test_the_stored_record_is_the_files_info_and_http_shows_it_field_for_field(tmp_path: Path) -> None:
    path = make_adapter(tmp_path / "v.safetensors", 3, rank=2, name="alice's voice")
    info = load_adapter(path).info
    store = AdapterStore(tmp_path / "store")
    rec = store.commit(store.stage(io.BytesIO(path.read_bytes()), 1 << 20, "adapter file"), None, "alice",
                       FakeEngine().describe_adapter(path))[0]
    again = AdapterStore(tmp_path / "store").resolve("alice")  # read back from its commit record on disk
    assert rec.info == again.info == info
    body = AdapterOut.of(again).model_dump()
    assert (body["label"], body["rank"]) == (info.name, info.r)
    for field in ("lora_alpha", "base_fingerprint", "sr", "version", "f0"):
        assert body[field] == getattr(info, field)
    assert body["target_modules"] == list(info.target_modules)


def test_http_adapter_fields_are_generated_from_the_record() -> None:
    """Every AdapterInfo field HTTP shows is a field of AdapterOut, with the record's type: none copied by hand."""
    shown = {"name": "label", "r": "rank", "lora_alpha": "lora_alpha", "target_modules": "target_modules",
             "base_fingerprint": "base_fingerprint", "sr": "sr", "version": "version", "f0": "f0"}
    out = AdapterOut.model_fields
    assert [k for k in out if k in shown.values()] == list(shown.values())  # in the record's order
    assert out["rank"].annotation is int and out["label"].annotation is str and out["f0"].annotation is bool


def test_records_committed_before_the_info_form_are_still_read(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    rec = commit(store, b"adapter-old", "old")
    legacy = {k: v for k, v in rec.to_json().items() if k != "info"}
    legacy["meta"] = {"label": "v", "rank": 4, "lora_alpha": 4.0, "target_modules": list(META.target_modules),
                      "base_fingerprint": META.base_fingerprint, "sr": 40000, "version": "v2", "f0": True,
                      "extraction": {"rank": 4}}
    (tmp_path / "meta" / f"{rec.id}.json").write_text(json.dumps(legacy))
    old = AdapterStore(tmp_path).resolve("old")
    assert old.info == AdapterInfo(**{**vars(META), "extraction": '{"rank": 4}'})
    assert old == StoredAdapter.from_json(old.to_json(), "again")  # and written back in the new form
