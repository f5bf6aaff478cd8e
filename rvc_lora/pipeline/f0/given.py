"""RVC's "f0 file": a caller's `time_s,f0_hz` table laid over the extracted f0 (spec §3.4).

RVC parses the table to float32, interpolates it onto frames `0 .. round((t_max - t_min) * 100)`
(`np.interp` at the table's times * 100, so a table that starts after 0 s is held at its first value
and does not reach its last time), and writes that curve over the extracted, already transposed f0
from frame `x_pad * 100` on (right after the padding context), cut at the end of the signal. Frames the
curve does not reach keep the extracted f0; the file's values are not transposed. Unlike RVC, an
unreadable file raises `ParameterError` instead of being skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

from rvc_lora.errors import ParameterError
from rvc_lora.frames import FRAMES_PER_S


def f0_curve_from_table(table: ArrayLike) -> NDArray[np.float64]:
    """`[n, 2]` rows of (time s, f0 Hz), times non-decreasing -> RVC's replacement curve, float64
    `[round((t_max - t_min) * 100 + 1)]`: `np.interp(frame, times * 100, f0)` for frame = 0, 1, ...

    Times and values are rounded to float32 first and the frame count is formed in float32, as RVC
    holds the table in a float32 array."""
    rows = np.asarray(table, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != 2 or len(rows) == 0:
        raise ParameterError(f"f0 table must have rows of (time_s, f0_hz), got shape {rows.shape}")
    if not np.isfinite(rows).all() or (rows[:, 1] < 0).any() or (np.diff(rows[:, 0]) < 0).any():
        raise ParameterError("f0 table times must be non-decreasing, f0 values finite and >= 0 Hz")
    rows32 = rows.astype(np.float32)
    times, hz = rows32[:, 0], rows32[:, 1]
    n_frames = int(np.round((times.max() - times.min()) * FRAMES_PER_S + 1))  # float32 arithmetic
    return np.interp(np.arange(n_frames), times * FRAMES_PER_S, hz)


def read_f0_file(path: str | os.PathLike[str]) -> NDArray[np.float64]:
    """RVC's f0 file: one `time_s,f0_hz` pair per line (blank lines skipped) -> `f0_curve_from_table`."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        rows = [[float(v) for v in line.split(",")] for line in lines]
    except (OSError, ValueError) as exc:
        raise ParameterError(f"f0 file {str(path)!r}: cannot be read as 'time_s,f0_hz' lines: {exc}") from exc
    if not rows or any(len(r) != 2 for r in rows):
        raise ParameterError(f"f0 file {str(path)!r}: every line must be 'time_s,f0_hz'")
    return f0_curve_from_table(rows)


def overlay_f0(f0: NDArray[np.floating], curve: ArrayLike, offset_frames: int) -> NDArray[np.floating]:
    """Extracted (transposed) f0 `[T]` -> a copy with `curve` written over frames
    `offset_frames .. offset_frames + len(curve)`, cut at T; same dtype as `f0` (RVC's slice assignment).

    The converter passes `offset_frames = t_pad // 160` (RVC's `x_pad * 100`)."""
    values = np.asarray(curve, dtype=np.float64)
    if values.ndim != 1:
        raise ParameterError(f"f0 curve must be 1-D (Hz per 10 ms frame), got shape {values.shape}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ParameterError("f0 curve values must be finite and >= 0 Hz (0 = unvoiced)")
    if offset_frames < 0:
        raise ParameterError(f"offset_frames must be >= 0, got {offset_frames}")
    out = np.array(f0, copy=True)
    window = out[offset_frames : offset_frames + len(values)]
    window[:] = values[: len(window)]
    return out
