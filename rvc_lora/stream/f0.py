"""Pitch in the realtime path (spec §6.5 step 6d, §6.6): f0 of the newest window only, and the f0 cache.

Each block estimates f0 over the newest `block + 50 ms` of the 16 kHz history (rmvpe: a multiple of its
chunk) and writes frames 3 .. n-2 of that window into the end of a 1024-frame cache, after shifting the
cache by one block. Older frames keep the value estimated when they were near the end of a window."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import parselmouth
import pyworld
import scipy.signal
import torch
from numpy.typing import NDArray
from torch import Tensor

from rvc_lora.frames import HOP_16K, SR_16K
from rvc_lora.pipeline.f0 import F0_MAX, F0_MIN, get_f0_extractor
from rvc_lora.pipeline.f0.pm import TIME_STEP_S, VOICING_THRESHOLD
from rvc_lora.pipeline.steps import F0_MEL_MAX, F0_MEL_MIN, N_COARSE

CACHE_FRAMES = 1024  # covers the largest history (5 s extra + 0.15 + 0.01 + 1.5 s block = 666 frames)
EDGE_FRAMES = 3  # leading window frames dropped as edge-affected
PM_FLOOR = 65.0  # realtime pm's pitch floor (offline uses 50 Hz)
PM_PAD = math.ceil(1.5 / PM_FLOOR * SR_16K)  # 370: Praat's first frame lands on sample 0 of the window


def realtime_pm(x: NDArray[np.float32]) -> NDArray[np.float64]:
    """Praat pitch of a window `[N]` -> Hz `[N // 160 + 1]`, frame j centred at sample 160 j (0 = unvoiced)."""
    n = x.shape[0] // HOP_16K + 1
    sound = parselmouth.Sound(np.pad(x, (PM_PAD, PM_PAD + 1)), SR_16K)
    pitch = sound.to_pitch_ac(time_step=TIME_STEP_S, voicing_threshold=VOICING_THRESHOLD, pitch_floor=PM_FLOOR,
                              pitch_ceiling=F0_MAX)
    f0 = np.asarray(pitch.selected_array["frequency"], dtype=np.float64)
    if len(f0) < n:
        f0 = np.pad(f0, (0, n - len(f0)))
    return f0[:n]


def realtime_harvest(x: NDArray[np.float32]) -> NDArray[np.float64]:
    """Harvest of a window (one process, no StoneMask refinement), then a 3-tap median filter."""
    f0, _ = pyworld.harvest(x.astype(np.float64), fs=SR_16K, f0_ceil=F0_MAX, f0_floor=F0_MIN, frame_period=10)
    return np.asarray(scipy.signal.medfilt(f0, 3), dtype=np.float64)


def window_f0(x: NDArray[np.float32], method: str, semitones: float, *, device: str = "cpu",
              rmvpe_path: Path | None = None, is_half: bool = False) -> NDArray[np.floating]:
    """f0 of one window `[N]` at 16 kHz, transposed by `semitones` -> Hz `[N // 160 + 1]`.

    pm and harvest use the realtime settings; rmvpe and fcpe run the offline extractors on the window."""
    n = x.shape[0] // HOP_16K + 1
    f0: NDArray[np.floating]
    if method == "pm":
        f0 = realtime_pm(x)
    elif method == "harvest":
        f0 = realtime_harvest(x)
    else:
        f0 = get_f0_extractor(method, device=device, rmvpe_path=rmvpe_path, is_half=is_half)(x, n)
    return np.asarray(f0[:n] * 2 ** (semitones / 12), dtype=f0.dtype)


def coarse_pitch(f0: Tensor) -> Tensor:
    """f0 Hz `[n]` float32 -> coarse ids int64 `[n]` in 1..255 (the offline mel formula, in float32 torch)."""
    mel = 1127 * torch.log(1 + f0 / 700)
    voiced = mel > 0
    mel[voiced] = (mel[voiced] - float(F0_MEL_MIN)) * 254 / float(F0_MEL_MAX - F0_MEL_MIN) + 1
    mel[mel <= 1] = 1
    mel[mel > N_COARSE] = N_COARSE
    return torch.round(mel).long()


class F0Cache:
    """The last `CACHE_FRAMES` frames of coarse pitch (int64, 0 = never written) and f0 Hz (float32)."""

    def __init__(self, device: torch.device) -> None:
        self.pitch = torch.zeros(CACHE_FRAMES, dtype=torch.long, device=device)
        self.pitchf = torch.zeros(CACHE_FRAMES, dtype=torch.float32, device=device)

    def reset(self) -> None:
        self.pitch.zero_()
        self.pitchf.zero_()

    def push(self, f0: NDArray[np.floating], shift: int) -> None:
        """Shift by `shift` frames, then write window frames `3 .. n-2` of `f0` `[n]` into the last `n - 4` slots."""
        pitchf = torch.from_numpy(np.asarray(f0)).to(self.pitchf.device).float().squeeze()
        pitch = coarse_pitch(pitchf.clone())
        self.pitch[:-shift] = self.pitch[shift:].clone()  # overlapping ranges: copy through a clone
        self.pitchf[:-shift] = self.pitchf[shift:].clone()
        n = pitch.shape[0]
        self.pitch[EDGE_FRAMES + 1 - n :] = pitch[EDGE_FRAMES:-1]
        self.pitchf[EDGE_FRAMES + 1 - n :] = pitchf[EDGE_FRAMES:-1]
