"""RVC's deterministic pipeline steps (spec §3.2-§3.10) as pure functions, with RVC's numbers.

The converter calls them in RVC's order::

    audio = highpass(load_audio_16k(src))                        # float64 [N], 16 kHz
    cuts = find_cut_points(audio, pad.t_center, pad.t_query, pad.t_max)
    audio_pad = reflect_pad(audio, pad.t_pad, pad.t_pad)         # [N + 2 t_pad]
    p_len = len(audio_pad) // HOP_16K
    f0 = transpose_f0(extractor(audio_pad, p_len), f0_up_key)
    pitch, pitchf = pitch_tensors(f0, p_len)                     # [1, p_len] int64 / float32
    for c in plan_chunks(cuts, len(audio_pad), pad.t_pad):
        x = audio_pad[c.start : c.stop]
        feats = content(x)                                       # [1, F, C]
        feats0 = feats.clone()                                   # f0 models, protect < 0.5: before the index
        feats = upsample_features_x2(index_blend(feats)); feats0 = upsample_features_x2(feats0)
        feats, pc, pfc = align_pitch(feats, pitch[:, c.frame_start : c.frame_stop], pitchf[...], len(x))
        feats = protect_features(feats, feats0, pfc, protect)
        out.append(trim_chunk(synth(feats, pc, pfc), pad.t_pad_tgt(tgt_sr)))
    y = change_rms(audio, 16000, assemble_chunks(out), tgt_sr, rms_mix_rate)
    y = resample(y, tgt_sr, output_sr(tgt_sr, resample_sr)); pcm = to_int16(y)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.signal
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor

from rvc_lora.errors import AudioError, ParameterError
from rvc_lora.frames import CONTENT_HOP, CONTENT_WINDOW, FRAMES_PER_S, HOP_16K, SR_16K

# §3.2: 5th-order Butterworth high-pass at 48 Hz, applied forward-backward (zero phase) at 16 kHz.
HIGHPASS_B, HIGHPASS_A = scipy.signal.butter(N=5, Wn=48, btype="high", fs=SR_16K)

# §3.4: the mel range of the coarse pitch. np.float64 scalars, as RVC's, so numpy promotes exactly as there.
F0_MIN = 50.0
F0_MAX = 1100.0
F0_MEL_MIN = np.float64(1127 * np.log(1 + F0_MIN / 700))  # 77.75496616579426
F0_MEL_MAX = np.float64(1127 * np.log(1 + F0_MAX / 700))  # 1064.4082331636394
N_COARSE = 255

PROTECT_OFF = 0.5  # protect >= 0.5 disables the consonant protection (RVC's slider maximum)


def highpass(audio16k: NDArray[np.floating]) -> NDArray[np.float64]:
    """RVC's input filter: `filtfilt(HIGHPASS_B, HIGHPASS_A, x)` with scipy's defaults (odd padding of 18).

    `[N]` at 16 kHz, N > 18 -> float64 `[N]`: everything downstream (padding, chunks, f0 input, the
    RMS reference) stays float64, as in RVC."""
    x = np.asarray(audio16k)
    if x.ndim != 1 or len(x) <= 3 * len(HIGHPASS_A):
        raise AudioError(f"high-pass needs 1-D audio longer than {3 * len(HIGHPASS_A)} samples, got {x.shape}")
    return np.asarray(scipy.signal.filtfilt(HIGHPASS_B, HIGHPASS_A, x), dtype=np.float64)


def reflect_pad(audio: NDArray[np.floating], left: int, right: int) -> NDArray[np.floating]:
    """numpy "reflect" padding (edge sample not repeated): `[N]` -> `[left + N + right]`, same dtype."""
    return np.pad(audio, (left, right), mode="reflect")


@dataclass(frozen=True, slots=True)
class PadConfig:
    """RVC's `x_pad`/`x_query`/`x_center`/`x_max` (seconds) and the derived `t_*` (samples at 16 kHz).

    `t_pad`: context added on both sides of the signal (and of each chunk's synthesis, cut off again);
    `t_center`: distance between long-audio cut points; `t_query`: half-width of the quiet-place search
    around each; `t_max`: signals of at most this length (+160) are converted in one chunk."""

    x_pad: int
    x_query: int
    x_center: int
    x_max: int

    @property
    def t_pad(self) -> int:
        return SR_16K * self.x_pad

    @property
    def t_pad2(self) -> int:
        return 2 * self.t_pad

    @property
    def t_query(self) -> int:
        return SR_16K * self.x_query

    @property
    def t_center(self) -> int:
        return SR_16K * self.x_center

    @property
    def t_max(self) -> int:
        return SR_16K * self.x_max

    def t_pad_tgt(self, tgt_sr: int) -> int:
        """Samples trimmed from each end of every synthesized chunk at the model rate `tgt_sr`."""
        return tgt_sr * self.x_pad

    @classmethod
    def select(cls, *, is_half: bool, gpu_mem_gib: int | None = None) -> PadConfig:
        """RVC's choice: fp16 or fp32 numbers; a CUDA GPU of <= 4 GiB (`gpu_mem_gib`, see `gpu_mem_gib()`)
        overrides both. `gpu_mem_gib=None` means no CUDA device."""
        if gpu_mem_gib is not None and gpu_mem_gib <= 4:
            return PAD_LOW_MEMORY
        return PAD_FP16 if is_half else PAD_FP32


PAD_FP16 = PadConfig(x_pad=3, x_query=10, x_center=60, x_max=65)
PAD_FP32 = PadConfig(x_pad=1, x_query=6, x_center=38, x_max=41)
PAD_LOW_MEMORY = PadConfig(x_pad=1, x_query=5, x_center=30, x_max=32)


def gpu_mem_gib(total_bytes: int) -> int:
    """RVC's rounding of a GPU's memory to whole GiB: `int(total / 2^30 + 0.4)`."""
    return int(total_bytes / 2**30 + 0.4)


def find_cut_points(audio: NDArray[np.floating], t_center: int, t_query: int, t_max: int) -> list[int]:
    """Long-audio cut points at quiet places (§3.3): sample positions in `audio` (filtered, unpadded, `[N]`).

    `S[j] = sum_{i<160} |ap[j + i]|` with `ap` = `audio` reflect-padded by 80: the loudness of the
    10 ms window centred at j. If `N + 160 > t_max`, for each `t = t_center, 2 t_center, ... < N`
    the cut is the first minimum of `S[t - t_query : t + t_query]` (cut at N). Each S is summed
    i = 0..159 in float64, in RVC's order, so ties and near-ties resolve to the same index; only the
    search windows are computed."""
    x = np.asarray(audio, dtype=np.float64)
    n = len(x)
    half = HOP_16K // 2
    if n + HOP_16K <= t_max:
        return []
    ap_abs = np.abs(reflect_pad(x, half, half))  # [N + 160]
    cuts: list[int] = []
    for t in range(t_center, n, t_center):
        lo, hi = t - t_query, min(t + t_query, n)
        s = np.zeros(hi - lo)
        for i in range(HOP_16K):  # sequential sum: bit-identical to RVC's accumulation
            s += ap_abs[lo + i : hi + i]
        cuts.append(lo + int(np.argmin(s)))  # argmin returns the first minimum
    return cuts


@dataclass(frozen=True, slots=True)
class Chunk:
    """One synthesis chunk: samples `[start, stop)` of the padded signal and f0 frames `[frame_start, frame_stop)`."""

    start: int
    stop: int
    frame_start: int
    frame_stop: int


def plan_chunks(cut_points: Sequence[int], n_padded: int, t_pad: int) -> list[Chunk]:
    """RVC's chunk loop (§3.3): cut points (from `find_cut_points`, used as indices into the padded
    signal of length `n_padded`) -> chunks. Each cut t is floored to a multiple of 160; a chunk runs
    from the previous cut s to `t + 2 t_pad + 160` (frames `s//160 .. (t + 2 t_pad)//160`), so neighbours
    overlap by one frame; the last chunk runs from the last cut to the end. Bounds are clipped to the
    signal, as python slicing clips them."""
    p_len = n_padded // HOP_16K
    chunks: list[Chunk] = []
    s = 0
    for cut in cut_points:
        t = cut // HOP_16K * HOP_16K
        stop = min(t + 2 * t_pad + HOP_16K, n_padded)
        chunks.append(Chunk(s, stop, s // HOP_16K, min((t + 2 * t_pad) // HOP_16K, p_len)))
        s = t
    chunks.append(Chunk(s, n_padded, s // HOP_16K, p_len))
    return chunks


def content_frames(chunk_len: int) -> int:
    """Content-encoder frames for `chunk_len` samples at 16 kHz (HuBERT conv stack): `(L - 400)//320 + 1`."""
    return (chunk_len - CONTENT_WINDOW) // CONTENT_HOP + 1


def synth_frames(chunk_len: int) -> int:
    """10 ms frames synthesized for one chunk (§3.7): `min(L//160, 2 * content_frames(L))`."""
    return min(chunk_len // HOP_16K, 2 * content_frames(chunk_len))


def trim_chunk(y: NDArray[np.floating], t_pad_tgt: int) -> NDArray[np.floating]:
    """Drop the `t_pad_tgt` samples of context synthesized at each end of a chunk: `y[t:-t]`."""
    if t_pad_tgt <= 0:
        raise ParameterError(f"t_pad_tgt must be > 0, got {t_pad_tgt}")  # y[0:-0] would be empty
    return y[t_pad_tgt:-t_pad_tgt]


def assemble_chunks(chunks: Sequence[NDArray[np.floating]]) -> NDArray[np.float32]:
    """Trimmed chunk outputs, in order -> one float32 `[sum of lengths]` signal at the model rate
    (RVC concatenates the synthesizer's float32 output; nothing is cross-faded)."""
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(c, dtype=np.float32) for c in chunks])


