"""The boundary between the service and the models: the `Engine` protocol and the data that crosses it.

Everything behind this boundary runs on the worker's device thread except `describe_adapter` and
`check_index`, which read files and the base model's fixed metadata only (no model state) and are
called from upload handlers, `extract_voice`, which works on a CPU copy of the base weights on the
extraction thread, and the CPU stages of a conversion (`Stages`), which the pipelined worker runs on
its CPU threads. Tests substitute fakes; the real engine (`service/rvc_engine.py`) wraps
`VoiceConverter` and is imported lazily so that importing the service does not load torch models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray

from rvc_lora.adapters import AdapterInfo
from rvc_lora.pipeline.params import ConvertParams
from rvc_lora.voice.bank import Strategy
from service.errors import JobCancelled

if TYPE_CHECKING:
    from rvc_lora.pipeline.converter import F0Track

ConvertOptions = ConvertParams  # the library's conversion parameters, validated on construction

# Set by the worker around each job: true once the job's deadline has passed or its client has gone. An engine
# checks it between chunks and raises JobCancelled, so abandoned work stops holding the device.
STOP_REQUESTED: ContextVar[Callable[[], bool]] = ContextVar("stop_requested", default=lambda: False)


def stop_if_requested() -> None:
    if STOP_REQUESTED.get()():
        raise JobCancelled("the request's deadline passed or its client left; its work was stopped")


@dataclass(frozen=True)
class ModelInfo:
    """The resident base model, as `/model` reports it and as request validation needs it."""

    fingerprint: str
    version: str
    f0: bool
    sr: int
    n_speakers: int
    content_dim: int
    max_rank: int
    target_modules: tuple[str, ...]
    f0_methods: tuple[str, ...]
    device: str
    bank_slots: int = 1  # adapter slots on the device, the device tier of voices (RVC_LORA_BANK_SLOTS)
    bank_slot_bytes: int = 0  # device memory one slot holds
    # how a batch of several voices runs (`rvc_lora.voice.bank.Strategy`): "by_voice" is one forward per voice, so
    # the pipelined worker gives the device one voice per call (the others' rows need not wait for it)
    batch_way: Strategy = "auto"


@dataclass(frozen=True)
class Features:
    """Inputs of the low-level path: phone `[T, C]` float32, pitch `[T]` int64 and nsff0 `[T]` float32
    (both None for models without f0)."""

    phone: NDArray[np.float32]
    pitch: NDArray[np.int64] | None
    nsff0: NDArray[np.float32] | None
    sid: int = 0
    seed: int | None = None


@dataclass(frozen=True)
class Rendered:
    """Audio out of the engine: mono float32 `[N]` at `sr` Hz, per-stage seconds, and for conversions with an
    f0 model the pitch track used (`F0Track`: Hz per 10 ms frame of the input)."""

    audio: NDArray[np.float32]
    sr: int
    timings: Mapping[str, float]
    f0: F0Track | None = None


@dataclass(frozen=True)
class Extracted:
    """An adapter extracted from a full voice model: the adapter file's bytes and the extraction report
    (`ExtractionReport.summary()`, which the file keeps too, with this run's sizes and timings)."""

    adapter_bytes: bytes
    report: Mapping[str, Any]


@dataclass(frozen=True)
class Row:
    """One synthesizer input of a conversion: `frames` 10 ms frames (what the batch budget counts) and the
    engine's own `inputs` (features, pitch, voice, the request's random generator). The worker batches rows of
    several requests into one `Engine.synthesize` call. `voice`: the row's voice ("" the base voice; None not
    said), for an engine that runs each voice's rows as their own forward (`ModelInfo.batch_way`)."""

    frames: int
    inputs: Any
    voice: str | None = None


class Stages(Protocol):
    """One conversion cut where the pipelined worker schedules it. The worker calls, in this order:
    `prepare()` (on a CPU thread, or on the device thread when `prepare_on_device`: an f0 network) -> the
    number of chunks; for each chunk i in order, `encode(i)` (device thread: content features), then
    `row(i, encoded)` (CPU thread: index blend, alignment), then the row goes through `Engine.synthesize` with
    other requests' rows (device thread); finally `finish(outputs)` (CPU thread: assembly, RMS mix,
    resampling) with every chunk's output in order. Each stage runs once, never two of one request at once."""

    @property
    def prepare_on_device(self) -> bool: ...

    def prepare(self) -> int: ...

    def encode(self, i: int) -> object: ...

    def row(self, i: int, encoded: object) -> Row: ...

    def finish(self, outputs: Sequence[NDArray[np.float32]]) -> Rendered: ...


class Engine(Protocol):
    """What the worker needs from the models. Voices are opaque: `load_voice` returns a host-memory voice
    (the validated adapter as the slots hold it + optional index), which every call that computes takes; the
    device tier is the engine's adapter bank (`to_device`, `device_voices`, `drop_device`: `service.cache`'s
    `DeviceTier`), into which a call copies the voice if it is not resident. `convert`/`infer` work through long
    inputs in chunks and call `stop_if_requested()` between them."""

    @property
    def info(self) -> ModelInfo: ...

    def describe_adapter(self, path: Path) -> AdapterInfo:
        """Read and validate an adapter file against the base (AdapterError / AdapterMismatchError): its record."""
        ...

    def check_index(self, path: Path) -> None:
        """Raise IndexFileError unless `path` is a usable retrieval index for the base's feature width, within
        `max_index_memory_bytes` once loaded."""
        ...

    def extract_voice(self, voice: Path, *, rank: int, name: str, evaluate: bool) -> Extracted:
        """A full RVC voice `.pth` -> an adapter over the resident base, from CPU copies only (never the device
        model: it runs on a thread of its own). AdapterMismatchError when the voice is not of the base's
        architecture, CheckpointError when it is not a readable voice model."""
        ...

    def load_voice(self, adapter: Path, index: Path | None) -> object: ...

    def host_bytes(self, voice: object) -> int:
        """Host memory a `load_voice` result holds (adapter tensors, index vectors as loaded): the host cache's
        budget is in these bytes."""
        ...

    def to_device(self, voice: object) -> bool:
        """Device thread: make `voice` resident in an adapter slot (one fused copy of its host copy into a free or
        the least recently used unpinned slot) unless it is; whether it was."""
        ...

    def device_voices(self) -> int:
        """Voices resident in the adapter bank now (read from the event loop for a gauge: no state changes)."""
        ...

    def drop_device(self, voice: object) -> None:
        """Device thread: `voice`'s slot is free for other voices (its host copy left, its adapter was deleted)."""
        ...

    def warmup(self) -> float:
        """Run one representative conversion; return the seconds of audio it processed."""
        ...

    def convert(self, audio16k: NDArray[np.float32], options: ConvertOptions, voice: object | None) -> Rendered:
        """The whole conversion in one call (the one-at-a-time worker, and the fallback of a pipelined
        conversion that ran out of device memory)."""
        ...

    def stages(self, audio16k: NDArray[np.float32], options: ConvertOptions, voice: object | None) -> Stages:
        """The same conversion as `convert`, cut into stages for the pipelined worker (cheap: nothing runs yet).
        With `options.seed` set, the synthesizer's draws come from a generator of the request's own, in chunk
        order, so the output is `convert`'s whatever rows it is batched with."""
        ...

    def synthesize(self, rows: Sequence[Row]) -> list[NDArray[np.float32]]:
        """Device thread: synthesize `rows` (of any requests and voices) -> each row's audio `[samples]` at the
        model rate, in order. Raises for the whole batch (the worker splits it and retries, down to single rows)
        and then leaves every row's generator as it was."""
        ...

    def infer(self, features: Features, voice: object | None) -> Rendered: ...
