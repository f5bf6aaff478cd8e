"""The worker: one thread owns every model object (the device thread); an asyncio task feeds it from a scheduler.

Admission is bounded in seconds of queued audio (`QueueFull` with a Retry-After from the measured
throughput): audio not synthesized yet, of jobs waiting in the queue and of jobs in the pipeline. The
scheduler takes the oldest job first, except that jobs for the adapter already in the model's LoRA slots
may overtake it, at most `max_bypass` times. A job whose client left (or whose deadline passed) leaves
at once and its remaining work never reaches the device. An exception inside one job fails that job only.

Two ways to run a job (`Settings.batching`):
- pipelined (default): up to `pipeline_jobs` jobs at once, each through its `Stages` (`service/engine.py`): CPU
  stages on `cpu_threads` threads (on the device thread when the device is the CPU), content features on the device
  thread, and synthesizer rows gathered by `_batches`, which hands the device the rows ready at that moment
  (realtime stream blocks first, then oldest job first, up to `max_batch_frames`; only the oldest row's voice when
  the engine's `batch_way` is "by_voice") in one `Engine.synthesize` call. `pipeline_depth` and `stage_threads`
  (`service/settings.py`) give the CPU device its own defaults: 2 jobs, stages on the device thread. A request has
  at most one row waiting, so a long input's chunks take turns with short requests. A failing batch is split in
  halves and retried down to single rows, so one bad row fails its request only; a single row out of device memory
  sends its request through the one-at-a-time `Engine.convert` (shorter chunks, else 503).
- one at a time: each job start to end on the device thread (`Engine.convert` / `Engine.infer`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
from numpy.typing import NDArray

from rvc_lora.errors import AdapterError, AdapterNotFoundError, RVCLoraError
from service.cache import VoiceCache
from service.engine import STOP_REQUESTED, ConvertOptions, Engine, Features, ModelInfo, Rendered, Row
from service.errors import (
    ClientGone,
    DeadlineExceeded,
    DeviceOutOfMemory,
    JobCancelled,
    JobFailed,
    ModelOutputError,
    NotReady,
    QueueFull,
    ServiceStopping,
)
from service.logs import REQUEST_ID
from service.metrics import Metrics
from service.settings import Settings, pipeline_depth, stage_threads
from service.store import AdapterStore, StoredAdapter
from service.threads import SerialThread

if TYPE_CHECKING:
    from rvc_lora.pipeline.converter import F0Track

log = logging.getLogger(__name__)
T = TypeVar("T")
S = TypeVar("S")
State = Literal["loading", "ready", "draining", "stopped", "failed"]
MAX_RETRY_AFTER_S = 600.0
PROBE_FRAMES = 50  # the synthesis an uploaded adapter must survive: 0.5 s of features
PROBE_WAIT_S = 300.0  # an upload waits at most this long for the device (behind queued conversions)
BUSY_WINDOW_S = 10.0  # the device busy fraction is measured over this long


@dataclass(frozen=True)
class ConvertWork:
    audio16k: NDArray[np.float32]
    options: ConvertOptions


@dataclass(eq=False)
class Job:
    """One request's device work. `audio_s` is what it counts against the queue bound."""

    request_id: str
    work: ConvertWork | Features
    audio_s: float
    adapter: StoredAdapter | None
    deadline: float  # event-loop time
    future: asyncio.Future[JobResult] = field(init=False, repr=False)
    enqueued_at: float = field(default=0.0, init=False)
    bypassed: int = field(default=0, init=False)

    @property
    def key(self) -> str:
        """What must be in the LoRA slots: "" is the base voice (empty slots)."""
        return "" if self.adapter is None else self.adapter.cache_key

    @property
    def kind(self) -> str:
        return "convert" if isinstance(self.work, ConvertWork) else "infer"


@dataclass(frozen=True)
class JobResult:
    audio: NDArray[np.float32]
    sr: int
    timings: dict[str, float]  # seconds per stage, "queue" included
    cache: Literal["hit", "miss"] | None  # None for the base voice
    f0: F0Track | None = None  # conversions with an f0 model: the pitch track used


