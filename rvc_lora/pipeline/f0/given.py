"""An f0 curve supplied by the caller instead of extracted from the audio.

RVC's own route for this is its "f0 file" (`time_s,f0_hz` lines), which it interpolates onto frames
`0 .. (t_max - t_min) * 100` whatever `t_min` is, and whose read errors it ignores. Here the table's
times are taken as what they say (seconds from the start of the input), errors are raised, and the
curve replaces the extracted one; `f0_up_key` still transposes it like any extracted curve.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

from rvc_lora.errors import ParameterError
from rvc_lora.pipeline.f0.base import HOP, SR, check_audio, fit_length

FRAMES_PER_S = SR // HOP  # 100


class GivenF0:
    """Returns `f0_hz` (Hz per 10 ms frame of the unpadded input, 0 = unvoiced) on the padded grid:
    frame i of the curve lands on frame `offset_frames + i` (the converter passes `t_pad // 160`);
    frames the curve does not cover are unvoiced."""

    name = "given"

    def __init__(self, f0_hz: ArrayLike, *, offset_frames: int = 0) -> None:
        curve = np.asarray(f0_hz, dtype=np.float64)
        if curve.ndim != 1:
            raise ParameterError(f"f0 curve must be 1-D (Hz per 10 ms frame), got shape {curve.shape}")
        if not np.isfinite(curve).all() or (curve < 0).any():
            raise ParameterError("f0 curve values must be finite and >= 0 Hz (0 = unvoiced)")
        if offset_frames < 0:
            raise ParameterError(f"offset_frames must be >= 0, got {offset_frames}")
        self.f0_hz = curve
        self.offset_frames = offset_frames

    def __call__(self, audio16k: NDArray[np.floating], p_len: int, *, filter_radius: int = 3) -> NDArray[np.float64]:
        check_audio(audio16k)
        placed = np.concatenate([np.zeros(self.offset_frames), self.f0_hz])
        return np.asarray(fit_length(placed, p_len), dtype=np.float64)


def f0_curve_from_table(table: ArrayLike) -> NDArray[np.float64]:
    """`[n, 2]` rows of (time s, f0 Hz), times increasing -> Hz per 10 ms frame from 0 s to the last
    time, linearly interpolated (held constant before the first time)."""
    rows = np.asarray(table, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != 2 or len(rows) == 0:
        raise ParameterError(f"f0 table must have rows of (time_s, f0_hz), got shape {rows.shape}")
    times, hz = rows[:, 0], rows[:, 1]
    if not np.isfinite(rows).all() or (times < 0).any() or (hz < 0).any() or (np.diff(times) <= 0).any():
        raise ParameterError("f0 table times must be >= 0 and strictly increasing, f0 values finite and >= 0")
    frames = np.arange(int(round(times[-1] * FRAMES_PER_S)) + 1)
    return np.asarray(np.interp(frames, times * FRAMES_PER_S, hz), dtype=np.float64)


def read_f0_file(path: str | Path) -> NDArray[np.float64]:
    """RVC's f0 file: one `time_s,f0_hz` pair per line -> the per-frame curve of `f0_curve_from_table`."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        rows = [[float(v) for v in line.split(",")] for line in lines]
    except (OSError, ValueError) as exc:
        raise ParameterError(f"f0 file {str(path)!r}: cannot be read as 'time_s,f0_hz' lines: {exc}") from exc
    if any(len(r) != 2 for r in rows):
        raise ParameterError(f"f0 file {str(path)!r}: every line must be 'time_s,f0_hz'")
    return f0_curve_from_table(rows)
