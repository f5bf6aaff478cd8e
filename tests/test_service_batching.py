"""The pipelined worker: seeded requests give the same audio whatever batch they land in, a long input takes
turns with short requests, and a failing row fails its own request only."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from service.app import create_app
from service.engine import ConvertOptions, ModelInfo, Rendered, Row
from service.errors import DeviceOutOfMemory
from service.metrics import Metrics
from service.settings import Settings
from service.store import AdapterStore
from service.worker import ConvertWork, Job, Worker
from tests.test_service_engine import (
    FAIL_SEED,
    FAKE_INFO,
    BlockingEngine,
    FakeEngine,
    FakeStages,
    running_app,
    sine_wav,
)

N_REQUESTS = 40


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _batches(metrics: str) -> tuple[float, float]:
    """(batches, batches of one row) from the batch-size histogram."""
    count = float(re.search(r"^rvc_lora_batch_rows_count ([0-9.e+]+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    ones = float(re.search(r'^rvc_lora_batch_rows_bucket\{le="1.0"\} ([0-9.e+]+)$', metrics, re.M).group(1))  # type: ignore[union-attr]
    return count, ones


def _more_adapters(base: Path, folder: Path, seeds: Sequence[int]) -> list[Path]:
    """Rank-4 and rank-2 adapters (random weights) for `base`, beside the four the shared fixture makes."""
    from rvc_lora.lora import LoRAConfig
    from rvc_lora.voice import load_synthesizer_with_lora, save_adapter

    out = []
    for seed in seeds:
        rank = 4 if seed % 2 else 2
        synth = load_synthesizer_with_lora(base, LoRAConfig(r=rank, lora_alpha=rank, target_modules=["ups",
                                                                                                   "resblocks"]))
        gen = torch.Generator().manual_seed(seed)
        synth.load_lora_weights({k: torch.randn(v.shape, generator=gen) * 0.1
                                 for k, v in synth.get_lora_state_dict().items()})
        out.append(save_adapter(folder / f"extra{seed}.safetensors", synth, name=f"extra{seed}"))
    return out


@pytest.mark.anyio
@pytest.mark.parametrize("batch_way", ["by_voice", "auto"])
async def test_concurrent_seeded_requests_equal_solo_requests_with_batching(
        tmp_path: Path, tiny_service_assets: dict[str, Any], batch_way: str) -> None:
    """40 concurrent seeded /convert over 8 adapters and the base voice (real engine, tiny models, batching on,
    4 bank slots so that batches also cycle voices through the slots): each response's samples equal the same
    request sent alone to within 1 int16 unit, not byte for byte: a padded batch of several rows sums floats in
    another order than the forward of one row, which moves a few samples across a rounding edge (measured: 18 to
    37 of the 40 responses have some sample 1 unit off, as the batches fall, none more). `by_voice` (the CPU
    default: one voice per device call) and `auto` (several voices per call, vmap tried) both; 16 requests in the
    pipeline (an accelerator's default) so that batches fill."""
    model = tiny_service_assets["model"]
    adapters = [*tiny_service_assets["adapters"], *_more_adapters(model, tmp_path, (11, 12, 13, 14))]
    settings = Settings(model=model, hubert=tiny_service_assets["hubert"], max_rank=8, adapter_dir=tmp_path / "store",
                        bank_slots=4, max_batch_frames=4000, cpu_threads=2, batching=True, pipeline_jobs=16,
                        batch_way=batch_way)
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=300) as client:
        ids = []
        for path in adapters:
            r = await client.post("/adapters", files={"file": (path.name, path.read_bytes())})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        voices: list[str | None] = [None, *ids]

        async def convert(i: int) -> np.ndarray:
            adapter = voices[i % len(voices)]
            data = {"seed": str(1000 + i), "f0_up_key": str(i % 3), "f0_method": "pm"}
            if adapter is not None:
                data["adapter"] = adapter
            r = await client.post("/convert", data=data,
                                  files={"audio": ("in.wav", sine_wav(0.2 + 0.05 * (i % 4), freq=120.0 + 7 * i))})
            assert r.status_code == 200, r.text
            return np.asarray(sf.read(io.BytesIO(r.content), dtype="int16")[0], dtype=np.int32)

        alone = [await convert(i) for i in range(N_REQUESTS)]
        before = _batches((await client.get("/metrics")).text)
        together = await asyncio.gather(*(convert(i) for i in range(N_REQUESTS)))
        after = _batches((await client.get("/metrics")).text)
    assert len({a.tobytes() for a in alone}) == N_REQUESTS  # all distinct: a mix-up could not hide
    assert after[0] - before[0] > after[1] - before[1], "no batch of more than one row happened"
    worst = [int(np.abs(t - a).max()) if len(t) == len(a) else -1 for t, a in zip(together, alone, strict=True)]
    assert all(0 <= w <= 1 for w in worst), f"max int16 difference per request (-1: length): {worst}"


