"""The adapter bank is the device tier of the voice cache (`service/cache.py`, `RVCEngine`): `X-Adapter-Cache` and
the cache metric name the tier a request's voice came from (device: resident in a slot; host: one copy of its host
copy into a slot; disk: read, checked, prepared, then that copy), the least recently used unpinned slot is the one
a new voice takes, every slot stays where it was allocated, and a voice evicted and loaded again renders the same
bytes. The fake-tier unit tests are in `test_service_worker.py`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from rvc_lora.errors import BankFullError
from service.app import create_app
from service.engine import ConvertOptions
from service.settings import Settings
from tests.test_service_engine import sine_wav, upload


def _settings(assets: dict[str, Any], tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(**{"model": assets["model"], "hubert": assets["hubert"], "max_rank": 8, "device": "cpu",
                       "adapter_dir": tmp_path / "store", "work_dir": tmp_path, "warmup": False, "cpu_threads": 1,
                       **overrides})


def _lookups(metrics: str) -> dict[str, float]:
    """Cache lookups by tier, from `rvc_lora_adapter_cache_lookups_total`."""
    found = re.findall(r'^rvc_lora_adapter_cache_lookups_total\{result="(\w+)",tier="(\w+)"\} ([0-9.e+]+)$', metrics,
                       re.M)
    return {tier: float(n) for _, tier, n in found}


def test_the_default_bank_serves_the_pipelined_worker() -> None:
    assert Settings().bank_slots == 8
    assert "device_cache_size" not in Settings.model_fields  # one setting sizes the device tier


@pytest.mark.parametrize("batching", [True, False])
def test_tiers_come_from_the_bank_and_an_evicted_voice_renders_the_same_bytes(
        tiny_service_assets: dict[str, Any], tmp_path: Path, batching: bool) -> None:
    """One slot, two voices: A from disk, A again (resident), B (from disk, takes A's slot), A again (from its host
    copy: one copy back into the slot), with the same bytes as the first time; both workers."""
    settings = _settings(tiny_service_assets, tmp_path, bank_slots=1, batching=batching)
    with TestClient(create_app(settings)) as client:
        ids = [upload(client, p.read_bytes()).json()["id"] for p in tiny_service_assets["adapters"][:2]]
        model = client.get("/model").json()
        assert model["bank_slots"] == 1 and model["bank_slot_bytes"] > 0

        def convert(i: int) -> tuple[str, bytes]:
            r = client.post("/convert", data={"adapter": ids[i], "seed": "5", "f0_method": "pm"},
                            files={"audio": ("a.wav", sine_wav(0.5, freq=180.0))})
            assert r.status_code == 200, r.text
            return r.headers["X-Adapter-Cache"], r.content

        (first_tier, first), (again_tier, again) = convert(0), convert(0)
        other_tier, other = convert(1)
        evicted_tier, evicted = convert(0)
        metrics = client.get("/metrics").text
    assert [first_tier, again_tier, other_tier, evicted_tier] == ["miss", "hit", "miss", "miss"]
    assert _lookups(metrics) == {"device": 1, "host": 1, "disk": 2}
    assert first == again == evicted != other
    assert re.search(r"^rvc_lora_bank_slots 1\.0$", metrics, re.M)
    assert re.search(rf"^rvc_lora_bank_slot_bytes {float(model['bank_slot_bytes'])}$", metrics, re.M)
    assert re.search(r'^rvc_lora_resident_adapters\{tier="device"\} 1\.0$', metrics, re.M)


def test_lru_eviction_of_unpinned_slots_in_place_and_every_slot_pinned(tiny_service_assets: dict[str, Any]) -> None:
    """Two slots, three voices: the least recently used unpinned voice leaves, no slot tensor moves; with every slot
    pinned a load is refused and changes nothing, and a batch of more voices than slots runs in runs of at most
    `bank_slots` voices (each run's pins released before the next loads), every row as it renders alone."""
    from service.rvc_engine import load_engine

    engine: Any = load_engine(_settings(tiny_service_assets, Path("."), bank_slots=2))
    bank = engine._bank
    a, b, c = (engine.load_voice(p, None) for p in tiny_service_assets["adapters"][:3])
    pointers = [t.data_ptr() for t in (*bank._a, *bank._b, *bank._v)]
    assert [engine.to_device(v) for v in (a, b, a)] == [False, False, True]
    assert not engine.to_device(c)  # b was the least recently used
    assert (bank.holds(a.key), bank.holds(b.key), bank.holds(c.key), engine.device_voices()) == (True, False, True, 2)
    snapshot = [t.clone() for t in (*bank._a, *bank._b)]
    with bank.hold([(a.key, a.adapter), (c.key, c.adapter)]):
        with pytest.raises(BankFullError, match="pinned"):
            engine.to_device(b)
    assert all((t == s).all() for t, s in zip((*bank._a, *bank._b), snapshot, strict=True))
    assert not bank.holds(b.key) and [bank.pinned(s) for s in range(2)] == [0, 0]

    def row(voice: Any, seed: int) -> Any:
        stages = engine.stages(np.sin(np.arange(8000, dtype=np.float32) / 9), ConvertOptions(seed=seed,
                                                                                              f0_method="pm"), voice)
        assert stages.prepare() == 1
        return stages.row(0, stages.encode(0))

    rows = [row(v, seed) for seed, v in enumerate((a, b, c))]
    together = engine.synthesize(rows)
    alone = [engine.synthesize([r])[0] for r in rows]
    for got, want in zip(together, alone, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert [t.data_ptr() for t in (*bank._a, *bank._b, *bank._v)] == pointers