def chunk_output_length(chunk_len: int, tgt_sr: int, t_pad_tgt: int) -> int:
    """Samples one chunk of `chunk_len` input samples contributes to the output at `tgt_sr` Hz."""
    return max(synth_frames(chunk_len) * (tgt_sr // FRAMES_PER_S) - 2 * t_pad_tgt, 0)


def transpose_f0(f0: NDArray[np.floating], semitones: int) -> NDArray[np.floating]:
    """`f0 * 2**(semitones/12)` (a new array, same dtype; 0 = unvoiced stays 0). RVC multiplies in
    place, which corrupts its harvest cache; the result is otherwise identical."""
    return np.asarray(np.multiply(f0, 2 ** (semitones / 12)))


def f0_to_coarse(f0: NDArray[np.floating]) -> NDArray[np.int64]:
    """f0 Hz `[T]` -> coarse pitch ids int64 `[T]` in 1..255 (§3.4), 0 Hz (unvoiced) -> 1.

    `m = 1127 ln(1 + f0/700)`; where m > 0: `(m - mel_min) * 254 / (mel_max - mel_min) + 1`, stored back
    in f0's dtype; clamped to [1, 255]; rounded half to even. NaN (never produced by an extractor) -> 1."""
    f0 = np.asarray(f0)
    # in f0's dtype (float32 for fcpe, float64 otherwise), as RVC: the dtype decides rounding at .5
    mel: NDArray[np.floating] = 1127 * np.log(1 + f0 / 700)
    voiced = mel > 0
    mel[voiced] = (mel[voiced] - F0_MEL_MIN) * 254 / (F0_MEL_MAX - F0_MEL_MIN) + 1
    mel[~(mel > 1)] = 1  # also catches NaN
    mel[mel > N_COARSE] = N_COARSE
    return np.asarray(np.rint(mel), dtype=np.int64)


def pitch_tensors(f0: NDArray[np.floating], p_len: int) -> tuple[Tensor, Tensor]:
    """Transposed f0 Hz `[>= p_len]` -> (pitch int64 `[1, p_len]` coarse ids, pitchf float32 `[1, p_len]` Hz), CPU."""
    if len(f0) < p_len:
        raise ParameterError(f"f0 curve has {len(f0)} frames, the signal needs {p_len}")
    f0 = np.asarray(f0[:p_len])
    pitch = torch.from_numpy(f0_to_coarse(f0)).unsqueeze(0)
    pitchf = torch.from_numpy(f0.astype(np.float32)).unsqueeze(0)
    return pitch, pitchf


def upsample_features_x2(feats: Tensor) -> Tensor:
    """Content features `[B, F, C]` (20 ms frames) -> `[B, 2F, C]` (10 ms): every frame repeated twice.

    RVC's `F.interpolate(feats.permute(0, 2, 1), scale_factor=2).permute(0, 2, 1)` (mode "nearest"),
    kept as that non-contiguous view: the synthesizer's first layers round differently on another layout."""
    return F.interpolate(feats.permute(0, 2, 1), scale_factor=2).permute(0, 2, 1)


def align_pitch(feats: Tensor, pitch: Tensor, pitchf: Tensor, chunk_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cut features `[B, 2F, C]` and the chunk's pitch `[B, T]`/pitchf `[B, T]` to RVC's
    `p_len = min(chunk_len // 160, 2F)` frames (§3.7) -> (feats, pitch, pitchf), each `p_len` long."""
    p_len = min(chunk_len // HOP_16K, feats.shape[1])
    if pitch.shape[-1] < p_len or pitchf.shape[-1] < p_len:
        raise ParameterError(f"chunk has {pitch.shape[-1]} f0 frames, {p_len} needed")
    return feats[:, :p_len], pitch[..., :p_len], pitchf[..., :p_len]


def protect_features(feats: Tensor, feats0: Tensor, pitchf: Tensor, protect: float) -> Tensor:
    """RVC's consonant protection (§3.7): where `pitchf < 1` Hz, blend back toward the un-indexed features.

    `w = 1` where pitchf >= 1, else `protect`; result `feats * w + feats0 * (1 - w)` in feats0's dtype.
    feats/feats0 `[B, T, C]` (after `upsample_features_x2`, feats0 taken before the index blend),
    pitchf `[B, T]` Hz. `protect >= 0.5` turns it off: feats is returned unchanged."""
    if protect >= PROTECT_OFF:
        return feats
    t = feats.shape[1]
    feats0, pitchf = feats0[:, :t], pitchf[:, :t]
    w = pitchf.clone()
    w[pitchf > 0] = 1  # RVC's two masks, in its order: 0 < f0 < 1 ends at `protect`
    w[pitchf < 1] = protect
    w = w.unsqueeze(-1)
    return (feats * w + feats0 * (1 - w)).to(feats0.dtype)


def rms_envelope(y: NDArray[np.floating], sr: int) -> NDArray[np.float32]:
    """`librosa.feature.rms(y, frame_length=2*(sr//2), hop_length=sr//2)` (center, zero padding):
    float32 `[1 + len//hop]`. Squares are taken in float32 and each frame's mean is a float32
    contiguous reduction, as librosa's float32 path computes them."""
    hop = sr // 2
    frame = 2 * hop
    padded = np.pad(np.asarray(y), (frame // 2, frame // 2), mode="constant")
    n_frames = 1 + (len(padded) - frame) // hop
    out = np.empty(n_frames, dtype=np.float32)
    for k in range(n_frames):  # per frame: memory stays O(frame), not O(frames * frame)
        out[k] = np.mean(np.square(padded[k * hop : k * hop + frame], dtype=np.float32))
    return np.sqrt(out)


def change_rms(
    src: NDArray[np.floating], src_sr: int, out: NDArray[np.floating], out_sr: int, rate: float
) -> NDArray[np.float32]:
    """RVC's loudness mix (§3.9): give `out` the input's RMS envelope to the power `1 - rate`.

    src: filtered input without padding `[N]` at `src_sr`; out: assembled output `[M]` at `out_sr`.
    Envelopes: RMS over 1 s frames every 0.5 s (centred, zero-padded), linearly interpolated to M
    samples (torch, align_corners=False); `out * rms_src^(1-rate) * max(rms_out, 1e-6)^(rate-1)`.
    -> float32 `[M]`. `rate == 1` returns `out` as float32 unchanged (RVC skips the step)."""
    y = np.asarray(out, dtype=np.float32)
    if rate == 1:
        return y
    if not 0 <= rate <= 1:
        raise ParameterError(f"rms_mix_rate must be in [0, 1], got {rate}")
    size = len(y)
    r1 = F.interpolate(torch.from_numpy(rms_envelope(src, src_sr))[None, None], size=size, mode="linear").squeeze()
    r2 = F.interpolate(torch.from_numpy(rms_envelope(y, out_sr))[None, None], size=size, mode="linear").squeeze()
    r2 = torch.clamp(r2, min=1e-6)  # a silent output frame must not divide by zero
    # 0-dim float32 exponents, as RVC passes them: a python-float exponent takes other kernels
    # (sqrt for 0.5, ...) that can round differently in the last bit
    gain = (
        torch.pow(r1, torch.tensor(1 - rate, dtype=torch.float32))
        * torch.pow(r2, torch.tensor(rate - 1, dtype=torch.float32))
    ).numpy()
    return np.asarray(y * gain, dtype=np.float32)


def output_sr(tgt_sr: int, resample_sr: int) -> int:
    """RVC's output rate: `resample_sr` if it differs from `tgt_sr` and is >= 16000, else `tgt_sr`."""
    return resample_sr if resample_sr != tgt_sr and resample_sr >= SR_16K else tgt_sr
