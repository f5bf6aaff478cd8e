"""The worker on its own: scheduling order, starvation bound, admission, drops, drain; the cache tiers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from rvc_lora.adapters import AdapterInfo
from rvc_lora.errors import AdapterError
from service.cache import VoiceCache
from service.engine import ConvertOptions
from service.errors import ClientGone, QueueFull, ServiceStopping
from service.metrics import Metrics
from service.settings import Settings
from service.store import AdapterStore, StoredAdapter
from service.worker import ConvertWork, Job, JobResult, Scheduler, Throughput, Worker
from tests.test_service_engine import BlockingEngine, FakeEngine

META = AdapterInfo(name="v", r=4, lora_alpha=4.0, target_modules=("dec.ups.0",), base_fingerprint="f" * 64,
                   sr=40000, version="v2", f0=True)
AUDIO = np.full(1600, 0.1, dtype=np.float32)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _rec(name: str) -> StoredAdapter:
    return StoredAdapter(id=name.ljust(16, "0"), name=name, sha256=name * 8, size_bytes=1, index_sha256=None,
                         index_bytes=None, created_at="", info=META)


def _job(adapter: str | None = None, audio_s: float = 1.0, request_id: str = "r", deadline: float = 1e9) -> Job:
    return Job(request_id, ConvertWork(AUDIO, ConvertOptions(seed=1)), audio_s,
               None if adapter is None else _rec(adapter), deadline)


# scheduler

def _order(sched: Scheduler, resident: str = "") -> list[str]:
    out = []
    while len(sched):
        job = sched.pop(resident)
        resident = job.key
        out.append(job.request_id)
    return out


@pytest.mark.anyio
async def test_oldest_first_without_a_resident_match() -> None:
    sched = Scheduler(max_bypass=4)
    for i, adapter in enumerate(["a", "b", "c"]):
        sched.push(_job(adapter, request_id=str(i)))
    assert _order(sched, resident="zzz") == ["0", "1", "2"]


@pytest.mark.anyio
async def test_same_adapter_jobs_go_together() -> None:
    sched = Scheduler(max_bypass=4)
    for i, adapter in enumerate(["a", "b", "a", "b", "a"]):
        sched.push(_job(adapter, request_id=str(i)))
    assert _order(sched) == ["0", "2", "4", "1", "3"]


@pytest.mark.anyio
async def test_starvation_bound() -> None:
    sched = Scheduler(max_bypass=2)
    for i, adapter in enumerate(["a", "b", "a", "a", "a", "a"]):
        sched.push(_job(adapter, request_id=str(i)))
    assert _order(sched) == ["0", "2", "3", "1", "4", "5"]  # "1" is overtaken twice, then it runs


@pytest.mark.anyio
async def test_queued_audio_accounting() -> None:
    sched = Scheduler(max_bypass=0)
    jobs = [_job(audio_s=s) for s in (0.5, 1.5, 2.0)]
    for job in jobs:
        sched.push(job)
    assert sched.queued_audio_s == 4.0
    assert sched.remove(jobs[1]) and not sched.remove(jobs[1])
    assert sched.queued_audio_s == 2.5
    sched.pop("")
    sched.pop("")
    assert (len(sched), sched.queued_audio_s) == (0, 0.0)


def test_throughput_estimate() -> None:
    rate = Throughput(prior=1.0, alpha=0.5)
    assert rate.seconds_for(10) == 10
    rate.observe(audio_s=4.0, device_s=1.0)  # first measurement replaces the prior
    assert rate.seconds_for(8) == 2.0
    rate.observe(audio_s=2.0, device_s=1.0)
    assert rate.rate == 3.0


# cache tiers

class FakeBank:
    """A device tier of `slots` voices, LRU, with pins, as `AdapterBank` keeps them (voices are their keys)."""

    def __init__(self, slots: int) -> None:
        self.slots, self.resident, self.pinned = slots, list[str](), set[str]()  # resident: LRU first
        self.copies: list[str] = []

    def to_device(self, voice: str) -> bool:
        if voice in self.resident:
            self.resident.remove(voice)
            self.resident.append(voice)
            return True
        if len(self.resident) == self.slots:
            self.resident.remove(next(v for v in self.resident if v not in self.pinned))  # StopIteration: all pinned
        self.resident.append(voice)
        self.copies.append(voice)
        return False

    def drop_device(self, voice: str) -> None:
        if voice not in self.pinned and voice in self.resident:
            self.resident.remove(voice)

    def device_voices(self) -> int:
        return len(self.resident)


def test_voice_cache_tiers_and_lru() -> None:
    loads: list[str] = []
    bank = FakeBank(2)
    cache: VoiceCache[str] = VoiceCache(3, lambda _: 1, bank)

    def get(key: str) -> str:
        return cache.get(key, lambda: loads.append(key) or key)[1]

    assert [get(k) for k in ("a", "b", "a", "c")] == ["disk", "disk", "device", "disk"]  # c takes b's slot (LRU)
    assert get("b") == "host" and bank.resident == ["c", "b"]  # b left the bank, not the host: one copy back in
    assert get("d") == "disk" and bank.resident == ["b", "d"]  # a left the host (LRU a, c, b -> c, b, d)
    assert get("b") == "device" and get("a") == "disk"
    assert cache.sizes() == (2, 3)
    cache.discard("a")
    assert bank.resident == ["b"] and get("a") == "disk" and loads == ["a", "b", "c", "d", "a", "a"]
    assert bank.copies == ["a", "b", "c", "b", "d", "a", "a"]  # one copy per host hit or disk load, none per hit


def test_a_voice_leaves_the_bank_with_its_host_copy() -> None:
    """A request needs its voice's index too, which only the host copy holds: no resident voice without one."""
    bank = FakeBank(8)
    cache: VoiceCache[str] = VoiceCache(2, lambda _: 1, bank)
    for key in "abc":
        cache.get(key, lambda key=key: key)  # type: ignore[misc]
    assert bank.resident == ["b", "c"] and cache.sizes() == (2, 2)


