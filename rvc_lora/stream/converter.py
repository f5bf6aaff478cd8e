"""`StreamConverter`: RVC's realtime algorithm (spec §6), one input block in, one output block out.

Per block (§6.5): gate the block (optional), append it to the history `input_wav`, refresh the 16 kHz copy
`input_wav_res`, run the content encoder over the whole history and f0 over its newest window (f0 cache),
decode the newest `return_length` frames, bring them to the stream rate, copy the input's loudness (RMS
mix), align them with the previous block's tail (SOLA), cross-fade, and emit the first `block_frame` samples.

`process` runs a block in three stages, which the service runs apart: `begin` (everything before synthesis),
`synthesize` (the synthesizer alone, in the stream's adapter) or `row` (the same synthesis as a batch row, for
`rvc_lora.voice.AdapterBank.synthesize` with other streams' rows), and `finish` (everything after). `begin` is
itself `take` (the block into the histories), the content encoder over the history (`content_features`: one
forward for the histories of many streams), and `prepare` (index, f0, the synthesizer's inputs); `begin_blocks`
runs them for one block of each of many streams.

A stream owns its buffers and its own random generator state, so streams sharing one `VoiceConverter`
(model, content encoder, adapter slots) can be interleaved in any order and each gives what it gives alone.
Not thread-safe: the caller runs every stream's blocks on one thread (the service's device worker).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import Tensor

from rvc_lora.adapters import Adapter
from rvc_lora.errors import AudioError, ParameterError
from rvc_lora.frames import HOP_16K, SR_16K
from rvc_lora.models.generator import GeneratorNSF
from rvc_lora.pipeline.batching import equal_length_groups
from rvc_lora.pipeline.converter import Stopwatch, VoiceConverter
from rvc_lora.pipeline.index import RetrievalIndex
from rvc_lora.pipeline.steps import upsample_features_x2
from rvc_lora.stream import dsp
from rvc_lora.stream.f0 import F0Cache, window_f0
from rvc_lora.stream.params import StreamParams
from rvc_lora.stream.sizes import StreamSizes
from rvc_lora.voice import PreparedAdapter, SynthRow, make_row

STAGES = ("f0", "features", "index", "synth", "postprocess")
MAX_CHANNELS = 8
INDEX_K = 8  # neighbours per query row


@dataclass
class StreamBlock:
    """One output block: float32 `[block_frame]` (mono) or `[block_frame, channels]`, its SOLA offset in samples
    (0..zc; the output lags the input by `crossfade_frame + zc - offset`), and seconds per stage."""

    audio: NDArray[np.float32]
    offset: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamInput:
    """A block taken into its stream's histories (`StreamConverter.take`), before its content features: the
    content encoder's input `audio16k` `[input_wav_res_len]` float32 (the stream's 16 kHz history itself, not a
    copy: use it before the stream's next `take`) and the block's stopwatch."""

    audio16k: Tensor
    clock: _Clock


@dataclass(frozen=True)
class StreamStep:
    """A block between `StreamConverter.begin` and `finish`: the synthesizer's inputs on the stream's device,
    content features `feats` `[1, M, C]` (model dtype; M = `sizes.frames`), coarse pitch `[1, M]` int64 and f0 Hz
    `pitchf` `[1, M]` float32 (None without f0), the formant's decoder length `return_length2` and samples per
    frame `upp_res` (`return_length` and `upp` at formant 0), and the block's stopwatch."""

    feats: Tensor
    pitch: Tensor | None
    pitchf: Tensor | None
    return_length2: int
    upp_res: int
    clock: _Clock


