"""How close one rendering of a voice is to another: log-mel distance and f0/voicing agreement.

Used to compare an adapter (base + LoRA) with the full voice it was extracted from, on the same input and
noise (`benchmarks/bench_fidelity.py`). The waveform SNR lives with extraction (`rvc_lora.extract.snr_db`).

    log_mel_distance(reference, estimate, sr)  # dB; 0 for identical signals, 6.02 for a copy at twice the gain
    f0_agreement(f0_ref, f0_est)               # voicing agreement, median |cents| and gross-error share
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from rvc_lora.errors import ParameterError
from rvc_lora.pipeline.f0.mel import mel_filterbank

MEL_N_FFT = 2048
MEL_HOP = 512
MEL_BANDS = 80
FLOOR_DB = 80.0  # power below the reference's peak by more than this is clamped (silence does not dominate)
GROSS_CENTS = 50.0  # an f0 error over half a semitone counts as a gross error


def _mono(x: ArrayLike, name: str) -> NDArray[np.float64]:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or not np.isfinite(a).all():
        raise ParameterError(f"{name}: expected a non-empty finite 1-d signal, got shape {a.shape}")
    return a


def log_mel_power_db(audio: NDArray[np.float64], sr: int, n_fft: int = MEL_N_FFT, hop: int = MEL_HOP,
                     n_mels: int = MEL_BANDS) -> NDArray[np.float64]:
    """Audio `[N]` -> mel power in dB `[n_mels, frames]` (Hann window, centred frames, Slaney mel bands up to sr/2)."""
    x = torch.from_numpy(audio)
    spec = torch.stft(x, n_fft, hop_length=hop, window=torch.hann_window(n_fft, dtype=x.dtype), center=True,
                      pad_mode="constant", return_complex=True).abs().square()  # [F, frames]
    basis = torch.from_numpy(mel_filterbank(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=sr / 2, htk=False))
    power: NDArray[np.float64] = (basis.double() @ spec).numpy()
    return 10 * np.log10(np.maximum(power, 1e-30))


def log_mel_distance(reference: ArrayLike, estimate: ArrayLike, sr: int, *, n_fft: int = MEL_N_FFT,
                     hop: int = MEL_HOP, n_mels: int = MEL_BANDS) -> float:
    """Log-mel spectral distance in dB: per frame, the RMS over mel bands of the dB difference, averaged over
    frames. Both are floored `FLOOR_DB` below the reference's loudest band (so that near-silent bands, whose
    dB values are arbitrary, count little). Signals of different length are compared over the shorter one.

    reference, estimate: `[N]` audio at `sr`. A copy scaled by g is `|20 log10 g|` dB away (above the floor)."""
    ref, est = _mono(reference, "reference"), _mono(estimate, "estimate")
    n = min(len(ref), len(est))
    a, b = (log_mel_power_db(s[:n], sr, n_fft, hop, n_mels) for s in (ref, est))
    floor = float(a.max()) - FLOOR_DB
    diff = np.maximum(a, floor) - np.maximum(b, floor)  # [n_mels, frames]
    return float(np.sqrt(np.mean(diff**2, axis=0)).mean())


@dataclass(frozen=True)
class F0Agreement:
    """voicing: share of frames where both agree on voiced vs unvoiced; cents: median |1200 log2(est/ref)| over
    frames voiced in both (nan if none); gross: share of those frames off by more than `GROSS_CENTS`;
    both_voiced: how many frames that is."""

    voicing: float
    cents: float
    gross: float
    both_voiced: int


def f0_agreement(f0_ref: ArrayLike, f0_est: ArrayLike) -> F0Agreement:
    """Compare two f0 tracks `[frames]` in Hz on the same frame grid (0 or less: unvoiced); the longer is cut."""
    ref, est = _mono(f0_ref, "f0_ref"), _mono(f0_est, "f0_est")
    n = min(len(ref), len(est))
    ref, est = ref[:n], est[:n]
    v_ref, v_est = ref > 0, est > 0
    both = v_ref & v_est
    cents = np.abs(1200 * np.log2(est[both] / ref[both]))
    return F0Agreement(voicing=float(np.mean(v_ref == v_est)),
                       cents=float(np.median(cents)) if cents.size else math.nan,
                       gross=float(np.mean(cents > GROSS_CENTS)) if cents.size else math.nan,
                       both_voiced=int(both.sum()))