def test_the_engine_sets_torch_threads_only_when_told(tiny_service_assets: dict[str, Any]) -> None:
    """Unset, torch keeps one thread per core (the CPU stages share them); set, the engine's process uses that many
    (tests/conftest.py restores the count afterwards)."""
    import torch

    from service.rvc_engine import load_engine

    before = torch.get_num_threads()
    load_engine(Settings(model=tiny_service_assets["model"], hubert=tiny_service_assets["hubert"], max_rank=8))
    assert torch.get_num_threads() == before
    told = 1 if before > 1 else 2
    load_engine(Settings(model=tiny_service_assets["model"], hubert=tiny_service_assets["hubert"], max_rank=8,
                         torch_threads=told))
    assert torch.get_num_threads() == told



def test_a_cpu_engine_batches_voices_one_forward_each_unless_told(tiny_service_assets: dict[str, Any]) -> None:
    """The bank's way for several voices: unset, its CPU default (`by_voice`: vmap's trials cost whole batches and
    it never won on a CPU); set, what the operator chose. The setting's choices are the bank's."""
    from typing import get_args

    from rvc_lora.voice.bank import Strategy
    from service.rvc_engine import RVCEngine

    assets = {"model": tiny_service_assets["model"], "hubert": tiny_service_assets["hubert"], "max_rank": 8}
    assert RVCEngine(Settings(**assets))._bank.strategy == "by_voice"
    for way in get_args(Strategy):
        assert RVCEngine(Settings(**assets, batch_way=way))._bank.strategy == way
    assert set(get_args(get_args(Settings.model_fields["batch_way"].annotation)[0])) == set(get_args(Strategy))
    with pytest.raises(ValueError, match="batch_way"):
        Settings(**assets, batch_way="fastest")