class StreamConverter:
    """One realtime stream over a loaded `VoiceConverter` (base model + content encoder + device).

    sr: the stream's sample rate (a multiple of 100; default the model rate); channels: of the input
    blocks (averaged to mono) and of the output (the mono result copied to each); adapter: an `Adapter`,
    an adapter file, or None for the base voice, held for the stream's whole life; index: a retrieval index
    (object or path), read when `index_rate > 0`; bank_key: the adapter's name in an `AdapterBank` that
    synthesizes this stream's `row`s (one name for one adapter's content: rows of one name share a slot)."""

    def __init__(self, voice: VoiceConverter, params: StreamParams | None = None, *, sr: int | None = None,
                 channels: int = 1, adapter: PreparedAdapter | Adapter | str | os.PathLike[str] | None = None,
                 index: RetrievalIndex | str | os.PathLike[str] | None = None, bank_key: str | None = None) -> None:
        if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= MAX_CHANNELS:
            raise ParameterError(f"channels must be an integer in [1, {MAX_CHANNELS}], got {channels!r}")
        self.voice = voice
        self.params = params or StreamParams()
        self.channels = channels
        self.sizes = StreamSizes.derive(self.params, voice.sr if sr is None else sr, voice.sr)
        # checked against the model once, here; every block then swaps it in by one fused copy (if another
        # stream's adapter is resident)
        self.adapter = adapter if adapter is None or isinstance(adapter, PreparedAdapter) else voice.prepare(adapter)
        self.bank_key = bank_key if bank_key is not None else f"stream-{secrets.token_hex(8)}"
        self._index_source = index
        self._index: RetrievalIndex | None = None
        self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        dev = self.device = voice.device
        z = self.sizes
        self._to_16k = dsp.SincResampler(z.sr, SR_16K, dev)
        self._to_sr = dsp.SincResampler(z.tgt_sr, z.sr, dev) if z.tgt_sr != z.sr else None
        self._formant_resamplers: dict[int, dsp.SincResampler] = {}
        self._fade_in, self._fade_out = dsp.fade_windows(z.sola_buffer_frame, dev)
        self.input_wav = torch.zeros(z.input_wav_len, dtype=torch.float32, device=dev)
        self.input_wav_res = torch.zeros(z.input_wav_res_len, dtype=torch.float32, device=dev)
        self.sola_buffer = torch.zeros(z.sola_buffer_frame, dtype=torch.float32, device=dev)
        self.rms_buffer = np.zeros(4 * z.zc, dtype=np.float32)
        self.f0_cache = F0Cache(dev)
        self.blocks = 0
        self._rng: Tensor = torch.empty(0)
        self.reset()
        self._load_index()

    @property
    def block_frame(self) -> int:
        """Samples per block at the stream rate (per channel)."""
        return self.sizes.block_frame

    @property
    def sr(self) -> int:
        return self.sizes.sr

    def reset(self) -> None:
        """Back to the state of a new stream: every buffer and the f0 cache zero, the generator re-seeded."""
        self.input_wav.zero_()
        self.input_wav_res.zero_()
        self.sola_buffer.zero_()
        self.rms_buffer[:] = 0
        self.f0_cache.reset()
        self.blocks = 0
        with self._generator():
            torch.manual_seed(self.seed)

    def update(self, **changes: Any) -> StreamParams:
        """Change hot settings (f0_up_key, formant, index_rate, threshold, rms_mix_rate, f0_method) from the next
        block on, keeping all state; any other name raises `ParameterError`."""
        params = self.params.with_hot(**changes)
        previous, self.params = self.params, params
        try:
            self._load_index()
        except Exception:
            self.params = previous
            raise
        return params

    def _load_index(self) -> None:
        if self._index is not None or self.params.index_rate == 0 or self._index_source is None:
            return
        src = self._index_source
        dim = self.voice.model.cfg.content_dim
        self._index = src if isinstance(src, RetrievalIndex) else RetrievalIndex.from_path(Path(src), dim=dim)
        self._index.check_dim(dim)

    @contextmanager
    def _generator(self) -> Any:
        """Run with this stream's generator state on the device, leaving the global one as it was."""
        cuda = self.device.type == "cuda"
        index = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else 0
        with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
            if self._rng.numel():
                (torch.cuda.set_rng_state(self._rng, index) if cuda else torch.set_rng_state(self._rng))
            yield
            self._rng = torch.cuda.get_rng_state(index) if cuda else torch.get_rng_state()

    def _mono(self, block: ArrayLike) -> NDArray[np.float32]:
        x = np.asarray(block, dtype=np.float32)
        z = self.sizes
        want = (z.block_frame,) if self.channels == 1 and x.ndim == 1 else (z.block_frame, self.channels)
        if x.shape != want:
            raise AudioError(f"a block must be float32 {list(want)} (samples, channels), got {list(x.shape)}")
        if not np.isfinite(x).all():
            raise AudioError("block contains NaN or infinite samples")
        return x if x.ndim == 1 else np.mean(x, axis=1, dtype=np.float32)

    def process(self, block: ArrayLike) -> StreamBlock:
        """One input block `[block_frame]` (mono) or `[block_frame, channels]` at the stream rate -> one
        output block of the same shape and its SOLA offset: `begin`, `synthesize`, `finish` in a row."""
        step = self.begin(block)
        return self.finish(step, self.synthesize(step))

    # --- a block's stages (the service batches the synthesis of many streams' blocks) ---------------
    def begin(self, block: ArrayLike) -> StreamStep:
        """The block's part before synthesis (device): gate, the input histories, content features over the
        history, index blend, f0 (cache), and the synthesizer's inputs: `take`, `content_features` of this stream
        alone, `prepare`. Call `finish` on it before the next `begin`: the stream's state is half advanced in
        between."""
        taken = self.take(block)
        return self.prepare(taken, content_features([self], [taken])[0])

    def take(self, block: ArrayLike) -> StreamInput:
        """The block into the stream's histories (gate, `input_wav`, its 16 kHz copy `input_wav_res`) -> the
        content encoder's input. Then `prepare` with its features (`content_features`) before the next `take`."""
        x = self._mono(block)
        clock = _Clock(self.device)
        p, z = self.params, self.sizes
        zc, n_block = z.zc, z.block_frame
        with torch.inference_mode():
            with clock.stage("postprocess"):
                if p.gate_on:  # [block + 2 zc]: the previous 2 frames re-gated now that their future is known
                    x = dsp.noise_gate(x, self.rms_buffer, zc, p.threshold)
                n = x.shape[0]
                self.input_wav[:-n_block] = self.input_wav[n_block:].clone()
                self.input_wav[-n:] = torch.from_numpy(x).to(self.device)
                self.input_wav_res[: -z.block_frame_16k] = self.input_wav_res[z.block_frame_16k :].clone()
                # re-resample the newest frames of the previous write too, now with right context; drop the
                # first 10 ms of the result, which saw the zero padding of the stateless resampler
                self.input_wav_res[-HOP_16K * (n // zc + 1) :] = self._to_16k(self.input_wav[-(n + 2 * zc) :])[HOP_16K:]
        return StreamInput(self.input_wav_res, clock)

    def prepare(self, taken: StreamInput, feats: Tensor) -> StreamStep:
        """`take`'s block with its content features `feats` `[1, F, C]` (model dtype, F = the content encoder's
        frames of `input_wav_res_len` samples) -> the synthesizer's inputs for the newest `return_length` frames:
        index blend, f0 over the newest window (cache), features upsampled x2."""
        with torch.inference_mode(), self._generator():
            return self._inputs(feats, taken.clock)

    def _inputs(self, feats: Tensor, clock: _Clock) -> StreamStep:
        p, z = self.params, self.sizes
        model, m = self.voice.model, z.frames
        with clock.stage("features"):
            feats = torch.cat((feats, feats[:, -1:, :]), 1)  # [1, F + 1, C]: 2(F + 1) >= M
        if self._index is not None and p.index_rate != 0:
            with clock.stage("index"):
                self._blend_index(feats, z.skip_head // 2, p.index_rate)
        _, return_length2, upp_res = z.formant(p.formant)
        pitch = pitchf = None
        if model.cfg.f0:
            with clock.stage("f0"):
                window = self.input_wav_res[-z.f0_window_for(p.f0_method) :].cpu().numpy()
                f0 = window_f0(window, p.f0_method, p.f0_up_key - p.formant, device=str(self.device),
                               rmvpe_path=self.voice.rmvpe_path, is_half=self.voice.is_half)
                self.f0_cache.push(f0, z.shift)
                pitch = self.f0_cache.pitch[None, -m:]
                # scaled even at formant 0: `* rl2 / rl` rounds in float32, as RVC's does
                pitchf = self.f0_cache.pitchf[None, -m:] * return_length2 / z.return_length
        with clock.stage("synth"):
            feats = upsample_features_x2(feats)[:, :m]
        return StreamStep(feats, pitch, pitchf, return_length2, upp_res, clock)

    def synthesize(self, step: StreamStep) -> Tensor:
        """The block's synthesis alone (device), drawing from the stream's generator -> float32
        `[return_length2 * upp]` at the model rate (the formant's length; `finish` brings it back)."""
        z, model = self.sizes, self.voice.model
        with torch.inference_mode(), self._generator(), step.clock.stage("synth"):
            lengths = torch.tensor([step.feats.shape[1]], device=self.device)
            sid = torch.tensor([0], device=self.device)
            heads = {"skip_head": torch.tensor([z.skip_head]), "return_length": torch.tensor([z.return_length]),
                     "return_length2": torch.tensor([step.return_length2])}
            self.voice.use_adapter(self.adapter)
            if isinstance(model.base.dec, GeneratorNSF):
                y = model.infer(step.feats, lengths, step.pitch, step.pitchf, sid, **heads)[0]
            else:
                y = model.infer(step.feats, lengths, sid, **heads)[0]
            out: Tensor = y[0, 0].float()
        return out

    def row(self, step: StreamStep) -> SynthRow | None:
        """The block's synthesis as a batch row (`rvc_lora.voice.make_row`, in the stream's adapter), its random
        numbers drawn now from the stream's generator, exactly as `synthesize` would draw them; None when the
        formant is shifted (`return_length2`, which batches do not take): run `synthesize` then."""
        z = self.sizes
        if step.return_length2 != z.return_length or step.upp_res != z.upp:
            return None
        with torch.inference_mode(), self._generator():
            return make_row(self.voice.model, step.feats[0], None if step.pitch is None else step.pitch[0],
                            None if step.pitchf is None else step.pitchf[0], skip_head=z.skip_head,
                            return_length=z.return_length)

    def finish(self, step: StreamStep, synthesized: Tensor | NDArray[np.float32]) -> StreamBlock:
        """The block's part after synthesis: `synthesized` (from `synthesize`, or a batch's audio of `row`) at
        the stream rate, RMS mix, SOLA against the previous block's tail, crossfade -> the output block."""
        p, z, clock = self.params, self.sizes, step.clock
        block = z.block_frame
        with torch.inference_mode(), self._generator(), clock.stage("postprocess"):
            infer_wav = torch.as_tensor(synthesized, device=self.device).float()
            if step.upp_res != z.upp:  # formant: play the stretched chunk back faster, to return_length * upp samples
                resampler = self._formant_resamplers.get(step.upp_res)
                if resampler is None:
                    resampler = self._formant_resamplers[step.upp_res] = dsp.SincResampler(step.upp_res, z.upp,
                                                                                           self.device)
                infer_wav = resampler(infer_wav[: z.return_length * step.upp_res])
            if self._to_sr is not None:
                infer_wav = self._to_sr(infer_wav)  # [block + sola_buffer + zc]
            if p.rms_mix_rate < 1:
                reference = self.input_wav[z.extra_frame :].cpu().numpy()
                infer_wav = dsp.rms_mix(infer_wav, reference, z.zc, p.rms_mix_rate)
            offset = dsp.sola_offset(infer_wav, self.sola_buffer, z.sola_search_frame)
            infer_wav = infer_wav[offset:]
            s = z.sola_buffer_frame
            infer_wav[:s] *= self._fade_in
            infer_wav[:s] += self.sola_buffer * self._fade_out
            self.sola_buffer[:] = infer_wav[block : block + s]  # after the crossfade, as RVC takes it
            out = infer_wav[:block].cpu().numpy().copy()
        self.blocks += 1
        audio = out if self.channels == 1 else np.repeat(out[:, None], self.channels, axis=1)
        return StreamBlock(audio, offset, clock.finish())

    def _blend_index(self, feats: Tensor, start: int, rate: float) -> None:
        """Blend rows `start:` of `feats` `[1, F, C]` in place with their retrieved neighbours; skipped for the
        whole block when any neighbour is missing (RVC's realtime rule)."""
        assert self._index is not None
        rows = feats[0][start:]
        query = rows.float().cpu().numpy()
        dist, ix = self._index.search(query, INDEX_K)
        if not (ix >= 0).all():
            return
        weight = np.square(1 / dist)
        weight /= weight.sum(axis=1, keepdims=True)
        retrieved = np.sum(self._index.big[ix] * np.expand_dims(weight, axis=2), axis=1)
        blended = torch.from_numpy(retrieved).to(feats.dtype).unsqueeze(0).to(feats.device) * rate
        feats[0][start:] = blended + (1 - rate) * rows

    def convert(self, audio: ArrayLike) -> NDArray[np.float32]:
        """A whole signal `[N]` or `[N, channels]` at the stream rate, block by block from the current state ->
        `[ceil((N + latency) / block) * block]` (same channel layout): zero-padded so that the last input sample
        is emitted. What a realtime session of these settings would have played."""
        x = np.asarray(audio, dtype=np.float32)
        z = self.sizes
        n_blocks = -(-(x.shape[0] + z.latency_samples) // z.block_frame)
        pad = [(0, n_blocks * z.block_frame - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
        x = np.pad(x, pad)
        return np.concatenate([self.process(x[i * z.block_frame : (i + 1) * z.block_frame]).audio
                               for i in range(n_blocks)])


def content_features(streams: Sequence[StreamConverter], taken: Sequence[StreamInput]) -> list[Tensor]:
    """The content features `[1, F, C]` of each stream's `take`n history, one content-encoder forward per group
    of equal-length histories (`ContentEncoder.extract_batch`: streams of the same block, crossfade and extra
    times, at any rate, since the history counts whole 10 ms frames; exact to float rounding, never padded).
    Each group's time goes to its blocks' `features` stage in equal shares. The streams share one
    `VoiceConverter` (its content encoder and model version)."""
    if len(streams) != len(taken):
        raise ParameterError(f"taken: {len(taken)} inputs for {len(streams)} streams")
    if not streams:
        return []
    voice = streams[0].voice
    if any(s.voice is not voice for s in streams):
        raise ParameterError("streams: content features are shared only by streams of one VoiceConverter")
    lengths = [t.audio16k.shape[0] for t in taken]
    out: list[Tensor] = [torch.empty(0)] * len(taken)
    for group in equal_length_groups(lengths):
        start = time.perf_counter()
        with torch.inference_mode():
            feats = voice.content.extract_batch([taken[i].audio16k for i in group], voice.model.cfg.version)
        if voice.device.type == "cuda":
            torch.cuda.synchronize(voice.device)
        share = (time.perf_counter() - start) / len(group)
        for i, f in zip(group, feats, strict=True):
            out[i] = f
            taken[i].clock.times["features"] += share
    return out


def begin_blocks(streams: Sequence[StreamConverter], blocks: Sequence[ArrayLike]) -> list[StreamStep]:
    """`begin` for one block of each stream (`blocks[i]` is `streams[i]`'s; a stream at most once), with one
    content-encoder forward per group of equal-length histories (`content_features`). Each step equals the
    stream's own `begin` to float rounding of the batched forward."""
    if len(streams) != len(blocks):
        raise ParameterError(f"blocks: {len(blocks)} blocks for {len(streams)} streams")
    if len({id(s) for s in streams}) != len(streams):
        raise ParameterError("streams: a stream appears twice (its second block needs the first one's finish)")
    taken = [s.take(b) for s, b in zip(streams, blocks, strict=True)]
    feats = content_features(streams, taken)
    return [s.prepare(t, f) for s, t, f in zip(streams, taken, feats, strict=True)]


class _Clock(Stopwatch):
    """Seconds per stage of one block; `total` is their sum (compute, not the time a block waited for a batch)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.times = dict.fromkeys(STAGES, 0.0)

    def finish(self) -> dict[str, float]:
        self.times["total"] = sum(self.times[k] for k in STAGES)
        return self.times
