"""The boundary between the service and the models: an `Engine` protocol and the real implementation.

Everything behind this boundary runs on the worker's device thread except `describe_adapter` and
`check_index`, which read files and the base model's fixed metadata only (no model state) and are
called from upload handlers, and `extract_voice`, which works on a CPU copy of the base weights on the
extraction thread. Tests substitute fakes; the real engine wraps `VoiceConverter` and is
imported lazily so that importing the service does not load torch models.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from rvc_lora.errors import ModelUnavailableError
from rvc_lora.pipeline.params import ConvertParams
from service.errors import DeviceOutOfMemory, JobCancelled, relabel

if TYPE_CHECKING:
    from rvc_lora.pipeline.converter import F0Track
    from rvc_lora.pipeline.steps import PadConfig
    from service.settings import Settings

ConvertOptions = ConvertParams  # the library's conversion parameters, validated on construction

log = logging.getLogger(__name__)

T = TypeVar("T")
SR_16K = 16000
FRAMES_PER_S = 100  # content features and f0 are 10 ms frames (hop 160 at 16 kHz)
INFER_CHUNK_FRAMES = 1000  # /infer synthesizes long inputs 10 s at a time ...
INFER_CONTEXT_FRAMES = 100  # ... each with 1 s of its neighbours' features on both sides, cut from its output

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


@dataclass(frozen=True)
class AdapterMeta:
    """What an adapter file says about itself, after it was checked against the resident base."""

    label: str
    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    base_fingerprint: str
    sr: int
    version: str
    f0: bool


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
    (`ExtractionReport.to_dict()` without the server-side paths)."""

    adapter_bytes: bytes
    report: Mapping[str, Any]


class Engine(Protocol):
    """What the worker needs from the models. Voices are opaque: `load_voice` returns a host-memory
    voice (adapter tensors + optional index), `to_device` the device copy that `convert`/`infer` take.
    `convert`/`infer` work through long inputs in chunks and call `stop_if_requested()` between them."""

    @property
    def info(self) -> ModelInfo: ...

    def describe_adapter(self, path: Path) -> AdapterMeta:
        """Read and validate an adapter file against the base (AdapterError / AdapterMismatchError)."""
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

    def to_device(self, voice: object) -> object: ...

    def warmup(self) -> float:
        """Run one representative conversion; return the seconds of audio it processed."""
        ...

    def convert(self, audio16k: NDArray[np.float32], options: ConvertOptions, voice: object | None) -> Rendered: ...

    def infer(self, features: Features, voice: object | None) -> Rendered: ...


def load_engine(settings: Settings) -> Engine:
    """The real engine (imports torch and the pipeline here, on the device thread)."""
    return RVCEngine(settings)


@dataclass(frozen=True)
class _Voice:
    adapter: Any  # rvc_lora.adapters.Adapter (host tier) or rvc_lora.voice.PreparedAdapter (device tier)
    index: Any  # rvc_lora.pipeline.index.RetrievalIndex | None


