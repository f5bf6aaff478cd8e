"""Mel filterbanks as `librosa.filters.mel` builds them (slaney area norm), without librosa.

RMVPE asks for the HTK mel scale (`htk=True`), FCPE for librosa's default Slaney scale. Both networks
were trained on these exact matrices, so the float32 rounding steps are reproduced too: each
triangle is stored as float32, then scaled by the float64 area norm and rounded to float32 again.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

# Slaney scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
_SLANEY_HZ_PER_MEL = 200.0 / 3
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL  # 15
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel(hz: NDArray[np.float64], *, htk: bool) -> NDArray[np.float64]:
    """Frequencies in Hz -> mel, on the HTK or the Slaney scale."""
    hz = np.asarray(hz, dtype=np.float64)
    if htk:
        return np.asarray(2595.0 * np.log10(1.0 + hz / 700.0))
    mel = hz / _SLANEY_HZ_PER_MEL
    high = hz >= _SLANEY_BREAK_HZ
    mel = np.where(
        high, _SLANEY_BREAK_MEL + np.log(np.maximum(hz, _SLANEY_BREAK_HZ) / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP, mel
    )
    return np.asarray(mel)


def mel_to_hz(mel: NDArray[np.float64], *, htk: bool) -> NDArray[np.float64]:
    """Inverse of `hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    if htk:
        return np.asarray(700.0 * (10.0 ** (mel / 2595.0) - 1.0))
    hz = mel * _SLANEY_HZ_PER_MEL
    high = mel >= _SLANEY_BREAK_MEL
    hz = np.where(high, _SLANEY_BREAK_HZ * np.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_BREAK_MEL)), hz)
    return np.asarray(hz)


def mel_filterbank(*, sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float, htk: bool) -> NDArray[np.float32]:
    """`[n_mels, n_fft // 2 + 1]` float32 triangles, each scaled to unit area in Hz (slaney norm)."""
    bins_hz = np.fft.rfftfreq(n_fft, d=1.0 / sr)  # [F]
    edges_mel = np.linspace(hz_to_mel(np.float64(fmin), htk=htk), hz_to_mel(np.float64(fmax), htk=htk), n_mels + 2)
    edges_hz = mel_to_hz(edges_mel, htk=htk)  # [n_mels + 2]: left, centre, right of every triangle
    widths = np.diff(edges_hz)
    dist = edges_hz[:, None] - bins_hz[None, :]  # [n_mels + 2, F]
    rising = -dist[:-2] / widths[:-1, None]
    falling = dist[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    area = 2.0 / (edges_hz[2:] - edges_hz[:-2])  # float64, as librosa scales its float32 matrix in place
    return (weights * area[:, None]).astype(np.float32)