def test_voice_cache_failed_load_changes_nothing() -> None:
    bank = FakeBank(2)
    cache: VoiceCache[str] = VoiceCache(3, lambda _: 1, bank)
    cache.get("a", lambda: "a")

    def bad() -> str:
        raise AdapterError("a.safetensors: not made for this base")

    with pytest.raises(AdapterError):
        cache.get("b", bad)
    assert (cache.sizes(), bank.resident, bank.copies) == ((1, 1), ["a"], ["a"])


# the worker

@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[tuple[Worker, BlockingEngine]]:
    engine = BlockingEngine()
    w = Worker(Settings(adapter_dir=tmp_path, max_queued_audio_s=3.0, max_audio_s=3.0, shutdown_grace_s=2.0),
               AdapterStore(tmp_path), Metrics(), lambda _: engine)
    w.start()
    await w.wait_loaded()
    yield w, engine
    engine.gate.set()
    await w.stop()


async def _until(predicate: Callable[[], bool]) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


@pytest.mark.anyio
async def test_client_gone_while_queued_is_dropped(worker: tuple[Worker, BlockingEngine]) -> None:
    w, engine = worker
    running = asyncio.create_task(w.submit(_job()))
    await _until(engine.started.is_set)
    gone = asyncio.Event()
    queued = asyncio.create_task(w.submit(_job(request_id="leaver"), gone.wait))
    await _until(lambda: w.queued_audio_s == 1.0)
    gone.set()
    with pytest.raises(ClientGone):
        await queued
    assert w.queued_audio_s == 0.0
    engine.gate.set()
    await running
    await w.submit(_job())  # runs after anything queued before it
    assert engine.calls == ["convert", "convert"]


