"""RVC's training spectrograms (spec §4.4), in torch, without librosa.

`spectrogram`: reflect-pad `(n_fft - hop) / 2` each side, `stft(center=False)` with a periodic Hann window
of `win = n_fft`, magnitude `sqrt(re^2 + im^2 + 1e-6)`. `MelScale`: librosa's Slaney mel filterbank (Slaney
scale and area norm) times that magnitude, then `log(clamp(., 1e-5))`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rvc_lora.pipeline.f0.mel import mel_filterbank
from rvc_lora.train.pretrained import TrainParams

SPEC_EPS = 1e-6  # classic RVC (C); the later fork uses 2e-7
MEL_FLOOR = 1e-5  # classic RVC (C); the later fork uses 2e-6


def spectrogram(y: Tensor, n_fft: int, hop: int, win: int) -> Tensor:
    """Audio `[B, N]` (float32) -> linear magnitude `[B, n_fft // 2 + 1, N // hop]` (for even n_fft - hop)."""
    pad = (n_fft - hop) // 2
    y = F.pad(y.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    window = torch.hann_window(win, device=y.device, dtype=y.dtype)
    spec = torch.stft(y, n_fft, hop_length=hop, win_length=win, window=window, center=False, normalized=False,
                      onesided=True, return_complex=True)
    return torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + SPEC_EPS)


class MelScale(nn.Module):
    """Linear spectrogram -> log mel, and audio -> log mel, with one model's `TrainParams`."""

    basis: Tensor

    def __init__(self, params: TrainParams) -> None:
        super().__init__()
        self.params = params
        fmax = params.fmax if params.fmax is not None else params.sr / 2
        basis = mel_filterbank(sr=params.sr, n_fft=params.n_fft, n_mels=params.n_mels, fmin=params.fmin, fmax=fmax,
                               htk=False)
        self.register_buffer("basis", torch.from_numpy(basis), persistent=False)  # [n_mels, n_fft // 2 + 1]

    def spec_to_mel(self, spec: Tensor) -> Tensor:
        """`[B, n_fft // 2 + 1, T]` -> `[B, n_mels, T]`, natural log."""
        return torch.log(torch.clamp(torch.matmul(self.basis, spec), min=MEL_FLOOR))

    def forward(self, y: Tensor) -> Tensor:
        """Audio `[B, N]` -> log mel `[B, n_mels, N // hop]`."""
        p = self.params
        return self.spec_to_mel(spectrogram(y, p.n_fft, p.hop, p.win))
