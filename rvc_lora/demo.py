"""Deterministic demo material: speech-like test signals (and, in `write_demo_assets`, demo models)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def speech_like(duration_s: float, sr: int = 16000, *, seed: int = 0, f0_hz: float = 140.0,
                gaps: bool = True) -> NDArray[np.float32]:
    """A voiced-sounding test signal: harmonics of a gliding f0 (vibrato + slow contour), a formant-like
    spectral tilt, syllable-rate amplitude envelope, short silences and a little breath noise.

    Deterministic for a given seed; peak about 0.5.
    """
    rng = np.random.default_rng(seed)
    n = int(round(duration_s * sr))
    t = np.arange(n) / sr
    contour = f0_hz * (1 + 0.15 * np.sin(2 * np.pi * 0.4 * t + rng.uniform(0, 6)) + 0.02 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(contour) / sr
    voice = np.zeros(n)
    for k in range(1, 16):
        if k * f0_hz * 1.2 > sr / 2:
            break
        voice += np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k**1.2
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, 6)) ** 2
    if gaps:  # a pause of ~0.25 s every ~1.5 s: unvoiced frames and quiet cut points
        period, gap = int(1.5 * sr), int(0.25 * sr)
        for start in range(period - gap, n, period):
            envelope[start : start + gap] = 0.0
    signal = voice * envelope + 0.003 * rng.standard_normal(n)
    return (0.5 * signal / max(np.max(np.abs(signal)), 1e-9)).astype(np.float32)
