"""`VoiceConverter`: audio in, converted audio out, step by step as RVC's pipeline (spec §3).

One object holds the synthesizer (with LoRA slots), the content encoder and the f0 extractors on one
device. With `seed` set, `torch.manual_seed(seed)` runs once before the first chunk and nothing but the
synthesizer draws from torch's generator, so a conversion equals RVC's pipeline run right after the
same call on the same inputs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import Tensor

from rvc_lora.adapters import Adapter, load_adapter
from rvc_lora.errors import AdapterError, ParameterError
from rvc_lora.frames import HOP_16K, SR_16K
from rvc_lora.lora import LoRAConfig
from rvc_lora.models.generator import GeneratorNSF
from rvc_lora.models.synthesizer import check_sid
from rvc_lora.pipeline import steps
from rvc_lora.pipeline.audio import AudioSource, decode_audio, prepare_16k, resample, to_int16
from rvc_lora.pipeline.content import ContentEncoder
from rvc_lora.pipeline.f0 import default_f0_method, get_f0_extractor, overlay_f0, read_f0_file
from rvc_lora.pipeline.index import RetrievalIndex
from rvc_lora.pipeline.params import ConvertParams
from rvc_lora.voice import LIBRARY_LAYOUT, PreparedAdapter, SlotLayout, SynthesizerLoRA, load_voice_model

AdapterArg = PreparedAdapter | Adapter | str | os.PathLike[str] | None
IndexArg = RetrievalIndex | str | os.PathLike[str] | None
Progress = Callable[[int, int], None]  # (chunks done, chunks in all)
STAGES = ("decode", "f0", "features", "index", "synth", "postprocess")


@dataclass(frozen=True)
class F0Track:
    """The pitch a conversion used, one value per 10 ms frame of the 16 kHz input (frame i starts at i * 10 ms),
    0 where unvoiced: `source_hz` `[T]` as extracted from the input, `used_hz` `[T]` as fed to the synthesizer
    (transposed by `f0_up_key`, with a given f0 curve written over it). Both float32, T = samples // 160."""

    source_hz: NDArray[np.float32]
    used_hz: NDArray[np.float32]


@dataclass
class ConversionResult:
    """Converted audio (float32 `[N]` in [-1, 1], before RVC's int16 step) at `sr`, stage timings (s), the
    f0 method that ran and the pitch track the conversion used (both None for a model without f0 input)."""

    audio: NDArray[np.float32]
    sr: int
    timings: dict[str, float] = field(default_factory=dict)
    adapter: str | None = None
    adapter_swapped: bool = False
    f0_method: str | None = None
    f0: F0Track | None = None

    def int16(self) -> NDArray[np.int16]:
        """RVC's output: peak above 0.99 scaled down, `* 32768`, truncated to int16."""
        return to_int16(self.audio)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sr


@dataclass(frozen=True)
class ChunkFeatures:
    """One chunk's synthesizer input, on the converter's device: content features `feats` `[1, T, C]` (model
    dtype), coarse pitch `[1, T]` int64 and f0 Hz `pitchf` `[1, T]` float32 (None for models without f0), the
    speaker id. (`rvc_lora.voice.make_row` turns it into a batch row.)"""

    feats: Tensor
    pitch: Tensor | None
    pitchf: Tensor | None
    sid: int

    @property
    def frames(self) -> int:
        return int(self.feats.shape[1])


@dataclass(frozen=True)
class Plan:
    """A conversion prepared for synthesis (`VoiceConverter.plan`): the high-passed 16 kHz input `audio` `[N]`,
    its reflect-padded copy `audio_pad`, the chunks to synthesize, the pitch of the whole padded signal (`[1, P]`
    each, None without f0) and the track reported, and the stopwatch its stages add to."""

    params: ConvertParams
    retrieval: RetrievalIndex | None
    audio: NDArray[np.floating]
    audio_pad: NDArray[np.floating]
    chunks: list[steps.Chunk]
    pitch: Tensor | None
    pitchf: Tensor | None
    track: F0Track | None
    clock: Stopwatch


class Stopwatch:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times[name] += time.perf_counter() - start


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _gpu_mem_gib(device: torch.device) -> int | None:
    """RVC's whole-GiB size of a CUDA device (a GPU of <= 4 GiB gets its own padding), None for other devices."""
    if device.type != "cuda":
        return None
    return steps.gpu_mem_gib(torch.cuda.get_device_properties(device).total_memory)