class Scheduler:
    """Waiting jobs, oldest first, with bounded same-adapter overtaking. Event-loop side only."""

    def __init__(self, max_bypass: int) -> None:
        self.max_bypass = max_bypass
        self._jobs: list[Job] = []
        self._audio_s = 0.0
        self._nonempty = asyncio.Event()

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def queued_audio_s(self) -> float:
        return max(self._audio_s, 0.0)

    def push(self, job: Job) -> None:
        self._jobs.append(job)
        self._audio_s += job.audio_s
        self._nonempty.set()

    def remove(self, job: Job) -> bool:
        if job not in self._jobs:
            return False
        self._jobs.remove(job)
        self._audio_s -= job.audio_s
        if not self._jobs:
            self._audio_s = 0.0  # no float drift across millions of jobs
        return True

    def pop(self, resident: str) -> Job:
        """The next job given the adapter in the slots: the oldest, unless a later job for `resident` may
        overtake it (the oldest has been overtaken fewer than `max_bypass` times)."""
        oldest = self._jobs[0]
        chosen = oldest
        if oldest.key != resident and oldest.bypassed < self.max_bypass:
            same = next((j for j in self._jobs if j.key == resident), None)
            if same is not None:
                chosen = same
                for job in self._jobs[: self._jobs.index(same)]:
                    job.bypassed += 1
        self.remove(chosen)
        return chosen

    async def wait(self) -> None:
        while not self._jobs:
            self._nonempty.clear()
            await self._nonempty.wait()

    def take_all(self) -> list[Job]:
        jobs, self._jobs, self._audio_s = self._jobs, [], 0.0
        return jobs


def probe_features(info: ModelInfo) -> Features:
    """Fixed, plausible inputs for a short synthesis: unit-variance content features, a steady 150 Hz voice."""
    phone = np.random.default_rng(0).standard_normal((PROBE_FRAMES, info.content_dim)).astype(np.float32)
    if not info.f0:
        return Features(phone, None, None, seed=0)
    return Features(phone, np.full(PROBE_FRAMES, 60, np.int64), np.full(PROBE_FRAMES, 150.0, np.float32), seed=0)


class Throughput:
    """Audio seconds converted per device second, as an exponential moving average."""

    def __init__(self, prior: float = 1.0, alpha: float = 0.2) -> None:
        self.rate = prior
        self._alpha = alpha
        self._measured = False

    def observe(self, audio_s: float, device_s: float) -> None:
        if audio_s <= 0 or device_s <= 0:
            return
        rate = audio_s / device_s
        self.rate = rate if not self._measured else self._alpha * rate + (1 - self._alpha) * self.rate
        self._measured = True

    def seconds_for(self, audio_s: float) -> float:
        return audio_s / self.rate


@dataclass(frozen=True)
class _Outcome:
    result: tuple[Rendered, str | None] | None  # (audio, tier the adapter came from)
    error: RVCLoraError | None
    device_s: float


@dataclass(eq=False)
class _WaitingRow:
    """A synthesizer row waiting for the device: its job (None: a realtime stream's block), the share of the
    job's audio it renders, and the future its result goes to."""

    job: Job | None
    row: Row
    audio_s: float
    future: asyncio.Future[NDArray[np.float32]]
    since: float  # perf_counter when it started waiting

    @property
    def over(self) -> bool:
        """Nobody waits for it any more (its job is over, or its stream stopped waiting)."""
        return self.future.done() or (self.job is not None and self.job.future.done())

    @property
    def order(self) -> tuple[bool, float]:
        """Stream blocks first (realtime deadlines), then oldest job first."""
        return (False, self.since) if self.job is None else (True, self.job.enqueued_at)


@dataclass(eq=False)
class _WaitingStep:
    """A stream block waiting for its stage before synthesis: its `cut` input, the cut, and its result's future."""

    item: Any
    cut: Callable[[list[Any]], Sequence[Any]]
    future: asyncio.Future[Any]


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    """Event loop: `result` (a value or an exception) into `future`, unless nobody waits for it any more."""
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