class RVCEngine:
    """`VoiceConverter` behind the `Engine` protocol.

    The resident model has the serving slot layout (`serving_layout`): LoRA slots on every layer that
    extraction produces (enc_p, flow, dec) and full-delta slots for the small tensors, all at `max_rank`. So
    adapters extracted from full voice models load, and so do adapters trained on the usual `ups`/`resblocks`
    layout (a subset of it). The base `.pth` is read once; its `RawCheckpoint` (CPU, as stored) stays in memory
    for extraction, which never touches the device model."""

    def __init__(self, settings: Settings) -> None:
        from rvc_lora.checkpoint import read_rvc_checkpoint
        from rvc_lora.pipeline.content import ContentEncoder
        from rvc_lora.pipeline.converter import VoiceConverter
        from rvc_lora.pipeline.f0 import available_f0_methods
        from rvc_lora.voice import build_voice_model, serving_layout

        if settings.model is None or settings.hubert is None:
            raise ModelUnavailableError("RVC_LORA_MODEL and RVC_LORA_HUBERT must name the base checkpoint and the "
                                        "content encoder")
        self._base_raw = read_rvc_checkpoint(settings.model)
        cfg = self._base_raw.config
        layout = serving_layout(cfg, settings.max_rank, setting=f"start the server with RVC_LORA_MAX_RANK >= the "
                                f"adapter's rank (now {settings.max_rank})")
        synth = build_voice_model(self._base_raw, layout)
        self._vc = VoiceConverter(synth, ContentEncoder.from_path(settings.hubert),
                                  device=_resolve_device(settings.device), is_half=settings.half,
                                  rmvpe_path=settings.rmvpe)
        model = self._vc.model
        self._info = ModelInfo(fingerprint=model.fingerprint, version=cfg.version, f0=cfg.f0, sr=cfg.sr,
                               n_speakers=int(model.base.emb_g.num_embeddings), content_dim=cfg.content_dim,
                               max_rank=settings.max_rank, target_modules=tuple(layout.lora.target_modules),
                               f0_methods=available_f0_methods(settings.rmvpe), device=str(self._vc.device))
        self._max_index_bytes = settings.max_index_memory_bytes

    @property
    def info(self) -> ModelInfo:
        return self._info

    def describe_adapter(self, path: Path) -> AdapterMeta:
        from rvc_lora.adapters import load_adapter

        adapter = load_adapter(path)
        self._vc.model.check_adapter(adapter)  # base, slots and every tensor's shape: what a swap would refuse
        info = adapter.info
        return AdapterMeta(label=info.name, rank=info.r, lora_alpha=info.lora_alpha,
                           target_modules=tuple(info.target_modules), base_fingerprint=info.base_fingerprint,
                           sr=info.sr, version=info.version, f0=info.f0)

    def check_index(self, path: Path) -> None:
        from rvc_lora.pipeline.index import probe_index_file

        # in a child process: the file is untrusted
        probe_index_file(path, dim=self._info.content_dim, max_bytes=self._max_index_bytes)

    def extract_voice(self, voice: Path, *, rank: int, name: str, evaluate: bool) -> Extracted:
        from rvc_lora.errors import RVCLoraError
        from rvc_lora.extract import extract_adapter

        try:  # threads=1 (the default) is set for this thread only: the device thread keeps its own
            result = extract_adapter(self._base_raw, voice, rank=rank, targets="all", name=name, evaluate=evaluate,
                                     progress=False)
        except RVCLoraError as exc:
            raise relabel(exc, self._base_raw.path, "(the resident one)") from exc  # the caller names the voice
        report = {k: v for k, v in result.report.to_dict().items() if k not in ("base", "voice")}  # server paths
        return Extracted(result.to_bytes(), report)

    def load_voice(self, adapter: Path, index: Path | None) -> object:
        """The host tier: the adapter file read, checked against the model, in the model dtype (pinned on CUDA,
        so that the host -> device copy is a plain DMA), unpadded (compact)."""
        from rvc_lora.adapters import load_adapter
        from rvc_lora.pipeline.index import RetrievalIndex

        loaded = load_adapter(adapter)
        self._vc.model.check_adapter(loaded)
        if self._vc.device.type == "cuda":
            dtype = self._vc.dtype
            loaded = type(loaded)(loaded.info, {k: v.to(dtype).pin_memory() for k, v in loaded.tensors.items()})
        retrieval = None if index is None else RetrievalIndex.from_path(index, dim=self._info.content_dim,
                                                                        max_bytes=self._max_index_bytes)
        return _Voice(loaded, retrieval)

    def host_bytes(self, voice: object) -> int:
        host = _as_voice(voice)
        tensors = sum(int(t.nbytes) for t in host.adapter.tensors.values())
        return tensors + (0 if host.index is None else host.index.nbytes)

    def to_device(self, voice: object) -> object:
        """The device tier: the adapter prepared for the resident slots (padded, scaled, on the device), so a
        swap is one fused copy."""
        host = _as_voice(voice)
        return _Voice(self._vc.model.prepare(host.adapter), host.index)

    def warmup(self) -> float:
        seconds = 1.0
        t = np.arange(int(seconds * SR_16K), dtype=np.float32) / SR_16K
        audio = (0.3 * np.sin(2 * np.pi * 140.0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
        self.convert(audio, ConvertOptions(seed=0), None)
        return seconds

    def convert(self, audio16k: NDArray[np.float32], options: ConvertOptions, voice: object | None) -> Rendered:
        adapter, index = (None, None) if voice is None else (_as_voice(voice).adapter, _as_voice(voice).index)
        result = self._in_shorter_chunks_on_oom(lambda: self._vc.convert(
            audio16k, SR_16K, options, adapter=adapter, index=index, progress=lambda *_: stop_if_requested()))
        timings = {k: v for k, v in result.timings.items() if k != "decode"}  # decoding is the handler's
        return Rendered(result.audio, result.sr, timings, result.f0)

    def infer(self, features: Features, voice: object | None) -> Rendered:
        """`INFER_CHUNK_FRAMES` frames at a time (memory and device time per step stay bounded, and an abandoned
        request stops between chunks), each with `INFER_CONTEXT_FRAMES` of context on both sides. An input of
        one chunk is synthesized whole; the seed seeds the first chunk, the later ones continue its stream."""
        import torch

        adapter = None if voice is None else _as_voice(voice).adapter
        phone = torch.from_numpy(features.phone)
        pitch = None if features.pitch is None else torch.from_numpy(features.pitch)
        nsff0 = None if features.nsff0 is None else torch.from_numpy(features.nsff0)
        frames, hop = len(phone), self._info.sr // FRAMES_PER_S
        pieces: list[NDArray[np.float32]] = []
        timings: dict[str, float] = {}
        for start in range(0, frames, INFER_CHUNK_FRAMES):
            stop_if_requested()
            lo = max(start - INFER_CONTEXT_FRAMES, 0)
            part = slice(lo, min(start + INFER_CHUNK_FRAMES + INFER_CONTEXT_FRAMES, frames))
            result = self._guard_oom(functools.partial(
                self._vc.infer_features, phone[part], None if pitch is None else pitch[part],
                None if nsff0 is None else nsff0[part], sid=features.sid,
                seed=features.seed if start == 0 else None, adapter=adapter))
            keep = min(INFER_CHUNK_FRAMES, frames - start)
            pieces.append(result.audio[(start - lo) * hop : (start - lo + keep) * hop])
            for stage, seconds in result.timings.items():
                timings[stage] = timings.get(stage, 0.0) + seconds
        return Rendered(np.concatenate(pieces), self._info.sr, timings)

    def open_stream(self, params: Any, sr: int, channels: int, voice: object | None) -> Any:
        """A realtime `StreamConverter` over the resident model (on the device thread: it allocates there); it keeps
        `voice` (adapter and index) for its whole life."""
        from rvc_lora.stream.converter import StreamConverter

        v = None if voice is None else _as_voice(voice)
        return StreamConverter(self._vc, params, sr=sr, channels=channels, adapter=None if v is None else v.adapter,
                               index=None if v is None else v.index)

    def _in_shorter_chunks_on_oom(self, run: Callable[[], T]) -> T:
        """Device out of memory: free the allocator's cache and convert again in shorter chunks (RVC's long-audio
        cut points closer together: `shorter_chunks`), down to `MIN_CHUNK_S`; then 503. The worker lives on.
        A retried request's output can differ slightly from an unconstrained run's (other cut points)."""
        import torch

        pad = self._vc.pad
        try:
            for smaller in (None, *shorter_chunks(pad)):
                if smaller is not None:
                    torch.cuda.empty_cache()  # here, not in `except`: its traceback keeps the failed run's tensors
                    log.warning("device out of memory: converting again in chunks of %d s", smaller.x_center)
                    self._vc.pad = smaller
                try:
                    return run()
                except torch.cuda.OutOfMemoryError:
                    pass
            torch.cuda.empty_cache()
        finally:
            self._vc.pad = pad
        raise DeviceOutOfMemory("the device ran out of memory for this request, also in shorter chunks; retry later "
                                "or send shorter audio", retry_after=5)

    def _guard_oom(self, run: Callable[[], T]) -> T:
        """Device out of memory: free the allocator's cache and try once more, else 503 (the worker lives on)."""
        import torch

        try:
            return run()
        except torch.cuda.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()  # out of `except`: its traceback keeps the failed run's tensors alive
        try:
            return run()
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise DeviceOutOfMemory("the device ran out of memory for this request; retry later or send shorter "
                                    "audio", retry_after=5) from exc


MIN_CHUNK_S = 4


def shorter_chunks(pad: PadConfig) -> list[PadConfig]:
    """Padding configs with ever shorter chunks, for out-of-memory retries: the distance between long-audio cut
    points (`x_center`) halved at each step down to `MIN_CHUNK_S`, the quiet-place search window and the
    one-chunk limit shrunk with it, the context padding (`x_pad`) kept."""
    from rvc_lora.pipeline.steps import PadConfig

    out = []
    center = pad.x_center
    while center > MIN_CHUNK_S:
        center = max(center // 2, MIN_CHUNK_S)
        out.append(PadConfig(x_pad=pad.x_pad, x_query=max(1, min(pad.x_query, center // 4)), x_center=center,
                             x_max=center + max(pad.x_max - pad.x_center, 1)))
    return out


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _as_voice(voice: object) -> _Voice:
    assert isinstance(voice, _Voice)
    return voice