class VoiceConverter:
    """Converts `(audio, params, adapter)` to audio with one resident base model.

    fp16 on CUDA (RVC's is_half padding constants), fp32 on CPU. Not thread-safe: one thread (the
    service's device worker) owns a converter.
    """

    def __init__(self, model: SynthesizerLoRA, content: ContentEncoder, *, device: str | torch.device = "cpu",
                 is_half: bool | None = None, rmvpe_path: str | os.PathLike[str] | None = None,
                 pad: steps.PadConfig | None = None) -> None:
        self.device = torch.device(device)
        self.is_half = (self.device.type == "cuda") if is_half is None else is_half
        dtype = torch.float16 if self.is_half else torch.float32
        self.model = model.to(self.device, dtype).eval()
        self.content = content.to(self.device, dtype).eval()
        self.rmvpe_path = Path(rmvpe_path) if rmvpe_path else None
        self.pad = pad or steps.PadConfig.select(is_half=self.is_half, gpu_mem_gib=_gpu_mem_gib(self.device))
        self._last_prepared: tuple[Adapter, PreparedAdapter] | None = None
        self._indexes: dict[Path, RetrievalIndex] = {}

    @classmethod
    def from_files(cls, model: str | os.PathLike[str], hubert: str | os.PathLike[str], *, device: str | None = None,
                   rmvpe: str | os.PathLike[str] | None = None, layout: SlotLayout | None = None,
                   adapters: Iterable[Adapter | str | os.PathLike[str]] = (), lora_config: LoRAConfig | None = None,
                   max_rank: int | None = None, is_half: bool | None = None) -> VoiceConverter:
        """Load the base `.pth` and the content encoder (fairseq `hubert_base.pt` or a Hugging Face folder).

        The LoRA slots: `layout` (default `LIBRARY_LAYOUT`, or `lora_config` at `max_rank`), grown so that
        every adapter in `adapters` (files or loaded) loads: give the adapters you will convert with."""
        device = device or _default_device()
        if layout is None:
            lora = lora_config or LIBRARY_LAYOUT.lora
            rank = max(max_rank or lora.r, lora.r)
            layout = LIBRARY_LAYOUT if lora_config is None and max_rank is None else SlotLayout("custom", lora, rank)
        infos = [(a if isinstance(a, Adapter) else load_adapter(a)).info for a in adapters]
        synth = load_voice_model(model, layout, adapters=infos)
        return cls(synth, ContentEncoder.from_path(Path(hubert)), device=device, is_half=is_half, rmvpe_path=rmvpe)

    @property
    def sr(self) -> int:
        return self.model.cfg.sr

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.is_half else torch.float32

    # --- adapters and indexes ---------------------------------------------------------------------
    def prepare(self, adapter: Adapter | str | os.PathLike[str]) -> PreparedAdapter:
        """Check an adapter against the resident model once; `use_adapter` then swaps it in at copy speed."""
        return self.model.prepare(adapter)

    def _remember(self, adapter: Adapter) -> PreparedAdapter:
        prepared = self.prepare(adapter)
        self._last_prepared = (adapter, prepared)
        return prepared

    def use_adapter(self, adapter: AdapterArg) -> bool:
        """Make `adapter` resident (None = the base voice); returns whether the slots were rewritten."""
        if isinstance(adapter, Adapter):  # the same object again: prepared already
            last = self._last_prepared
            adapter = last[1] if last is not None and last[0] is adapter else self._remember(adapter)
        elif adapter is not None and not isinstance(adapter, PreparedAdapter):
            adapter = self.prepare(adapter)
        slots = self.model.slots
        if slots.bound:  # an `AdapterBank` runs the model in one of its slots: that slot is the voice
            if adapter is not slots.resident:
                raise AdapterError("the model runs in an adapter bank slot holding another voice (AdapterBank.bound); "
                                   "pass the voice bound there")
            return False
        if adapter is not None and adapter is slots.resident:  # the model's record: an adapter bank over this
            # model writes its resident slots too
            return False
        self.model.swap(adapter)
        return True

    def _index(self, index: IndexArg) -> RetrievalIndex | None:
        if index is None or isinstance(index, RetrievalIndex):
            if index is not None:
                index.check_dim(self.model.cfg.content_dim)
            return index
        path = Path(index).resolve()
        if path not in self._indexes:
            self._indexes[path] = RetrievalIndex.from_path(path, dim=self.model.cfg.content_dim)
        return self._indexes[path]

    # --- conversion -------------------------------------------------------------------------------
    def convert_file(self, source: AudioSource, params: ConvertParams | None = None, *, adapter: AdapterArg = None,
                     index: IndexArg = None, f0_file: str | os.PathLike[str] | None = None,
                     progress: Progress | None = None) -> ConversionResult:
        """Decode any audio file (path or bytes) and convert it (`convert` says what each argument does)."""
        start = time.perf_counter()
        audio, sr = decode_audio(source)
        decode_s = time.perf_counter() - start
        result = self.convert(audio, sr, params, adapter=adapter, index=index, f0_file=f0_file, progress=progress)
        result.timings["decode"] += decode_s
        return result

    def convert(self, audio: ArrayLike, sr: int, params: ConvertParams | None = None, *, adapter: AdapterArg = None,
                index: IndexArg = None, f0_curve: ArrayLike | None = None,
                f0_file: str | os.PathLike[str] | None = None,
                progress: Progress | None = None) -> ConversionResult:
        """Mono audio `[N]` at `sr` -> converted audio at the model rate (or `params.resample_sr`).

        adapter: an `Adapter`, an adapter file, or None for the base voice. index: a retrieval index
        (object or `.index` path), used when `params.index_rate > 0`. f0_file: RVC's `time_s,f0_hz`
        file; f0_curve: the same as Hz per 10 ms frame (`read_f0_file`). Either is written over the
        extracted, transposed f0 from the end of the padding context on, itself untransposed (§3.4).
        """
        if f0_file is not None:
            f0_curve = read_f0_file(f0_file)
        clock = Stopwatch(self.device)
        with clock.stage("decode"):
            audio16k = prepare_16k(audio, sr)
        return self.convert_16k(audio16k, params, adapter=adapter, index=index, f0_curve=f0_curve, progress=progress,
                                clock=clock)

    def convert_16k(self, audio16k: NDArray[np.float32], params: ConvertParams | None = None, *,
                    adapter: AdapterArg = None, index: IndexArg = None, f0_curve: ArrayLike | None = None,
                    progress: Progress | None = None, clock: Stopwatch | None = None) -> ConversionResult:
        """`convert` of audio that `prepare_16k` made already (`[N]` float32 at 16 kHz, peak-normalised): the
        service decodes and prepares an upload once, on arrival."""
        params = params or ConvertParams()
        clock = clock or Stopwatch(self.device)
        swapped = self.use_adapter(adapter)
        retrieval = self._index(index) if params.index_rate > 0 else None
        method = self.f0_method(params) if self.model.cfg.f0 else None
        with torch.inference_mode():
            out, track = self._pipeline(audio16k, params, retrieval, f0_curve, clock, progress)
        resident = self.model.slots.resident
        name = None if resident is None else resident.info.name
        return ConversionResult(out, steps.output_sr(self.sr, params.resample_sr), clock.times, name, swapped, method,
                                track)

    def f0_method(self, params: ConvertParams) -> str:
        """The f0 method `params` asks for, or the default for this converter's rmvpe.pt setting."""
        return params.f0_method or default_f0_method(self.rmvpe_path)

    def _pitch(self, audio_pad: NDArray[np.floating], p_len: int, params: ConvertParams,
               f0_curve: ArrayLike | None) -> tuple[Tensor, Tensor, F0Track]:
        extractor = get_f0_extractor(self.f0_method(params), device=str(self.device), rmvpe_path=self.rmvpe_path,
                                     is_half=self.is_half)
        source = extractor(audio_pad, p_len, filter_radius=params.filter_radius)
        f0 = steps.transpose_f0(source, params.f0_up_key)
        skip = self.pad.t_pad // HOP_16K  # frames of the reflected padding before the input's first sample
        if f0_curve is not None:  # RVC's f0 file: after the transpose, starting at frame x_pad * 100
            f0 = overlay_f0(f0, f0_curve, skip)
        frames = (len(audio_pad) - 2 * self.pad.t_pad) // HOP_16K
        track = F0Track(np.asarray(source[skip : skip + frames], dtype=np.float32),
                        np.asarray(f0[skip : skip + frames], dtype=np.float32))
        return (*steps.pitch_tensors(f0, p_len), track)

    # --- the pipeline's stages (the service's worker schedules them one by one) -----------------------
    def plan(self, audio16k: NDArray[np.float32], params: ConvertParams, retrieval: RetrievalIndex | None = None,
             f0_curve: ArrayLike | None = None, clock: Stopwatch | None = None) -> Plan:
        """The CPU stage before synthesis (and f0, on the device for a network f0 method): high-pass, cut points,
        reflect padding, f0 and its transpose. `audio16k` `[N]` is what `prepare_16k` returns."""
        clock = clock or Stopwatch(self.device)
        check_sid(params.sid, self.model.cfg.spk_embed_dim)  # the request's one check (the forward trusts it)
        pad = self.pad
        with torch.inference_mode():
            with clock.stage("postprocess"):
                audio = steps.highpass(audio16k)
                cuts = steps.find_cut_points(audio, pad.t_center, pad.t_query, pad.t_max)
                audio_pad = steps.reflect_pad(audio, pad.t_pad, pad.t_pad)
            pitch = pitchf = track = None
            if self.model.cfg.f0:
                with clock.stage("f0"):
                    pitch, pitchf, track = self._pitch(audio_pad, len(audio_pad) // HOP_16K, params, f0_curve)
        return Plan(params, retrieval, audio, audio_pad, steps.plan_chunks(cuts, len(audio_pad), pad.t_pad), pitch,
                    pitchf, track, clock)

    def content_features(self, plan: Plan, i: int) -> Tensor:
        """The content encoder over chunk `i` of `plan` (on the device) -> features `[1, T, C]`."""
        chunk = plan.chunks[i]
        with torch.inference_mode(), plan.clock.stage("features"):
            # the float64 chunk goes in on the host: extract casts it to the model dtype before the copy, so a GPU
            # receives 2 (fp16) or 4 bytes per sample, not 8
            return self.content.extract(torch.from_numpy(plan.audio_pad[chunk.start : chunk.stop]),
                                        self.model.cfg.version)

    def blend_row(self, plan: Plan, i: int, feats: Tensor) -> ChunkFeatures:
        """Content features `[1, T, C]` of chunk `i` -> its `ChunkFeatures`: index blend (CPU), the x2 upsampling, pitch
        alignment and protection."""
        chunk, clock, params = plan.chunks[i], plan.clock, plan.params
        n = chunk.stop - chunk.start
        pitch = plan.pitch[:, chunk.frame_start : chunk.frame_stop] if plan.pitch is not None else None
        pitchf = plan.pitchf[:, chunk.frame_start : chunk.frame_stop] if plan.pitchf is not None else None
        with torch.inference_mode():
            with clock.stage("features"):
                protect = pitch is not None and params.protect < steps.PROTECT_OFF
                feats0 = feats.clone() if protect else None
            if plan.retrieval is not None:
                with clock.stage("index"):
                    feats = plan.retrieval.blend(feats, params.index_rate)
            with clock.stage("features"):
                feats = steps.upsample_features_x2(feats)
                if pitch is not None and pitchf is not None:
                    feats, pitch, pitchf = steps.align_pitch(feats, pitch.to(self.device), pitchf.to(self.device), n)
                    if feats0 is not None:
                        feats = steps.protect_features(feats, steps.upsample_features_x2(feats0), pitchf,
                                                       params.protect)
                else:
                    feats = feats[:, : min(feats.shape[1], n // HOP_16K)]
        return ChunkFeatures(feats, pitch, pitchf, params.sid)

    def synthesize(self, row: ChunkFeatures, clock: Stopwatch | None = None) -> NDArray[np.float32]:
        """One chunk through the resident synthesizer (drawing from torch's default generator) -> audio
        `[samples]` at the model rate, untrimmed."""
        clock = clock or Stopwatch(self.device)
        lengths = torch.tensor([row.frames], device=self.device)
        sid = torch.tensor([row.sid], device=self.device)
        with torch.inference_mode(), clock.stage("synth"):
            if row.pitch is not None and row.pitchf is not None:
                audio = self.model.infer(row.feats, lengths, row.pitch, row.pitchf, sid)[0]
            else:
                audio = self.model.infer(row.feats, lengths, sid)[0]
            out: NDArray[np.float32] = audio[0, 0].float().cpu().numpy()
        return out

    def assemble(self, plan: Plan, outputs: Sequence[NDArray[np.float32]]) -> NDArray[np.float32]:
        """The CPU stage after synthesis: every chunk's output (in order) trimmed and joined, RMS mix, resampling."""
        params, tgt_sr = plan.params, self.sr
        with plan.clock.stage("postprocess"):
            out = steps.assemble_chunks([steps.trim_chunk(y, self.pad.t_pad_tgt(tgt_sr)) for y in outputs])
            if params.rms_mix_rate != 1:
                out = steps.change_rms(plan.audio, SR_16K, out, tgt_sr, params.rms_mix_rate)
            sr_out = steps.output_sr(tgt_sr, params.resample_sr)
            if sr_out != tgt_sr:
                out = resample(out, tgt_sr, sr_out).astype(np.float32)
        return out

    def _pipeline(self, audio16k: NDArray[np.float32], params: ConvertParams, retrieval: RetrievalIndex | None,
                  f0_curve: ArrayLike | None, clock: Stopwatch,
                  progress: Progress | None) -> tuple[NDArray[np.float32], F0Track | None]:
        plan = self.plan(audio16k, params, retrieval, f0_curve, clock)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        outputs = []
        for i in range(len(plan.chunks)):
            outputs.append(self.synthesize(self.blend_row(plan, i, self.content_features(plan, i)), clock))
            if progress is not None:
                progress(i + 1, len(plan.chunks))
        return self.assemble(plan, outputs), plan.track

    def infer_features(self, phone: Tensor, pitch: Tensor | None, nsff0: Tensor | None, *, sid: int = 0,
                       seed: int | None = None, adapter: AdapterArg = None) -> ConversionResult:
        """The low-level path: content features `[T, D]` (+ coarse pitch `[T]`, f0 Hz `[T]` for f0 models)
        straight into `infer` -> audio at the model rate."""
        cfg = self.model.cfg
        if phone.dim() != 2 or phone.shape[1] != cfg.content_dim or phone.shape[0] < 1:
            raise ParameterError(f"phone must be [T, {cfg.content_dim}], got {tuple(phone.shape)}")
        frames = phone.shape[0]
        if cfg.f0:
            if pitch is None or nsff0 is None:
                raise ParameterError("this model uses f0: pitch [T] and nsff0 [T] are required")
            if pitch.shape != (frames,) or nsff0.shape != (frames,):
                raise ParameterError(f"pitch and nsff0 must be [{frames}], got {tuple(pitch.shape)} / "
                                     f"{tuple(nsff0.shape)}")
            if int(pitch.min()) < 1 or int(pitch.max()) > 255:
                raise ParameterError("pitch must hold coarse pitch ids in 1..255")
            if not bool(torch.isfinite(nsff0).all()) or bool((nsff0 < 0).any()):
                raise ParameterError("nsff0 must be finite Hz >= 0")
        if not bool(torch.isfinite(phone).all()):
            raise ParameterError("phone contains NaN or inf")
        check_sid(sid, cfg.spk_embed_dim)
        swapped = self.use_adapter(adapter)
        clock = Stopwatch(self.device)
        with torch.inference_mode(), clock.stage("synth"):
            if seed is not None:
                torch.manual_seed(seed)
            x = phone.to(self.device, self.dtype)[None]
            lengths = torch.tensor([frames], device=self.device)
            sid_t = torch.tensor([sid], device=self.device)
            if isinstance(self.model.base.dec, GeneratorNSF):
                assert pitch is not None and nsff0 is not None
                y = self.model.infer(x, lengths, pitch.to(self.device, torch.long)[None],
                                     nsff0.to(self.device, torch.float32)[None], sid_t)[0]
            else:
                y = self.model.infer(x, lengths, sid_t)[0]
        resident = self.model.slots.resident
        name = None if resident is None else resident.info.name
        return ConversionResult(y[0, 0].float().cpu().numpy(), self.sr, clock.times, name, swapped)