class Worker:
    def __init__(self, settings: Settings, store: AdapterStore, metrics: Metrics,
                 engine_factory: Callable[[Settings], Engine]) -> None:
        self.settings = settings
        self.state: State = "loading"
        self._store = store
        self._metrics = metrics
        self._factory = engine_factory
        self._sched = Scheduler(settings.max_bypass)
        self._rate = Throughput()
        self._engine: Engine | None = None
        self._cache: VoiceCache[object] | None = None
        self._settled = asyncio.Event()
        self._resident = ""
        self._running: asyncio.Future[_Outcome] | None = None  # one-at-a-time: the job on the device
        self._running_audio_s = 0.0  # audio of the job (or batch of rows) on the device now ...
        self._running_since = 0.0  # ... and since when (event-loop time)
        self._device = SerialThread("rvc-device")
        self._cpu: concurrent.futures.ThreadPoolExecutor | None = None
        # the pipeline: jobs in it, their audio not synthesized yet, those with work on the device; waiting rows
        self._in_flight: dict[Job, asyncio.Task[None]] = {}
        self._pending: dict[Job, float] = {}
        self._started: set[Job] = set()
        self._rows: list[_WaitingRow] = []
        self._rows_ready = asyncio.Event()
        self._stream_steps = 0  # stream blocks on the device before synthesis: the batcher waits for their rows
        self._steps: list[_WaitingStep] = []  # those not taken by the device thread yet (it takes them all at once)
        self._steps_lock = threading.Lock()  # the event loop adds, the device thread takes
        self._steps_queued = False  # a device call that will take them is queued
        self._room: asyncio.Semaphore | None = None
        self._batcher: asyncio.Task[None] | None = None
        self._busy = (0.0, 0.0)  # (perf_counter, device busy seconds) at the start of the busy window
        self._busy_counted = 0.0  # device busy seconds already added to the metric
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._drain_deadline: float | None = None

    # lifecycle
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="rvc-worker")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """The scheduling loop ends only by cancellation at stop; anything else is a bug: fail loudly, and
        fail the waiting jobs now rather than at their deadlines."""
        if task.cancelled() or task.exception() is None:
            return
        log.critical("the worker loop died", exc_info=task.exception())
        self.state = "failed"
        self._metrics.ready.set(0)
        for job in self._sched.take_all():
            if not job.future.done():
                job.future.set_exception(JobFailed(f"internal error while processing request {job.request_id}"))

    def begin_drain(self) -> None:
        """SIGTERM: refuse new jobs (503), keep running queued ones; those still waiting when the grace
        period is nearly over are failed with 503 so that their clients get an answer."""
        if self.state in ("draining", "stopped"):
            return
        self.state = "draining"
        self._metrics.ready.set(0)
        loop = asyncio.get_running_loop()
        grace = self.settings.shutdown_grace_s
        self._drain_deadline = loop.time() + grace
        self._drain_timer = loop.call_later(max(grace - min(1.0, grace / 4), 0.0), self._fail_queued)
        log.info("draining", extra={"queued_jobs": len(self._sched), "grace_s": grace})

    async def stop(self) -> None:
        """Close intake, fail waiting jobs, let the running ones finish within what is left of the grace."""
        loop = asyncio.get_running_loop()
        deadline = self._drain_deadline or loop.time() + self.settings.shutdown_grace_s
        self.state = "stopped"
        self._metrics.ready.set(0)
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self._fail_queued()
        running: set[asyncio.Future[Any]] = set(self._in_flight.values())
        if self._running is not None:
            running.add(self._running)
        if running:
            await asyncio.wait(running, timeout=max(deadline - loop.time(), 0.0))
        for task in (self._task, self._batcher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for job in list(self._in_flight):  # still running at the end of the grace
            if not job.future.done():
                job.future.set_exception(ServiceStopping("the server is shutting down; retry on another replica",
                                                         retry_after=5))
        await asyncio.to_thread(self._device.stop, max(deadline - loop.time(), 0.0))
        if self._cpu is not None:
            self._cpu.shutdown(wait=False, cancel_futures=True)

    def _fail_queued(self) -> None:
        """Fail the jobs that are waiting: in the queue, or in the pipeline with nothing on the device yet."""
        waiting = self._sched.take_all() + [job for job in self._in_flight if job not in self._started]
        for job in waiting:
            if not job.future.done():
                job.future.set_exception(ServiceStopping("the server is shutting down; retry on another replica",
                                                         retry_after=5))
        self._update_queue_gauges()

    # model access for handlers
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def engine(self, timeout: float | None = None) -> Engine:
        """The loaded, warm engine (waits while loading, up to `timeout` or the request timeout)."""
        if not self._settled.is_set():
            wait = self.settings.request_timeout_s if timeout is None else timeout
            try:
                await asyncio.wait_for(self._settled.wait(), wait)
            except asyncio.TimeoutError as exc:
                raise NotReady("the models are still loading", retry_after=5) from exc
        if self.state == "failed" or self._engine is None:
            raise NotReady("the models failed to load; see the server log")
        return self._engine

    async def wait_loaded(self) -> Engine | None:
        """The engine once loading and warm-up have finished, however long that takes; None if they failed."""
        await self._settled.wait()
        return None if self.state == "failed" else self._engine

    def request_drain(self) -> None:
        """`begin_drain` from a signal handler or another thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.begin_drain)

    @property
    def queued_audio_s(self) -> float:
        """Audio not synthesized yet: jobs in the queue, and what is left of those in the pipeline."""
        return self._sched.queued_audio_s + sum(self._pending.values())

    @property
    def _queued_jobs(self) -> int:
        return len(self._sched) + sum(1 for left in self._pending.values() if left > 0)

    def check_output(self, adapter: Path) -> None:
        """From an upload thread: synthesize `PROBE_FRAMES` frames with `adapter` in the LoRA slots, on the device
        thread between jobs; AdapterError when its output is not finite (say `lora_alpha` folds it into
        overflow), so that an adapter which would fail every conversion is never stored."""
        engine = self._engine
        if engine is None:
            raise NotReady("the models are still loading", retry_after=5)

        def probe() -> bool:
            voice = engine.load_voice(adapter, None)
            try:
                return bool(np.isfinite(engine.infer(probe_features(engine.info), voice).audio).all())
            finally:
                engine.drop_device(voice)  # its slot goes first to the next voice: the upload is not a request

        try:
            finite = self._device.submit(probe).result(timeout=PROBE_WAIT_S)
        except concurrent.futures.TimeoutError as exc:
            raise QueueFull("the device is busy; retry the upload later", retry_after=30) from exc
        if not finite:
            raise AdapterError(f"{adapter}: a short synthesis with this adapter gives NaN or infinite samples (are "
                               "lora_alpha and the weights right?); it could convert nothing")

    def forget(self, rec: StoredAdapter) -> None:
        """Drop a deleted adapter's host copy and free its bank slot, on the device thread after the running job
        (not awaited: a delete does not wait for a conversion; a stream open on it keeps its own host copy)."""
        cache = self._cache
        if cache is not None:
            self._device.submit(lambda: cache.discard(rec.cache_key))

    # jobs
    async def submit(self, job: Job, disconnected: Callable[[], Awaitable[object]] | None = None) -> JobResult:
        """Queue `job` and wait for its result. Raises QueueFull / ServiceStopping / NotReady at admission,
        DeadlineExceeded past the deadline, ClientGone if `disconnected()` completes first."""
        loop = asyncio.get_running_loop()
        self._admit(job)
        job.future = loop.create_future()
        job.enqueued_at = loop.time()
        job.future.add_done_callback(lambda _: self._left(job))
        self._sched.push(job)
        self._update_queue_gauges()
        watcher = None if disconnected is None else asyncio.ensure_future(disconnected())
        try:
            waits: set[asyncio.Future[Any]] = {job.future} if watcher is None else {job.future, watcher}
            done, _ = await asyncio.wait(waits, timeout=max(job.deadline - loop.time(), 0.0),
                                         return_when=asyncio.FIRST_COMPLETED)
            if job.future in done:
                return job.future.result()
            if watcher is not None and watcher in done:
                raise ClientGone("the client disconnected before the result was ready")
            raise DeadlineExceeded(f"no result within the deadline of {self.settings.request_timeout_s:g} s")
        finally:
            if watcher is not None:
                watcher.cancel()
            job.future.cancel()  # no-op when done
            self._left(job)  # now, not from the done callback a loop turn later: room frees at once

    def check_room(self) -> None:
        """What `submit` would refuse whatever the job's length (stopping, failed, queue already full), checked
        before the request's upload is decoded."""
        self._admit(None)

    def _admit(self, job: Job | None) -> None:
        if self.state in ("draining", "stopped"):
            self._metrics.rejected.labels(reason="stopping").inc()
            raise ServiceStopping("the server is shutting down; retry on another replica", retry_after=5)
        if self.state == "failed":
            self._metrics.rejected.labels(reason="not_ready").inc()
            raise NotReady("the models failed to load; see the server log")
        queued, bound, waiting = self.queued_audio_s, self.settings.max_queued_audio_s, self._queued_jobs
        needed = 0.0 if job is None else job.audio_s
        if waiting and (queued + needed > bound or (job is None and queued >= bound)):
            self._metrics.rejected.labels(reason="queue_full").inc()
            wait = self._room_in(needed or queued / waiting)
            raise QueueFull(f"{queued:.1f} s of audio are queued (limit {bound:g} s); retry in {math.ceil(wait)} s",
                            retry_after=wait)

    def _room_in(self, needed: float) -> float:
        """Seconds until the queue has room for `needed` s of audio (a typical queued job's length when the
        request is not decoded yet): what is left of the work on the device now, then the queued audio beyond
        what leaves room, at the measured throughput. Between 1 s and `MAX_RETRY_AFTER_S`."""
        loop = asyncio.get_running_loop()
        excess = self.queued_audio_s + needed - self.settings.max_queued_audio_s
        running_left = 0.0
        if self._running_audio_s > 0:
            running_left = self._rate.seconds_for(self._running_audio_s) - (loop.time() - self._running_since)
        wait = max(running_left, 0.0) + self._rate.seconds_for(max(excess, 0.0))
        return min(max(wait, 1.0), MAX_RETRY_AFTER_S)

    def _left(self, job: Job) -> None:
        """Done callback: a job cancelled or failed while still queued leaves the queue (nothing leaks); one in the
        pipeline no longer counts against the bound (its remaining work is skipped)."""
        if self._sched.remove(job):
            self._metrics.jobs.labels(outcome="dropped").inc()
        self._pending.pop(job, None)
        self._update_queue_gauges()

    async def _run(self) -> None:
        if not await self._load():
            return
        if self.settings.batching:
            assert self._engine is not None
            threads = stage_threads(self.settings.cpu_threads, self._engine.info.device)
            if threads:
                self._cpu = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="rvc-cpu")
            self._room = asyncio.Semaphore(pipeline_depth(self.settings.pipeline_jobs, self._engine.info.device))
            self._busy = (time.perf_counter(), self._device.busy_s)
            self._batcher = asyncio.get_running_loop().create_task(self._batches(), name="rvc-batches")
            self._batcher.add_done_callback(self._ended)
        while True:
            if self._room is not None:
                await self._room.acquire()
            try:
                await self._sched.wait()
                job = self._sched.pop(self._resident)
            except BaseException:
                if self._room is not None:
                    self._room.release()
                raise
            self._update_queue_gauges()
            if job.future.done():
                if self._room is not None:
                    self._room.release()
            elif self._room is not None:
                self._start_pipelined(job)
            else:
                await self._run_job(job)

    async def _load(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            engine = await asyncio.wrap_future(self._device.submit(lambda: self._factory(self.settings)))
            self._cache = VoiceCache(self.settings.host_cache_bytes, engine.host_bytes, engine)
            if self.settings.warmup:
                start = loop.time()
                audio_s = await asyncio.wrap_future(self._device.submit(engine.warmup))
                self._rate.observe(audio_s, loop.time() - start)
                self._metrics.throughput.set(self._rate.rate)
        except Exception:
            log.exception("model loading failed")
            self.state = "failed"
            self._settled.set()
            for job in self._sched.take_all():
                if not job.future.done():
                    job.future.set_exception(NotReady("the models failed to load; see the server log"))
            return False
        self._engine = engine
        self._metrics.bank_slots.set(engine.info.bank_slots)
        self._metrics.bank_slot_bytes.set(engine.info.bank_slot_bytes)
        if self.state == "loading":
            self.state = "ready"
            self._metrics.ready.set(1)
        self._settled.set()
        log.info("models ready", extra={"fingerprint": engine.info.fingerprint[:16], "device": engine.info.device})
        return True

    # one job at a time
    async def _run_job(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        queue_s = started - job.enqueued_at
        self._metrics.queue_wait.observe(queue_s)
        self._note_voice(job)
        self._running = asyncio.wrap_future(self._device.submit(lambda: self._execute(job)))
        self._running_audio_s, self._running_since = job.audio_s, started
        try:
            outcome = await asyncio.shield(self._running)
        finally:
            self._running, self._running_audio_s = None, 0.0
        self._metrics.compute.labels(kind=job.kind).observe(outcome.device_s)
        if outcome.result is not None:  # a quick failure says nothing about throughput
            self._rate.observe(job.audio_s, outcome.device_s)
            self._metrics.throughput.set(self._rate.rate)
            self._metrics.rtf.observe(outcome.device_s / max(job.audio_s, 1e-6))
        self._finish(job, outcome, queue_s)

    def _note_voice(self, job: Job) -> None:
        if job.key != self._resident:
            self._metrics.swaps.inc()
            self._resident = job.key

    def _finish(self, job: Job, outcome: _Outcome, queue_s: float) -> None:
        self._update_cache_gauges()
        if job.future.done():  # the client left or the deadline passed while it ran
            self._metrics.jobs.labels(outcome="abandoned").inc()
        elif outcome.result is not None:
            rendered, tier = outcome.result
            self._metrics.jobs.labels(outcome="ok").inc()
            if tier is not None:
                self._metrics.cache.labels(result="hit" if tier == "device" else "miss", tier=tier).inc()
            job.future.set_result(JobResult(rendered.audio, rendered.sr, {"queue": queue_s, **rendered.timings},
                                            None if tier is None else ("hit" if tier == "device" else "miss"),
                                            rendered.f0))
        else:
            assert outcome.error is not None
            self._metrics.jobs.labels(outcome="failed" if isinstance(outcome.error, JobFailed) else "error").inc()
            job.future.set_exception(outcome.error)

    def _execute(self, job: Job) -> _Outcome:
        """On the device thread. Never raises: an exception becomes this job's error, the worker goes on. The
        engine stops between chunks once the job's future is done (deadline passed, client gone, shutdown)."""
        token = REQUEST_ID.set(job.request_id)
        stop_token = STOP_REQUESTED.set(job.future.done)
        start = time.perf_counter()
        try:
            assert self._engine is not None and self._cache is not None
            engine, voice, tier = self._engine, None, None
            if job.adapter is not None:
                voice, tier = self.voice(job.adapter)
            if isinstance(job.work, ConvertWork):
                rendered = engine.convert(job.work.audio16k, job.work.options, voice)
            else:
                rendered = engine.infer(job.work, voice)
            return _Outcome((self._checked(job, rendered), tier), None, time.perf_counter() - start)
        except RVCLoraError as exc:
            return _Outcome(None, exc, time.perf_counter() - start)
        except Exception:
            return _Outcome(None, self._internal_error(job), time.perf_counter() - start)
        finally:
            STOP_REQUESTED.reset(stop_token)
            REQUEST_ID.reset(token)

    @staticmethod
    def _checked(job: Job, rendered: Rendered) -> Rendered:
        if not np.isfinite(rendered.audio).all():  # the models' doing, never the client's audio
            raise (ModelOutputError("the base model produced NaN or infinite samples for this request")
                   if job.adapter is None else
                   AdapterError(f"adapter {job.adapter.id} produced NaN or infinite samples for this request; "
                                "it cannot convert (check its lora_alpha and weights, then upload it again)"))
        return rendered

    @staticmethod
    def _internal_error(job: Job) -> JobFailed:
        """Log the exception being handled; the error the client gets for it."""
        log.exception("job failed", extra={"kind": job.kind})
        return JobFailed(f"internal error while processing request {job.request_id}; the server log has the details "
                         "under this id")

    # the pipeline
    def _start_pipelined(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        queue_s = loop.time() - job.enqueued_at
        self._metrics.queue_wait.observe(queue_s)
        self._note_voice(job)
        self._pending[job] = job.audio_s
        self._update_queue_gauges()
        task = loop.create_task(self._pipelined(job, queue_s), name=f"rvc-job-{job.request_id}")
        self._in_flight[job] = task

        def done(_: object) -> None:
            self._in_flight.pop(job, None)
            self._pending.pop(job, None)
            self._started.discard(job)
            if self._room is not None:
                self._room.release()
            self._update_queue_gauges()

        task.add_done_callback(done)

    async def _pipelined(self, job: Job, queue_s: float) -> None:
        start = time.perf_counter()
        try:
            outcome = _Outcome(await self._through_stages(job), None, time.perf_counter() - start)
        except RVCLoraError as exc:
            outcome = _Outcome(None, exc, time.perf_counter() - start)
        except Exception:
            outcome = _Outcome(None, self._internal_error(job), time.perf_counter() - start)
        self._metrics.compute.labels(kind=job.kind).observe(outcome.device_s)
        self._finish(job, outcome, queue_s)

    async def _through_stages(self, job: Job) -> tuple[Rendered, str | None]:
        assert self._engine is not None
        engine, device = self._engine, self._device.submit
        cpu = device if self._cpu is None else self._cpu.submit
        voice, tier = None, None
        if job.adapter is not None:
            rec = job.adapter
            voice, tier = await self._stage(job, "voice", device, lambda: self.voice(rec))
        work = job.work
        if isinstance(work, Features):  # /infer: features straight into the synthesizer, one call
            self._started.add(job)
            rendered = await self._stage(job, "infer", device, lambda: engine.infer(work, voice))
            return self._checked(job, rendered), tier
        stages = engine.stages(work.audio16k, work.options, voice)
        chunks = await self._stage(job, "prepare", device if stages.prepare_on_device else cpu, stages.prepare)
        outputs = []
        try:
            for i in range(chunks):
                encoded = await self._stage(job, "encode", device, functools.partial(stages.encode, i))
                row = await self._stage(job, "row", cpu, functools.partial(stages.row, i, encoded))
                outputs.append(await self._synthesized(job, row, job.audio_s / chunks))
        except DeviceOutOfMemory:  # alone, one row is too much: the whole conversion in shorter chunks, or 503
            log.warning("device out of memory for one row: converting the request start to end")
            self._started.add(job)
            rendered = await self._stage(job, "convert", device,
                                         lambda: engine.convert(work.audio16k, work.options, voice))
            return self._checked(job, rendered), tier
        rendered = await self._stage(job, "finish", cpu, functools.partial(stages.finish, outputs))
        return self._checked(job, rendered), tier

    async def _stage(self, job: Job, name: str, submit: Callable[[Callable[[], T]], concurrent.futures.Future[T]],
                     fn: Callable[[], T]) -> T:
        """Run `fn` with `submit` (the device thread's or the CPU pool's) unless the job is over already; it runs
        with the job's request id in its log lines and `STOP_REQUESTED` set."""
        if job.future.done():
            raise JobCancelled("the request's deadline passed or its client left; its work was stopped")
        since = time.perf_counter()

        def run() -> T:
            self._metrics.stage_wait.labels(stage=name).observe(time.perf_counter() - since)
            token, stop_token = REQUEST_ID.set(job.request_id), STOP_REQUESTED.set(job.future.done)
            try:
                return fn()
            finally:
                STOP_REQUESTED.reset(stop_token)
                REQUEST_ID.reset(token)

        return await asyncio.wrap_future(submit(run))

    async def _synthesized(self, job: Job, row: Row, audio_s: float) -> NDArray[np.float32]:
        """Hand `row` to the batcher; its audio once a batch has synthesized it."""
        if job.future.done():
            raise JobCancelled("the request's deadline passed or its client left; its work was stopped")
        waiting = _WaitingRow(job, row, audio_s, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._rows.append(waiting)
        self._rows_ready.set()
        return await waiting.future

    def _take_batch(self) -> list[_WaitingRow]:
        """The rows ready now, realtime stream blocks first, then oldest job first, up to `max_batch_frames` (at
        least one row); rows nobody waits for are dropped. An engine that runs each voice as its own forward
        (`ModelInfo.batch_way` "by_voice") gets the first row's voice only: a batch of several voices would hand
        every row back when the last voice's forward ends, so the others wait for the next call instead (the
        oldest row always goes first, so none starves)."""
        for waiting in [w for w in self._rows if w.over]:
            self._rows.remove(waiting)
            waiting.future.cancel()
        self._rows.sort(key=lambda w: w.order)
        one_voice = self._engine is not None and self._engine.info.batch_way == "by_voice"
        batch: list[_WaitingRow] = []
        frames = 0
        for waiting in self._rows:
            if one_voice and batch and waiting.row.voice != batch[0].row.voice:
                continue
            if batch and frames + waiting.row.frames > self.settings.max_batch_frames:
                break
            batch.append(waiting)
            frames += waiting.row.frames
        taken = set(map(id, batch))
        self._rows = [w for w in self._rows if id(w) not in taken]
        return batch

    async def _batches(self) -> None:
        """Event-loop side of the device: one batch at a time, of the rows waiting when the device is free."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._rows or self._stream_steps:  # stream blocks on the device now: their rows join
                self._rows_ready.clear()
                await self._rows_ready.wait()
            batch = self._take_batch()
            if not batch:
                continue
            now, audio_s = time.perf_counter(), sum(w.audio_s for w in batch)
            for w in batch:
                self._metrics.stage_wait.labels(stage="synth").observe(now - w.since)
                if w.job is not None:
                    self._started.add(w.job)
                    if w.job in self._pending:
                        self._pending[w.job] = max(self._pending[w.job] - w.audio_s, 0.0)
            self._metrics.batch_size.observe(len(batch))
            self._metrics.batch_stream_rows.observe(sum(w.job is None for w in batch))
            self._metrics.batch_frames.observe(sum(w.row.frames for w in batch))
            self._running_audio_s, self._running_since = audio_s, loop.time()
            self._update_queue_gauges()
            try:
                results = await asyncio.wrap_future(self._device.submit(functools.partial(self._run_batch, batch)))
            finally:
                device_s = loop.time() - self._running_since
                self._running_audio_s = 0.0
            if all(not isinstance(result, BaseException) for result in results):
                self._rate.observe(audio_s, device_s)
                self._metrics.throughput.set(self._rate.rate)
                self._metrics.rtf.observe(device_s / max(audio_s, 1e-6))
            self._update_busy()
            for w, result in zip(batch, results, strict=True):
                if w.future.done():
                    continue
                if isinstance(result, BaseException):
                    w.future.set_exception(result)
                else:
                    w.future.set_result(result)

    def _run_batch(self, batch: list[_WaitingRow]) -> list[NDArray[np.float32] | BaseException]:
        """On the device thread: `_synthesize` with `STOP_REQUESTED` true once nobody waits for any row."""
        first = batch[0].job
        stop_token = STOP_REQUESTED.set(lambda: all(w.over for w in batch))
        token = REQUEST_ID.set(first.request_id if len(batch) == 1 and first is not None else "batch")
        try:
            return self._synthesize([w.row for w in batch])
        finally:
            REQUEST_ID.reset(token)
            STOP_REQUESTED.reset(stop_token)

    def _synthesize(self, rows: list[Row]) -> list[NDArray[np.float32] | BaseException]:
        """On the device thread: `rows` in one `Engine.synthesize` call; when it raises, each half again, down to
        single rows, so that a failing row fails only its own request."""
        assert self._engine is not None
        try:
            return list(self._engine.synthesize(rows))
        except Exception as exc:
            if len(rows) == 1:
                return [exc]
            if not isinstance(exc, DeviceOutOfMemory):
                log.warning("a batch of %d rows failed (%s); retrying in halves", len(rows), type(exc).__name__)
            half = len(rows) // 2
            return self._synthesize(rows[:half]) + self._synthesize(rows[half:])

    def _update_busy(self) -> None:
        now, busy = time.perf_counter(), self._device.busy_s
        since, busy_then = self._busy
        if now - since >= BUSY_WINDOW_S:
            self._metrics.device_busy_fraction.set(min((busy - busy_then) / (now - since), 1.0))
            self._busy = (now, busy)
        self._metrics.device_busy.inc(max(busy - self._busy_counted, 0.0))
        self._busy_counted = busy

    def voice(self, rec: StoredAdapter) -> tuple[object, str]:
        """On the device thread: `rec`'s host copy, its voice made resident in the adapter bank (through the cache),
        and the tier it came from."""
        assert self._engine is not None and self._cache is not None
        engine, store = self._engine, self._store

        def load() -> object:
            if not store.adapter_path(rec).is_file():  # deleted by another process sharing the store
                raise AdapterNotFoundError(f"adapter {rec.id} was deleted")
            return engine.load_voice(store.adapter_path(rec), store.index_path(rec))

        return self._cache.get(rec.cache_key, load)

    async def on_device(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the device thread, ahead of queued jobs: those go to the thread one step at a time, so `fn`
        waits at most for the step running now (realtime stream blocks use this)."""
        return await asyncio.wrap_future(self._device.submit(fn, first=True))

    # realtime stream blocks
    @property
    def batches_rows(self) -> bool:
        """Whether synthesizer rows go through the device batcher (pipelined worker running)."""
        return self._batcher is not None

    async def stream_step(self, item: S, cut: Callable[[list[S]], Sequence[T | Exception]]) -> T:
        """A stream block's stage before synthesis, on the device thread ahead of queued work, together with the
        other streams' blocks waiting for theirs when the device thread gets to them: one `cut` call for all of
        them (the engine shares one content-encoder forward), each block's result (or error) to its stream. The
        batcher holds its next batch until every such stage has returned, so the blocks of streams that arrive
        together share one batch."""
        waiting = _WaitingStep(item, cut, asyncio.get_running_loop().create_future())
        self._stream_steps += 1
        try:
            with self._steps_lock:
                self._steps.append(waiting)
                queued, self._steps_queued = self._steps_queued, True
            if not queued:  # else the queued call takes this block too
                self._device.submit(functools.partial(self._run_steps, asyncio.get_running_loop()), first=True)
            result: T = await waiting.future
            return result
        finally:
            self._stream_steps -= 1
            self._rows_ready.set()

    def _run_steps(self, loop: asyncio.AbstractEventLoop) -> None:
        """Device thread: every stream block waiting for its stage before synthesis now, one `cut` call per kind
        of cut; results go back to the event loop."""
        with self._steps_lock:
            taken, self._steps, self._steps_queued = self._steps, [], False
        by_cut: dict[Callable[[list[Any]], Sequence[Any]], list[_WaitingStep]] = {}
        for waiting in taken:
            by_cut.setdefault(waiting.cut, []).append(waiting)
        for cut, group in by_cut.items():
            self._metrics.stream_begin_blocks.observe(len(group))
            try:
                results = list(cut([w.item for w in group]))
                if len(results) != len(group):
                    raise RuntimeError(f"a stream cut returned {len(results)} results for {len(group)} blocks")
            except Exception as exc:  # noqa: BLE001 - an engine's bug: every block of the call gets it
                results = [exc] * len(group)
            for w, result in zip(group, results, strict=True):
                loop.call_soon_threadsafe(_settle, w.future, result)

    async def synthesize_block(self, row: Row, audio_s: float) -> NDArray[np.float32]:
        """A stream block's row through the batcher, ahead of every conversion's row; its audio."""
        waiting = _WaitingRow(None, row, audio_s, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._rows.append(waiting)
        self._rows_ready.set()
        return await waiting.future

    def _update_queue_gauges(self) -> None:
        self._metrics.queued_audio.set(self.queued_audio_s)
        self._metrics.queued_jobs.set(self._queued_jobs)

    def _update_cache_gauges(self) -> None:
        if self._cache is not None:
            on_device, on_host = self._cache.sizes()
            self._metrics.resident.labels(tier="device").set(on_device)
            self._metrics.resident.labels(tier="host").set(on_host)
            self._metrics.host_cache_bytes.set(self._cache.held_bytes)
