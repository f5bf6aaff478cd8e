"""The realtime path's signal steps (spec §6.3, §6.5): sinc resampling, frame RMS, the noise gate, the RMS
mix, SOLA and the crossfade. Tensors are float32 `[N]` on the stream's device unless said otherwise."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor

LOWPASS_WIDTH = 6  # zero crossings each side of the windowed sinc
ROLLOFF = 0.99  # cut-off as a share of the lower Nyquist rate
DB_FLOOR = 1e-5  # amplitude of the -100 dB floor (librosa's amin)
TOP_DB = 80.0


class SincResampler:
    """Stateless windowed-sinc resampling (Hann window, 6 zero crossings, roll-off 0.99), kernel built in float32.

    The same arithmetic as the realtime GUI's resamplers: the rates are reduced by their gcd, the signal is
    zero-padded by the kernel width on the left and `width + orig` on the right, convolved with stride `orig`,
    and cut to `ceil(new * len / orig)` samples. Every call sees zero padding at both edges."""

    def __init__(self, orig_sr: int, new_sr: int, device: torch.device | str = "cpu") -> None:
        g = math.gcd(orig_sr, new_sr)
        self.orig, self.new = orig_sr // g, new_sr // g
        base = min(self.orig, self.new) * ROLLOFF
        self.width = math.ceil(LOWPASS_WIDTH * self.orig / base)
        f32 = torch.float32
        idx = torch.arange(-self.width, self.width + self.orig, dtype=f32, device=device)[None, None] / self.orig
        t = torch.arange(0, -self.new, -1, dtype=f32, device=device)[:, None, None] / self.new + idx
        t *= base
        t = t.clamp_(-LOWPASS_WIDTH, LOWPASS_WIDTH)  # [new, 1, 2 width + orig], in input-sample units * base
        window = torch.cos(t * math.pi / LOWPASS_WIDTH / 2) ** 2
        t *= math.pi
        kernel = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
        kernel *= window * (base / self.orig)
        self.kernel = kernel

    def __call__(self, x: Tensor) -> Tensor:
        """`[N]` -> `[ceil(N * new / orig)]`; identity when the rates are equal."""
        if self.orig == self.new:
            return x
        n = x.shape[-1]
        padded = F.pad(x.view(1, 1, n), (self.width, self.width + self.orig))
        out = F.conv1d(padded, self.kernel, stride=self.orig)  # [1, new, n // orig + 1]: phase-major
        out = out.transpose(1, 2).reshape(-1)
        return out[: math.ceil(self.new * n / self.orig)]


def frame_rms(y: NDArray[np.float32], frame: int, hop: int) -> NDArray[np.float32]:
    """RMS of centred frames (zero padding of `frame // 2` each side): float32 `[1 + len // hop]`,
    frame j centred at sample `j * hop` (librosa's `feature.rms` with `center=True`, constant padding)."""
    padded = np.pad(np.asarray(y, dtype=np.float32), frame // 2)
    windows = np.lib.stride_tricks.sliding_window_view(padded, frame)[::hop]  # [n, frame] views
    return np.asarray(np.sqrt(np.mean(np.abs(windows) ** 2, axis=-1, dtype=np.float32)), dtype=np.float32)


def amplitude_db(rms: NDArray[np.float32]) -> NDArray[np.float32]:
    """`20 log10(max(rms, 1e-5))`, floored at 80 dB below the loudest frame (reference amplitude 1)."""
    db = 20.0 * np.log10(np.maximum(DB_FLOOR, rms))
    return np.asarray(np.maximum(db, db.max() - TOP_DB), dtype=np.float32)


def noise_gate(block: NDArray[np.float32], rms_buffer: NDArray[np.float32], zc: int,
               threshold_db: float) -> NDArray[np.float32]:
    """The realtime gate (§6.5 step 2) on one raw block `[B]`, with `rms_buffer` the previous 4 zc raw samples
    (updated in place) -> `[B + 2 zc]`: the previous block's last 2 frames re-gated, then the new block.

    Frame i of the output is centred at sample `i * zc` and measures raw samples `[(i - 2) zc, (i + 2) zc)`;
    a sample is zeroed iff its nearest frame centre (ties to the later frame) is below `threshold_db`."""
    x = np.concatenate([rms_buffer, block])  # [4 zc + B]
    silent = amplitude_db(frame_rms(x, 4 * zc, zc)[2:]) < threshold_db  # [B / zc + 3]
    rms_buffer[:] = x[-4 * zc :]  # raw samples: the gate measures what came in, not what it let through
    out: NDArray[np.float32] = x[2 * zc - zc // 2 :].copy()  # frame i starts half a frame before its centre
    for i in np.flatnonzero(silent):
        out[i * zc : (i + 1) * zc] = 0
    return out[zc // 2 :]


def rms_mix(out: Tensor, reference: NDArray[np.float32], zc: int, rate: float) -> Tensor:
    """Give `out` `[L]` the loudness envelope of `reference` (the time-aligned input, `>= L` samples) to the
    power `1 - rate` (§6.5 step 9): per-sample envelopes interpolated from 4 zc frames every zc samples."""
    n = out.shape[0]

    def envelope(y: NDArray[np.float32]) -> Tensor:
        r = torch.from_numpy(frame_rms(y, 4 * zc, zc)).to(out.device)[None, None]  # [1, 1, L / zc + 1]
        return F.interpolate(r, size=n + 1, mode="linear", align_corners=True)[0, 0, :-1]

    r1 = envelope(reference[:n])
    r2 = torch.clamp(envelope(out.detach().cpu().numpy()), min=1e-3)
    return out * torch.pow(r1 / r2, torch.tensor(1 - rate))  # float32 0-dim exponent, as RVC passes it


def fade_windows(n: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(fade_in, fade_out) `[n]`: `sin^2` over `linspace(0, 1, n)` (both ends included), and `1 - fade_in`."""
    fade_in = torch.sin(0.5 * np.pi * torch.linspace(0.0, 1.0, steps=n, device=device, dtype=torch.float32)) ** 2
    return fade_in, 1 - fade_in


def sola_offset(chunk: Tensor, template: Tensor, search: int) -> int:
    """The start in `chunk` (0..search) where the next `len(template)` samples best match `template`:
    the first argmax of the cross-correlation over the chunk's local energy (`sqrt(sum x^2 + 1e-8)`)."""
    s = template.shape[0]
    x = chunk[None, None, : s + search]
    num = F.conv1d(x, template[None, None])
    den = torch.sqrt(F.conv1d(x**2, torch.ones(1, 1, s, device=x.device, dtype=x.dtype)) + 1e-8)
    return int(torch.argmax(num[0, 0] / den[0, 0]))
