"""The harmonic-plus-noise excitation of RVC's NSF decoder: SineGen and SourceModuleHnNSF.

Random draws are part of the contract (rvc_spec §1.4): SineGen takes one uniform (its random
initial phase, zeroed for the fundamental but still drawn) and then `[B, T*upp, 1]` normals, from
the default generator of the device, in that order. Changing either shifts every later sample.
Batched synthesis passes them in instead (`SineDraws`), drawn per row when the row was built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SineGenVariant = Literal["B", "A"]


@dataclass(frozen=True)
class SineDraws:
    """SineGen's random numbers, drawn beforehand: phase `[B, 1, dim]` uniform (the initial phase; the
    fundamental's is zeroed after the draw, as in a solo run), noise `[B, T*upp, dim]` standard normal."""

    phase: Tensor
    noise: Tensor


class SineGen(nn.Module):
    """f0 `[B, T]` Hz (0 = unvoiced), float32 -> excitation `[B, T*upp, dim]`, voiced mask, noise.

    Variant "B" (RVC branch 20240604, normative) accumulates phase per frame with a wrapped float32
    cumsum; variant "A" (tags <= 2.2.231006 and main HEAD) integrates per sample through a linear
    interpolation of the cumulative phase. They agree to ~1e-6 and draw the same numbers for B = 1.
    """

    def __init__(self, samp_rate: int, harmonic_num: int = 0, sine_amp: float = 0.1, noise_std: float = 0.003,
                 voiced_threshold: float = 0.0, variant: SineGenVariant = "B") -> None:
        super().__init__()
        self.sampling_rate = samp_rate
        self.dim = harmonic_num + 1
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.voiced_threshold = voiced_threshold
        self.variant: SineGenVariant = variant

    def _phase_b(self, f0: Tensor, upp: int, phase: Tensor | None) -> Tensor:
        """Phase in cycles `[B, T*upp, dim]`: per-frame ramps plus the wrapped running frame advance."""
        f = f0.unsqueeze(-1)  # [B, T, 1]
        ramp = torch.arange(1, upp + 1, dtype=f.dtype, device=f.device)
        rad = f / self.sampling_rate * ramp  # [B, T, upp]: (k+1) * f0[t] / sr
        advance = torch.fmod(rad[:, :-1, -1:].float() + 0.5, 1.0) - 0.5  # wrapped phase advance per frame
        acc = torch.fmod(advance.cumsum(dim=1), 1.0).to(f.dtype)
        rad = rad + F.pad(acc, (0, 0, 1, 0))  # first frame starts at phase 0 (+ its own ramp)
        rad = rad.reshape(f0.shape[0], -1, 1)  # [B, T*upp, 1], sample n = t*upp + k
        rad = rad * torch.arange(1, self.dim + 1, dtype=rad.dtype, device=rad.device)
        if phase is None:
            phase = torch.rand(1, 1, self.dim, device=rad.device)  # drawn for RNG parity, zero for the fundamental
        # out of place (phase may be a caller's tensor, or batched under torch.func.vmap)
        rand_ini = torch.cat([torch.zeros_like(phase[..., :1]), phase[..., 1:]], dim=-1)
        return rad + rand_ini

    def _sine_a(self, f0: Tensor, upp: int) -> Tensor:
        b, t = f0.shape
        fb = torch.zeros(b, t, self.dim, device=f0.device)
        fb[..., 0] = f0
        for i in range(1, self.dim):
            fb[..., i] = f0 * (i + 1)
        r = (fb / self.sampling_rate) % 1
        rand_ini = torch.rand(b, self.dim, device=f0.device)
        rand_ini[:, 0] = 0
        r[:, 0, :] = r[:, 0, :] + rand_ini
        cum = torch.cumsum(r, dim=1) * upp
        cum_up = F.interpolate(cum.transpose(2, 1), scale_factor=float(upp), mode="linear",
                               align_corners=True).transpose(2, 1) % 1
        r_up = F.interpolate(r.transpose(2, 1), scale_factor=float(upp), mode="nearest").transpose(2, 1)
        shift = torch.zeros_like(r_up)
        shift[:, 1:, :] = ((cum_up[:, 1:, :] - cum_up[:, :-1, :]) < 0).to(r_up.dtype) * -1.0
        return torch.sin(torch.cumsum(r_up + shift, dim=1) * 2 * torch.pi)

    @torch.no_grad()
    def forward(self, f0: Tensor, upp: int, draws: SineDraws | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """f0 `[B, T]` -> (excitation, uv, noise), each `[B, T*upp, dim]` (uv `[B, T*upp, 1]`).

        draws: the random numbers to use (variant "B" only) instead of drawing from the device's generator."""
        if self.variant == "B":
            sine = torch.sin(2 * np.pi * self._phase_b(f0, upp, None if draws is None else draws.phase)) * self.sine_amp
        else:
            if draws is not None:  # its interpolation spans the whole row: padding would change it
                raise ValueError("SineGen variant 'A' takes no pre-drawn numbers (batched synthesis needs 'B')")
            sine = self._sine_a(f0, upp) * self.sine_amp
        uv = (f0.unsqueeze(-1) > self.voiced_threshold).to(f0.dtype)  # [B, T, 1]
        uv = uv.repeat_interleave(upp, dim=1)  # nearest x upp
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        noise = noise_amp * (torch.randn_like(sine) if draws is None else draws.noise)
        return sine * uv + noise, uv, noise


class SourceModuleHnNSF(nn.Module):
    """Harmonic source: `tanh(l_linear(SineGen(f0)))`, `[B, T] -> [B, T*upp, 1]`."""

    def __init__(self, sampling_rate: int, harmonic_num: int = 0, sine_amp: float = 0.1,
                 add_noise_std: float = 0.003, voiced_threshold: float = 0.0,
                 variant: SineGenVariant = "B") -> None:
        super().__init__()
        self.l_sin_gen = SineGen(sampling_rate, harmonic_num, sine_amp, add_noise_std, voiced_threshold, variant)
        self.l_linear = nn.Linear(harmonic_num + 1, 1)
        self.l_tanh = nn.Tanh()

    def forward(self, f0: Tensor, upp: int, draws: SineDraws | None = None) -> Tensor:
        sine = self.l_sin_gen(f0, upp, draws)[0].to(self.l_linear.weight.dtype)  # SineGen stays fp32 in half mode
        out: Tensor = self.l_tanh(self.l_linear(sine))
        return out
