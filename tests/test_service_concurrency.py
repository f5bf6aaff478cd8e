"""Concurrency correctness: 40 concurrent /convert over 4 adapters each return exactly the bytes that the
same request returns alone, so no voice bleeds into another request."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.settings import Settings
from tests.test_service_engine import FAKE_VOICE_BYTES, FakeEngine, adapter_bytes, sine_wav

N_REQUESTS, N_ADAPTERS = 40, 4


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _convert(client: httpx.AsyncClient, i: int, adapters: list[str]) -> bytes:
    adapter = adapters[i % len(adapters)]
    r = await client.post("/convert", data={"adapter": adapter, "seed": str(i), "f0_up_key": str(i % 5)},
                          files={"audio": ("in.wav", sine_wav(0.25, freq=150.0 + 10 * i))})
    assert r.status_code == 200, r.text
    assert r.headers["X-Adapter"] == adapter
    return r.content


async def check_no_bleed(app: FastAPI, adapter_files: list[bytes]) -> None:
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as client:
        adapters = []
        for data in adapter_files:
            r = await client.post("/adapters", files={"file": ("a.safetensors", data)})
            assert r.status_code == 201, r.text
            adapters.append(r.json()["id"])
        alone = [await _convert(client, i, adapters) for i in range(N_REQUESTS)]
        together = await asyncio.gather(*(_convert(client, i, adapters) for i in range(N_REQUESTS)))
        assert len(set(alone)) == N_REQUESTS  # every request is distinct, so a mix-up could not hide
        mismatched = [i for i in range(N_REQUESTS) if together[i] != alone[i]]
        assert not mismatched, f"requests {mismatched} differ from their solo result"
        metrics = (await client.get("/metrics")).text
        assert "rvc_lora_adapter_swaps_total" in metrics


@pytest.mark.anyio
async def test_concurrent_requests_match_solo_requests_fake_engine(tmp_path: Path) -> None:
    app = create_app(Settings(adapter_dir=tmp_path / "store", bank_slots=2,
                              host_cache_bytes=3 * FAKE_VOICE_BYTES), engine_factory=lambda _: FakeEngine())
    await check_no_bleed(app, [adapter_bytes(tmp_path, seed) for seed in range(N_ADAPTERS)])


@pytest.mark.anyio
async def test_concurrent_requests_match_solo_requests_real_engine(
        tmp_path: Path, tiny_service_assets: dict[str, Path | list[Path]]) -> None:
    """The one-at-a-time worker, byte for byte; the batched one: `test_service_batching.py` (to 1 int16 unit)."""
    settings = Settings(model=tiny_service_assets["model"], hubert=tiny_service_assets["hubert"], max_rank=8,
                        adapter_dir=tmp_path / "store", bank_slots=2, host_cache_bytes=3 * FAKE_VOICE_BYTES,
                        batching=False)
    adapters = tiny_service_assets["adapters"]
    assert isinstance(adapters, list)
    await check_no_bleed(create_app(settings), [p.read_bytes() for p in adapters])
