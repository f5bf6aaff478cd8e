"""`pm`: Praat's autocorrelation pitch (parselmouth), RVC's parameters and centring pad."""

from __future__ import annotations

import numpy as np
import parselmouth
from numpy.typing import NDArray

from rvc_lora.frames import HOP_16K, SR_16K
from rvc_lora.pipeline.f0.base import F0_MAX, F0_MIN, check_audio, fit_length

TIME_STEP_S = HOP_16K / SR_16K  # 0.01 s, the same float as RVC's `160 / 16000 * 1000 / 1000`
VOICING_THRESHOLD = 0.6


def praat_pad(n_frames: int, p_len: int) -> tuple[int, int]:
    """Zero frames RVC adds (left, right) to centre Praat's shorter curve in `p_len` frames."""
    missing = p_len - n_frames
    if missing <= 0:  # RVC pads nothing; the caller's `[:p_len]` cuts any surplus
        return 0, 0
    left = (missing + 1) // 2  # the odd frame goes left
    return left, missing - left


class PraatPitch:
    """`to_pitch_ac(time_step=0.01, voicing_threshold=0.6, pitch_floor=50, pitch_ceiling=1100)`;
    Praat's other parameters stay at their defaults, as in RVC."""

    name = "pm"

    def __call__(self, audio16k: NDArray[np.floating], p_len: int, *, filter_radius: int = 3) -> NDArray[np.float64]:
        audio = check_audio(audio16k)
        pitch = parselmouth.Sound(audio.astype(np.float64), SR_16K).to_pitch_ac(
            time_step=TIME_STEP_S, voicing_threshold=VOICING_THRESHOLD, pitch_floor=F0_MIN, pitch_ceiling=F0_MAX
        )
        f0 = np.asarray(pitch.selected_array["frequency"], dtype=np.float64)  # Praat's frames, 0 = unvoiced
        left, right = praat_pad(len(f0), p_len)
        if left or right:
            f0 = np.pad(f0, (left, right))
        return fit_length(f0, p_len)