@pytest.mark.anyio
async def test_queue_bound_counts_audio_seconds(worker: tuple[Worker, BlockingEngine]) -> None:
    w, engine = worker
    tasks = [asyncio.create_task(w.submit(_job()))]
    await _until(engine.started.is_set)
    tasks += [asyncio.create_task(w.submit(_job(audio_s=1.5))) for _ in range(2)]  # 3.0 s queued: at the bound
    await _until(lambda: w.queued_audio_s == 3.0)
    with pytest.raises(QueueFull) as full:
        await w.submit(_job(audio_s=0.1))
    assert full.value.retry_after is not None and full.value.retry_after >= 1
    engine.gate.set()
    await asyncio.gather(*tasks)


Running = asyncio.Task[JobResult]


async def _one_running_one_queued(tmp_path: Path, grace_s: float) -> tuple[Worker, BlockingEngine, Running, Running]:
    """A started worker whose engine holds one job running (until `engine.gate`) with one more queued."""
    engine = BlockingEngine()
    w = Worker(Settings(adapter_dir=tmp_path, shutdown_grace_s=grace_s), AdapterStore(tmp_path), Metrics(),
               lambda _: engine)
    w.start()
    await w.wait_loaded()
    running = asyncio.create_task(w.submit(_job()))
    await _until(engine.started.is_set)
    queued = asyncio.create_task(w.submit(_job()))
    await _until(lambda: w.queued_audio_s > 0)
    return w, engine, running, queued


@pytest.mark.anyio
async def test_stop_finishes_running_and_fails_queued(tmp_path: Path) -> None:
    w, engine, running, queued = await _one_running_one_queued(tmp_path, 5.0)
    w.begin_drain()
    with pytest.raises(ServiceStopping):
        await w.submit(_job())
    asyncio.get_running_loop().call_later(0.2, engine.gate.set)
    await w.stop()
    assert (await running).sr == 16000
    with pytest.raises(ServiceStopping):
        await queued


@pytest.mark.anyio
async def test_drain_fails_waiting_jobs_before_the_grace_ends(tmp_path: Path) -> None:
    w, engine, running, queued = await _one_running_one_queued(tmp_path, 0.4)
    w.begin_drain()
    with pytest.raises(ServiceStopping):
        await queued  # failed at grace - margin (0.3 s), so its client gets a 503 in time
    engine.gate.set()
    assert (await running).sr == 16000
    await w.stop()


@pytest.mark.anyio
async def test_a_fake_engine_round_trip(tmp_path: Path) -> None:
    w = Worker(Settings(adapter_dir=tmp_path), AdapterStore(tmp_path), Metrics(), lambda _: FakeEngine())
    w.start()
    result = await w.submit(_job())
    assert result.cache is None and set(result.timings) == {"queue", "f0", "synth"}
    await w.stop()


@pytest.mark.anyio
async def test_retry_after_says_when_room_will_exist(worker: tuple[Worker, BlockingEngine]) -> None:
    """Was: 1 s at the bound (computed from the excess over it), whatever was queued ahead. Here the device does
    0.5 s of audio per second, 1 s runs and 3 s wait (the bound): a 1 s request has room once the running job
    (~2 s) and 1 s of the queue (2 s) are done."""
    w, engine = worker
    w._rate.rate = 0.5
    tasks = [asyncio.create_task(w.submit(_job()))]
    await _until(engine.started.is_set)
    tasks += [asyncio.create_task(w.submit(_job())) for _ in range(3)]
    await _until(lambda: w.queued_audio_s == 3.0)
    with pytest.raises(QueueFull) as before_decoding:
        w.check_room()  # the request's length is unknown yet: a typical queued job's
    with pytest.raises(QueueFull) as longer:
        await w.submit(_job(audio_s=2.0))
    assert before_decoding.value.retry_after is not None and 3.0 <= before_decoding.value.retry_after <= 4.0
    assert longer.value.retry_after is not None and 5.0 <= longer.value.retry_after <= 6.0
    engine.gate.set()
    await asyncio.gather(*tasks)