class StageThreadsEngine(FakeEngine):
    """A fake on `device` that records which thread ran each stage of a conversion."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device
        self.ran: dict[str, set[str]] = {}

    @property
    def info(self) -> ModelInfo:
        return dataclasses.replace(FAKE_INFO, device=self.device)

    def stages(self, audio16k: np.ndarray, options: ConvertOptions, voice: object | None) -> FakeStages:
        ran = self.ran

        class Recording(FakeStages):
            def prepare(self) -> int:
                ran.setdefault("prepare", set()).add(threading.current_thread().name)
                return super().prepare()

            def row(self, i: int, encoded: object) -> Row:
                ran.setdefault("row", set()).add(threading.current_thread().name)
                return super().row(i, encoded)

            def finish(self, outputs: Sequence[np.ndarray]) -> Rendered:
                ran.setdefault("finish", set()).add(threading.current_thread().name)
                return super().finish(outputs)

        return Recording(audio16k, options, voice)


@pytest.mark.parametrize(("device", "cpu_threads", "where"), [
    ("cpu", None, "rvc-device"),  # the CPU is the device: its cores are torch's, the stages take turns with it
    ("cuda", None, "rvc-cpu"),
    ("cuda", 0, "rvc-device"),
    ("cpu", 2, "rvc-cpu"),
])
def test_cpu_stages_run_on_the_device_thread_when_the_device_is_the_cpu(
        tmp_path: Path, device: str, cpu_threads: int | None, where: str) -> None:
    engine = StageThreadsEngine(device)
    with running_app(tmp_path, engine, batching=True, cpu_threads=cpu_threads) as client:
        for seed in range(3):
            r = client.post("/convert", data={"seed": str(seed)}, files={"audio": ("in.wav", sine_wav(0.3))})
            assert r.status_code == 200, r.text
    assert set(engine.ran) == {"prepare", "row", "finish"}
    for stage, threads in engine.ran.items():
        assert {name.split("_")[0] for name in threads} == {where}, (stage, threads)


def test_stage_threads_setting_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cpu_threads"):
        Settings(adapter_dir=tmp_path, cpu_threads=-1)


class ChunkedEngine(FakeEngine):
    """A fake whose conversion has one 0.1 s chunk per 0.1 s of input, each taking 20 ms of device time; it
    records the order in which requests' rows reach the device."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[tuple[float, int]] = []  # (input seconds of the request, chunk index)
        self.lock = threading.Lock()

    def stages(self, audio16k: np.ndarray, options: ConvertOptions, voice: object | None) -> Any:
        engine = self

        class Stages:
            prepare_on_device = False

            def prepare(self) -> int:
                return max(len(audio16k) // 1600, 1)

            def encode(self, i: int) -> object:
                return i

            def row(self, i: int, encoded: object) -> Row:
                return Row(10, (len(audio16k) / 16000, i))

            def finish(self, outputs: Sequence[np.ndarray]) -> Rendered:
                return Rendered(np.concatenate(outputs), 16000, {})

        del engine
        return Stages()

    def synthesize(self, rows: Sequence[Row]) -> list[np.ndarray]:
        time.sleep(0.02)
        self.order += [row.inputs for row in rows]
        return [np.zeros(1600, np.float32) for _ in rows]


@pytest.mark.anyio
async def test_a_long_input_takes_turns_with_short_requests(tmp_path: Path) -> None:
    engine = ChunkedEngine()
    w = Worker(Settings(adapter_dir=tmp_path), AdapterStore(tmp_path), Metrics(), lambda _: engine)
    w.start()
    await w.wait_loaded()

    def job(seconds: float) -> Job:
        audio = np.zeros(int(seconds * 16000), np.float32)
        return Job("r", ConvertWork(audio, ConvertOptions(seed=1)), seconds, None, 1e9)

    long = asyncio.create_task(w.submit(job(6.0)))  # 60 chunks: >= 1.2 s of device time
    while len(engine.order) < 3:
        await asyncio.sleep(0.01)
    start = time.monotonic()
    await w.submit(job(0.1))
    short_s = time.monotonic() - start
    assert not long.done() and short_s < 0.5, f"the short request took {short_s:.2f} s"
    await long
    firsts = [i for i, (seconds, _) in enumerate(engine.order) if seconds == 0.1]
    assert len(firsts) == 1 and firsts[0] < len(engine.order) - 10  # between the long input's chunks
    await w.stop()


class BatchOOMEngine(BlockingEngine):
    """Runs out of device memory for any batch of more than one row."""

    def synthesize(self, rows: Sequence[Row]) -> list[np.ndarray]:
        if len(rows) > 1:
            raise DeviceOutOfMemory("the device ran out of memory (simulated)", retry_after=5)
        return super().synthesize(rows)


@pytest.mark.parametrize(("engine_type", "batching"), [(BlockingEngine, True), (BlockingEngine, False),
                                                       (BatchOOMEngine, True)])
def test_a_failing_row_fails_its_request_only(tmp_path: Path, engine_type: type[BlockingEngine],
                                              batching: bool) -> None:
    """Four requests wait while the device is busy, then go in one batch; the one whose row raises gets a 500,
    the others their audio (the batch was split and retried). A batch out of device memory is split the same
    way before any request gets a 503."""
    engine = engine_type()
    with running_app(tmp_path, engine, batching=batching, pipeline_jobs=16) as client:  # room for all five
        results: dict[int, int] = {}

        def send(seed: int) -> None:
            r = client.post("/convert", data={"seed": str(seed)}, files={"audio": ("a.wav", sine_wav(0.2))})
            results[seed] = r.status_code

        first = threading.Thread(target=send, args=(1,))
        first.start()
        assert engine.started.wait(10)
        others = [threading.Thread(target=send, args=(seed,)) for seed in (2, FAIL_SEED, 3, 4)]
        for t in others:
            t.start()
        for _ in range(200):
            if client.get("/status").json()["queue"]["jobs"] == 4:
                break
            time.sleep(0.02)
        engine.gate.set()
        for t in (first, *others):
            t.join(20)
        assert results == {1: 200, 2: 200, FAIL_SEED: 500, 3: 200, 4: 200}
        if batching:
            count, ones = _batches(client.get("/metrics").text)
            assert count > ones  # the four went in one batch (then split around the failing row)


def test_the_single_voice_path_sees_what_the_bank_wrote(tiny_service_assets: dict[str, Any]) -> None:
    """Was: after a batch had loaded voice B into the bank's slot 0 (the resident memory), a one-at-a-time
    conversion with voice A, resident before, skipped its swap and ran in voice B. (The service's own paths run in
    the voice's bank slot: `test_service_cache.py`; this is the library's `use_adapter` beside a bank.)"""
    from service.rvc_engine import load_engine

    engine: Any = load_engine(Settings(model=tiny_service_assets["model"], hubert=tiny_service_assets["hubert"],
                                       max_rank=8, bank_slots=1))
    a, b = (engine.load_voice(p, None) for p in tiny_service_assets["adapters"][:2])  # host copies
    vc, bank = engine._vc, engine._bank
    assert vc.use_adapter(a.adapter) and not vc.use_adapter(a.adapter)
    with bank.hold([(b.key, b.adapter)]):
        pass
    assert vc.model.slots.resident is b.adapter
    assert vc.use_adapter(a.adapter)  # swapped back in


@pytest.mark.anyio
async def test_stream_blocks_waiting_together_go_to_the_device_in_one_cut(tmp_path: Path) -> None:
    """Three streams' blocks arrive while the device thread is busy: one `cut` call takes all three (the engine
    shares one content-encoder forward), each gets its own result, and an error for one block fails that block
    only; a block arriving later gets a call of its own. The batcher waits until all three have returned."""
    w = Worker(Settings(adapter_dir=tmp_path), AdapterStore(tmp_path), Metrics(), lambda _: FakeEngine())
    calls: list[list[str]] = []

    def cut(items: list[str]) -> list[str | Exception]:
        calls.append(items)
        return [ValueError(f"bad {i}") if i == "b" else i.upper() for i in items]

    started, gate = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(10)

    busy = asyncio.ensure_future(w.on_device(hold))
    while not started.is_set():
        await asyncio.sleep(0.01)
    steps = [asyncio.ensure_future(w.stream_step(i, cut)) for i in "abc"]
    await asyncio.sleep(0.05)
    assert w._stream_steps == 3 and not calls
    gate.set()
    await busy
    results = await asyncio.gather(*steps, return_exceptions=True)
    assert calls == [["a", "b", "c"]] and w._stream_steps == 0
    assert results[0] == "A" and results[2] == "C" and isinstance(results[1], ValueError)
    assert await w.stream_step("d", cut) == "D" and calls[1:] == [["d"]]


@pytest.mark.anyio
async def test_a_stream_block_is_taken_before_an_older_conversion_row(tmp_path: Path) -> None:
    """The batcher's order: realtime stream rows first (oldest first among them), then conversion rows oldest job
    first; `max_batch_frames` still bounds a batch, and rows nobody waits for are dropped."""
    from service.worker import _WaitingRow

    w = Worker(Settings(adapter_dir=tmp_path, max_batch_frames=20), AdapterStore(tmp_path), Metrics(),
               lambda _: FakeEngine())
    loop = asyncio.get_running_loop()

    def waiting(job: Job | None, frames: int, since: float) -> _WaitingRow:
        return _WaitingRow(job, Row(frames, None), 0.1, loop.create_future(), since)

    old, gone = (Job(name, ConvertWork(np.zeros(1600, np.float32), ConvertOptions()), 0.1, None, 1e9)
                 for name in ("old", "gone"))
    for job, at in ((old, 1.0), (gone, 0.5)):
        job.future, job.enqueued_at = loop.create_future(), at
    gone.future.cancel()  # its client left
    convert, dropped = waiting(old, 10, 1.0), waiting(gone, 10, 0.5)
    stream_a, stream_b = waiting(None, 10, 3.0), waiting(None, 10, 2.0)
    left = waiting(None, 10, 2.5)
    left.future.cancel()  # its stream closed
    w._rows = [dropped, convert, stream_a, left, stream_b]
    assert w._take_batch() == [stream_b, stream_a]  # 20 frames: the older /convert row waits
    assert dropped.future.cancelled() and w._rows == [convert]
    w._rows.append(waiting(None, 15, 4.0))
    first = w._take_batch()
    assert [r.job for r in first] == [None] and w._take_batch() == [convert]


class ByVoiceEngine(FakeEngine):
    """A fake whose batches of several voices run one forward per voice (as a CPU bank's do)."""

    @property
    def info(self) -> ModelInfo:
        return dataclasses.replace(FAKE_INFO, batch_way="by_voice")


@pytest.mark.anyio
@pytest.mark.parametrize("engine_type", [ByVoiceEngine, FakeEngine])
async def test_an_engine_running_voices_one_by_one_gets_one_voice_per_call(
        tmp_path: Path, engine_type: type[FakeEngine]) -> None:
    """`batch_way` "by_voice": each device call takes the oldest row's voice (rows of other voices wait for the next
    call instead of for its forward), oldest first, within `max_batch_frames`; other engines mix voices."""
    from service.worker import _WaitingRow

    w = Worker(Settings(adapter_dir=tmp_path, max_batch_frames=30), AdapterStore(tmp_path), Metrics(),
               lambda _: engine_type())
    w._engine = engine_type()
    loop = asyncio.get_running_loop()

    def waiting(voice: str, since: float) -> _WaitingRow:
        job = Job(voice, ConvertWork(np.zeros(1600, np.float32), ConvertOptions()), 0.1, None, 1e9)
        job.future, job.enqueued_at = loop.create_future(), since
        return _WaitingRow(job, Row(10, None, voice), 0.1, loop.create_future(), since)

    rows = [waiting(voice, since) for since, voice in enumerate(["a", "b", "a", "", "a", "a", "b"])]
    w._rows = list(rows)
    calls = []
    while w._rows:
        calls.append("".join(r.row.voice or "-" for r in w._take_batch()))
    if engine_type is ByVoiceEngine:
        assert calls == ["aaa", "bb", "-", "a"]  # 30 frames a call: the fourth "a" row waits its turn
    else:
        assert calls == ["aba", "-aa", "b"]
