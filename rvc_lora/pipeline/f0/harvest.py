"""`harvest`: WORLD's Harvest + StoneMask refinement (pyworld), then RVC's optional median filter."""

from __future__ import annotations

import numpy as np
import pyworld
import scipy.signal
from numpy.typing import NDArray

from rvc_lora.frames import HOP_16K, SR_16K
from rvc_lora.pipeline.f0.base import F0_MAX, F0_MIN, check_audio, fit_length

FRAME_PERIOD_MS = HOP_16K / SR_16K * 1000  # 10 ms


class HarvestPitch:
    """RVC's harvest path, without its per-path `lru_cache` (which served stale, doubly transposed f0).

    `filter_radius > 2` switches on a 3-tap median filter; RVC never uses the value as a radius."""

    name = "harvest"

    def __call__(self, audio16k: NDArray[np.floating], p_len: int, *, filter_radius: int = 3) -> NDArray[np.float64]:
        audio = np.ascontiguousarray(check_audio(audio16k), dtype=np.float64)
        f0, times = pyworld.harvest(audio, fs=SR_16K, f0_ceil=F0_MAX, f0_floor=F0_MIN, frame_period=FRAME_PERIOD_MS)
        f0 = pyworld.stonemask(audio, f0, times, SR_16K)
        if filter_radius > 2:
            f0 = scipy.signal.medfilt(f0, 3)
        return fit_length(np.asarray(f0, dtype=np.float64), p_len)
