"""The real engine: `VoiceConverter` behind the `Engine` protocol (`service/engine.py`).

Imported lazily by the app (`load_engine` runs on the device thread at start), so that importing the
service does not load torch models.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from rvc_lora.errors import ModelUnavailableError
from rvc_lora.frames import FRAMES_PER_S, SR_16K
from service.engine import (
    ConvertOptions,
    Engine,
    Extracted,
    Features,
    ModelInfo,
    Rendered,
    Row,
    stop_if_requested,
)
from service.errors import DeviceOutOfMemory, relabel

if TYPE_CHECKING:

    from torch import Tensor

    from rvc_lora.adapters import AdapterInfo
    from rvc_lora.pipeline.converter import Plan, Stopwatch, VoiceConverter
    from rvc_lora.pipeline.steps import PadConfig
    from rvc_lora.stream.converter import StreamConverter, StreamInput
    from rvc_lora.voice import SynthRow as BatchRow
    from service.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
INFER_CHUNK_FRAMES = 1000  # /infer synthesizes long inputs 10 s at a time ...
INFER_CONTEXT_FRAMES = 100  # ... each with 1 s of its neighbours' features on both sides, cut from its output
CPU_F0_METHODS = ("pm", "harvest")  # f0 methods with no network: they run on the worker's CPU threads


def load_engine(settings: Settings) -> Engine:
    """The real engine (imports torch and the pipeline here, on the device thread)."""
    return RVCEngine(settings)


@dataclass(frozen=True)
class _Voice:
    """A voice's host copy: what the device tier (the adapter bank) is loaded from."""

    adapter: Any  # rvc_lora.voice.PreparedAdapter in host memory (pinned on CUDA)
    index: Any  # rvc_lora.pipeline.index.RetrievalIndex | None
    key: str  # the adapter file (content-addressed in the store): its name in the adapter bank


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
        from rvc_lora.voice import AdapterBank, build_voice_model, serving_layout

        if settings.model is None or settings.hubert is None:
            raise ModelUnavailableError("RVC_LORA_MODEL and RVC_LORA_HUBERT must name the base checkpoint and the "
                                        "content encoder")
        device = _resolve_device(settings.device)
        if settings.torch_threads is not None:
            import torch

            torch.set_num_threads(settings.torch_threads)  # here, on the device thread, before any model runs
        if settings.malloc_reuse_bytes:
            from rvc_lora.host_memory import reuse_freed_memory

            reuse_freed_memory(settings.malloc_reuse_bytes)
        self._base_raw = read_rvc_checkpoint(settings.model)
        cfg = self._base_raw.config
        layout = serving_layout(cfg, settings.max_rank, setting=f"start the server with RVC_LORA_MAX_RANK >= the "
                                f"adapter's rank (now {settings.max_rank})")
        synth = build_voice_model(self._base_raw, layout)
        self._vc = VoiceConverter(synth, ContentEncoder.from_path(settings.hubert),
                                  device=device, is_half=settings.half,
                                  rmvpe_path=settings.rmvpe)
        model = self._vc.model
        self._info = ModelInfo(fingerprint=model.fingerprint, version=cfg.version, f0=cfg.f0, sr=cfg.sr,
                               n_speakers=int(model.base.emb_g.num_embeddings), content_dim=cfg.content_dim,
                               max_rank=settings.max_rank, target_modules=tuple(layout.lora.target_modules),
                               f0_methods=available_f0_methods(settings.rmvpe), device=str(self._vc.device))
        self._max_index_bytes = settings.max_index_memory_bytes
        # K adapter slots: the device tier of voices, and the voices one batch can mix (slot 0 is the resident memory)
        self._bank = AdapterBank(model, settings.bank_slots)
        if settings.batch_way is not None:
            self._bank.strategy = settings.batch_way
        self._info = dataclasses.replace(self._info, bank_slots=self._bank.size,
                                         bank_slot_bytes=self._bank.slot_nbytes, batch_way=self._bank.strategy)

    @property
    def info(self) -> ModelInfo:
        return self._info

    def describe_adapter(self, path: Path) -> AdapterInfo:
        from rvc_lora.adapters import load_adapter

        adapter = load_adapter(path)
        self._vc.model.check_adapter(adapter)  # base, slots and every tensor's shape: what a swap would refuse
        return adapter.info

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
        r = result.report  # its summary, as the adapter file keeps it, and this run's sizes and timings
        return Extracted(result.to_bytes(), {**r.summary(), "adapter_bytes": r.adapter_bytes,
                                             "size_ratio": r.size_ratio, "seconds": r.seconds,
                                             "eval_seconds": r.eval_seconds})

    def load_voice(self, adapter: Path, index: Path | None) -> object:
        """The host tier: the adapter file read, checked against the model and prepared in host memory as a bank
        slot holds it (`PreparedAdapter`: the model dtype, alpha/r folded, at its own rank), pinned on CUDA so that
        the copy into a slot is a plain DMA."""
        from rvc_lora.adapters import load_adapter
        from rvc_lora.pipeline.index import RetrievalIndex

        prepared = self._vc.model.prepare(load_adapter(adapter), device="cpu")
        if self._vc.device.type == "cuda":
            prepared = prepared.pin_memory()
        retrieval = None if index is None else RetrievalIndex.from_path(index, dim=self._info.content_dim,
                                                                        max_bytes=self._max_index_bytes)
        return _Voice(prepared, retrieval, str(adapter))

    def host_bytes(self, voice: object) -> int:
        host = _as_voice(voice)
        return int(host.adapter.nbytes()) + (0 if host.index is None else host.index.nbytes)

    def to_device(self, voice: object) -> bool:
        v = _as_voice(voice)
        resident = self._bank.holds(v.key)
        with self._bank.hold([(v.key, v.adapter)]):  # loads it unless resident; marks it most recently used
            pass
        return resident

    def device_voices(self) -> int:
        return self._bank.voices

    def drop_device(self, voice: object) -> None:
        self._bank.discard(_as_voice(voice).key)

    @contextmanager
    def _in_voice(self, voice: object | None, key: str | None = None) -> Iterator[Any]:
        """The model computes in `voice`'s bank slot (loaded if not resident, pinned) inside the block, which
        gets the adapter to pass to `VoiceConverter` (it copies nothing then). `voice` a host `_Voice`, or a
        stream's `PreparedAdapter` with its bank `key`; None: the base voice (no slot)."""
        adapter: Any = voice
        if isinstance(voice, _Voice):
            adapter, key = voice.adapter, voice.key
        with self._bank.hold([] if adapter is None else [(key, adapter)]) as slots, \
                self._bank.bound(slots[0] if slots else None, adapter):
            yield adapter

    def warmup(self) -> float:
        seconds = 1.0
        t = np.arange(int(seconds * SR_16K), dtype=np.float32) / SR_16K
        audio = (0.3 * np.sin(2 * np.pi * 140.0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
        self.convert(audio, ConvertOptions(seed=0), None)
        return seconds

    def convert(self, audio16k: NDArray[np.float32], options: ConvertOptions, voice: object | None) -> Rendered:
        index = None if voice is None else _as_voice(voice).index
        with self._in_voice(voice) as adapter:
            result = self._in_shorter_chunks_on_oom(lambda: self._vc.convert_16k(  # the handler prepared it
                audio16k, options, adapter=adapter, index=index, progress=lambda *_: stop_if_requested()))
        return Rendered(result.audio, result.sr, result.timings, result.f0)

    def infer(self, features: Features, voice: object | None) -> Rendered:
        """`INFER_CHUNK_FRAMES` frames at a time (memory and device time per step stay bounded, and an abandoned
        request stops between chunks), each with `INFER_CONTEXT_FRAMES` of context on both sides. An input of
        one chunk is synthesized whole; the seed seeds the first chunk, the later ones continue its stream."""

        with self._in_voice(voice) as adapter:
            return self._infer(features, adapter)

    def _infer(self, features: Features, adapter: Any) -> Rendered:
        import torch

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

    def stages(self, audio16k: NDArray[np.float32], options: ConvertOptions, voice: object | None) -> RVCStages:
        return RVCStages(self._vc, audio16k, options, None if voice is None else _as_voice(voice))

    def synthesize(self, rows: Sequence[Row]) -> list[NDArray[np.float32]]:
        """Rows of any voices through the adapter bank, in batches of at most `bank_slots` distinct voices (in
        order); each row's noise was drawn when it was made, so a retry gives the same audio. The batch's time
        goes to each row's `synth` stage."""
        import time

        import torch

        inputs = [_as_input(row) for row in rows]
        out: list[NDArray[np.float32]] = []
        for part in _by_voices(inputs, self._bank.size):
            start = time.perf_counter()
            try:
                with self._bank.hold([(i.voice_key, i.adapter) for i in part]) as slots:
                    audio = self._bank.synthesize([i.row for i in part], slots)
                    out += [a.float().cpu().numpy() for a in audio]
            except torch.cuda.OutOfMemoryError as exc:
                raise DeviceOutOfMemory(f"the device ran out of memory for a batch of {len(part)} rows",
                                        retry_after=5) from exc
            seconds = time.perf_counter() - start
            for i in part:
                i.clock.times["synth"] += seconds
        return out

    def open_stream(self, params: Any, sr: int, channels: int, voice: object | None) -> Any:
        """A realtime `StreamConverter` over the resident model (on the device thread: it allocates there); it keeps
        `voice`'s host copy (adapter and index) and bank key for its whole life, so a deleted adapter's stream keeps
        its voice: the bank loads it again from that copy if it left its slot."""
        from rvc_lora.stream.converter import StreamConverter

        v = None if voice is None else _as_voice(voice)
        return StreamConverter(self._vc, params, sr=sr, channels=channels, adapter=None if v is None else v.adapter,
                               index=None if v is None else v.index, bank_key=None if v is None else v.key)

    def stream_blocks(self, blocks: Sequence[tuple[Any, NDArray[np.float32]]]
                      ) -> list[tuple[Any, Row | None] | Exception]:
        """Device thread: the stages before synthesis of one block of each of several streams (`(stream, block)`
        pairs) -> per block its step and its synthesizer row for `synthesize` (the noise drawn from the stream's
        generator; the bank holds the stream's own prepared adapter under its file's key, so a deleted adapter's
        stream keeps its voice; None when the block must be synthesized alone: a shifted formant), or the error
        that failed that block only. Each stream `take`s its block, then one content-encoder forward runs per
        group of equal-length histories (`rvc_lora.stream.converter.content_features`), then each stream
        `prepare`s; a failed shared forward (out of memory) is retried one stream at a time."""
        from rvc_lora.stream.converter import StreamInput, content_features

        taken = [_attempt(self.stream_stage, functools.partial(stream.take, block)) for stream, block in blocks]
        ready = [(i, stream, t) for i, ((stream, _), t) in enumerate(zip(blocks, taken, strict=True))
                 if isinstance(t, StreamInput)]
        feats: list[Tensor | Exception]
        try:
            feats = list(self.stream_stage(lambda: content_features([s for _, s, _ in ready], [t for *_, t in ready])))
        except Exception:  # noqa: BLE001 - out of memory for the group, say: each stream's forward alone
            feats = [_attempt(self.stream_stage, functools.partial(_features_alone, s, t)) for _, s, t in ready]
        out: dict[int, tuple[Any, Row | None] | Exception] = {i: t for i, t in enumerate(taken)
                                                              if isinstance(t, Exception)}
        for (i, stream, t), f in zip(ready, feats, strict=True):
            out[i] = f if isinstance(f, Exception) else _attempt(self.stream_stage,
                                                                  functools.partial(_stream_row, stream, t, f))
        return [out[i] for i in range(len(blocks))]

    def stream_stage(self, run: Callable[[], T]) -> T:
        """Device thread: a stage of a realtime stream block (`StreamConverter.begin`, `process`, `synthesize`,
        `finish`); a device out of memory frees the allocator's cache and becomes `DeviceOutOfMemory`. Not retried,
        unlike a conversion's: the stage may have advanced the stream's state, so the stream ends (close code
        4503) while the worker and the other streams go on."""
        import torch

        try:
            return run()
        except torch.cuda.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()  # out of `except`: its traceback keeps the failed stage's tensors alive
        raise DeviceOutOfMemory("the device ran out of memory for a stream block; reconnect in a few seconds",
                                retry_after=5)

    def stream_process(self, stream: Any, block: NDArray[np.float32]) -> Any:
        """Device thread: a whole stream block (`StreamConverter.process`) in the stream's bank slot."""
        with self._in_voice(stream.adapter, stream.bank_key):
            return stream.process(block)

    def stream_alone(self, stream: Any, step: Any) -> Any:
        """Device thread: a block `stream_blocks` gave no row for (a shifted formant), synthesized alone in the
        stream's bank slot."""
        with self._in_voice(stream.adapter, stream.bank_key):
            return stream.finish(step, stream.synthesize(step))

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


@dataclass(frozen=True)
class _RowInput:
    """What `RVCEngine.synthesize` needs of a row: the batch row (its noise drawn), the voice (prepared adapter
    and its bank key; None and "" for the base voice), and the request's stopwatch (it takes the synthesis time)."""

    row: BatchRow
    adapter: Any  # rvc_lora.voice.PreparedAdapter | None
    voice_key: str
    clock: Stopwatch


def _features_alone(stream: StreamConverter, taken: StreamInput) -> Tensor:
    from rvc_lora.stream.converter import content_features

    return content_features([stream], [taken])[0]


def _stream_row(stream: StreamConverter, taken: StreamInput, feats: Tensor) -> tuple[Any, Row | None]:
    """A taken stream block and its content features -> its step and its synthesizer row (None: synthesized
    alone, a shifted formant)."""
    step = stream.prepare(taken, feats)
    row = stream.row(step)
    if row is None:
        return step, None
    voice = "" if stream.adapter is None else stream.bank_key
    return step, Row(int(step.feats.shape[1]), _RowInput(row, stream.adapter, stream.bank_key, step.clock), voice)


def _attempt(guard: Callable[[Callable[[], T]], T], run: Callable[[], T]) -> T | Exception:
    """`guard(run)`, or the exception it raised (one stream's failure stays that stream's)."""
    try:
        return guard(run)
    except Exception as exc:  # noqa: BLE001 - handed back to the block's stream
        return exc


def _as_input(row: Row) -> _RowInput:
    assert isinstance(row.inputs, _RowInput)
    return row.inputs


def _by_voices(inputs: list[_RowInput], slots: int) -> list[list[_RowInput]]:
    """`inputs` cut, in order, into runs of at most `slots` distinct voices (the base voice takes no slot): each run
    releases its pins before the next loads, and pins last one device call only, so no run finds every slot pinned
    (a `BankFullError` would be a bug, and it changes no slot)."""
    parts: list[list[_RowInput]] = [[]]
    voices: set[str] = set()
    for i in inputs:
        if i.adapter is not None and i.voice_key not in voices and len(voices) == slots:
            parts.append([])
            voices = set()
        if i.adapter is not None:
            voices.add(i.voice_key)
        parts[-1].append(i)
    return [p for p in parts if p]


class RVCStages:
    """One conversion as `Stages`: `VoiceConverter.plan`, then per chunk the content encoder (device) and
    `blend_row` + `make_row` (CPU: the row's noise drawn from the request's generator, in chunk order), then
    `assemble`. The generator is a CPU one seeded with the request's seed, so the draws are the ones
    `VoiceConverter.convert` makes after `torch.manual_seed(seed)` on CPU."""

    def __init__(self, vc: VoiceConverter, audio16k: NDArray[np.float32], options: ConvertOptions,
                 voice: _Voice | None) -> None:
        import torch

        self._vc, self._audio, self._options = vc, audio16k, options
        self._adapter = None if voice is None else voice.adapter
        self._voice_key = "" if voice is None else voice.key
        self._retrieval = None if voice is None or options.index_rate <= 0 else voice.index
        self._generator = None if options.seed is None else torch.Generator().manual_seed(options.seed)
        self._plan: Plan | None = None
    @property
    def prepare_on_device(self) -> bool:
        return self._vc.model.cfg.f0 and self._vc.f0_method(self._options) not in CPU_F0_METHODS

    @property
    def plan(self) -> Plan:
        assert self._plan is not None, "prepare() first"
        return self._plan

    def prepare(self) -> int:
        self._plan = self._vc.plan(self._audio, self._options, self._retrieval)
        return len(self._plan.chunks)

    def encode(self, i: int) -> object:
        """The chunk's content features on the device. Out of device memory -> `DeviceOutOfMemory`, which sends the
        pipelined worker to `RVCEngine.convert` (the whole request in ever shorter chunks, else 503) instead of
        failing the request as an internal error."""
        import torch

        try:
            return self._vc.content_features(self.plan, i)
        except torch.cuda.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()  # out of `except`: its traceback keeps the failed run's tensors alive
        raise DeviceOutOfMemory(f"the device ran out of memory encoding chunk {i}", retry_after=5)

    def row(self, i: int, encoded: object) -> Row:
        import torch

        assert isinstance(encoded, torch.Tensor)
        from rvc_lora.voice import make_row

        chunk = self._vc.blend_row(self.plan, i, encoded)
        row = make_row(self._vc.model, chunk.feats[0], None if chunk.pitch is None else chunk.pitch[0],
                       None if chunk.pitchf is None else chunk.pitchf[0], sid=chunk.sid, generator=self._generator)
        return Row(chunk.frames, _RowInput(row, self._adapter, self._voice_key, self.plan.clock), self._voice_key)

    def finish(self, outputs: Sequence[NDArray[np.float32]]) -> Rendered:
        from rvc_lora.pipeline.steps import output_sr

        audio = self._vc.assemble(self.plan, outputs)
        timings = {k: v for k, v in self.plan.clock.times.items() if k != "decode"}  # decoding is the handler's
        return Rendered(audio, output_sr(self._vc.sr, self._options.resample_sr), timings, self.plan.track)
