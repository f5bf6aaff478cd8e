"""`rmvpe`: RVC's recommended extractor. Log-mel front end, `RMVPENet`, local-average cents decode.

The weights are RVC's `rmvpe.pt` (a plain state dict), read from a path the caller gives; nothing is
downloaded. Numbers follow RVC: 128 HTK mels 30-8000 Hz over a centred 1024-point STFT every 160
samples, the mel image zero-padded to a multiple of 32 frames, salience threshold 0.03.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor

from rvc_lora.errors import CheckpointError, ModelUnavailableError
from rvc_lora.frames import HOP_16K, SR_16K
from rvc_lora.pipeline.batching import run_grouped
from rvc_lora.pipeline.f0.base import RMVPE_HINT, check_audio, fit_length
from rvc_lora.pipeline.f0.mel import mel_filterbank
from rvc_lora.pipeline.f0.rmvpe_net import N_BINS, N_MELS, STAGES, RMVPENet

N_FFT = 1024
MEL_FMIN = 30.0
MEL_FMAX = 8000.0
LOG_FLOOR = 1e-5
THRESHOLD = 0.03  # salience at or below this: unvoiced
CENTS_BASE = 1997.3794084376191  # cents (re 10 Hz) of bin 0; bins are 20 cents apart
CENTS_PER_BIN = 20
LOCAL_BINS = 4  # the decode averages argmax +- 4 bins

CENTS_MAP = CENTS_PER_BIN * np.arange(N_BINS) + CENTS_BASE  # [360] float64


def decode_salience(salience: NDArray[np.floating], threshold: float = THRESHOLD) -> NDArray[np.float64]:
    """Salience `[T, 360]` -> f0 Hz `[T]` (float64): the salience-weighted mean of the cents of the 9
    bins around each frame's argmax (bins past either end count as zero), `10 * 2**(cents / 1200)`;
    frames whose peak is <= `threshold` are 0."""
    sal = np.asarray(salience, dtype=np.float32)
    peak = np.argmax(sal, axis=1)  # [T], on the unpadded bins
    sal = np.pad(sal, ((0, 0), (LOCAL_BINS, LOCAL_BINS)))  # [T, 368]
    cents_map = np.pad(CENTS_MAP, (LOCAL_BINS, LOCAL_BINS))  # [368]
    window = peak[:, None] + np.arange(2 * LOCAL_BINS + 1)  # [T, 9]: bins peak-4 .. peak+4 in padded coords
    local = np.take_along_axis(sal, window, axis=1)  # [T, 9] float32
    with np.errstate(invalid="ignore", divide="ignore"):  # an all-zero frame gives 0/0, masked just below
        cents = np.sum(local * cents_map[window], axis=1) / np.sum(local, axis=1)
    cents[np.max(sal, axis=1) <= threshold] = 0.0
    f0 = 10 * 2 ** (cents / 1200)
    f0[f0 == 10] = 0.0  # cents 0 is the unvoiced marker
    return np.asarray(f0, dtype=np.float64)


class RMVPEPitch:
    """Mel front end + `RMVPENet` on one device; fp16 network when `is_half` (RVC on CUDA)."""

    name = "rmvpe"

    def __init__(self, net: RMVPENet, *, device: str = "cpu", is_half: bool = False) -> None:
        self.device = torch.device(device)
        self.is_half = is_half
        net = net.to(self.device).eval()
        self.net = net.half() if is_half else net.float()
        basis = mel_filterbank(sr=SR_16K, n_fft=N_FFT, n_mels=N_MELS, fmin=MEL_FMIN, fmax=MEL_FMAX, htk=True)
        self.mel_basis = torch.from_numpy(basis).to(self.device)  # [128, 513] float32
        self.window = torch.hann_window(N_FFT).to(self.device)  # periodic

    @classmethod
    def from_file(cls, path: str | Path | None, *, device: str = "cpu", is_half: bool = False) -> RMVPEPitch:
        """Build from RVC's `rmvpe.pt`; `ModelUnavailableError` if there is no such file."""
        with torch.device("meta"):  # no random init: nothing drawn from torch's global generator
            net = RMVPENet()
        net.load_state_dict(load_rmvpe_state_dict(path, net), assign=True)
        return cls(net, device=device, is_half=is_half)

    def log_mel(self, audio16k: NDArray[np.floating]) -> Tensor:
        """`[N]` (or `[B, N]`) -> log-mel `[1, 128, N // 160 + 1]` (`[B, ...]`; fp16 when `is_half`, as RVC casts
        before the log)."""
        x = torch.tensor(audio16k, dtype=torch.float32, device=self.device)
        x = x.unsqueeze(0) if x.dim() == 1 else x  # [B, N]
        spec = torch.stft(
            x, N_FFT, hop_length=HOP_16K, win_length=N_FFT, window=self.window, center=True, return_complex=True
        )  # [1, 513, T], reflect-padded by 512 each side
        mel = torch.matmul(self.mel_basis, torch.sqrt(spec.real.pow(2) + spec.imag.pow(2)))
        if self.is_half:
            mel = mel.half()
        return torch.log(torch.clamp(mel, min=LOG_FLOOR))

    def salience(self, audio16k: NDArray[np.floating]) -> NDArray[np.float32]:
        """`[N]` -> salience `[N // 160 + 1, 360]` float32."""
        return np.asarray(self._salience(check_audio(audio16k)[None])[0], dtype=np.float32)

    def batch(self, audios: Sequence[NDArray[np.floating]], p_lens: Sequence[int], *,
              filter_radius: int = 3) -> list[NDArray[np.float64]]:
        """`__call__` for several inputs, those of equal length in one forward (`rvc_lora.pipeline.batching`)."""
        checked = [check_audio(a) for a in audios]

        def run(group: list[int]) -> list[NDArray[np.float64]]:
            sal = self._salience(np.stack([checked[i] for i in group]))
            return [fit_length(decode_salience(s), p_lens[i]) for s, i in zip(sal, group, strict=True)]

        return run_grouped(list(range(len(checked))), [len(a) for a in checked], run)

    def _salience(self, audio16k: NDArray[np.floating]) -> NDArray[np.float32]:
        """`[B, N]` -> salience `[B, N // 160 + 1, 360]` float32."""
        with torch.inference_mode():
            mel = self.log_mel(audio16k)
            n_frames = mel.shape[-1]
            multiple = 1 << STAGES  # the U-Net halves T five times
            n_pad = multiple * ((n_frames - 1) // multiple + 1) - n_frames
            if n_pad > 0:
                mel = F.pad(mel, (0, n_pad), mode="constant")  # zeros in the log domain, as RVC pads
            mel = mel.half() if self.is_half else mel.float()
            hidden = self.net(mel)[:, :n_frames]  # [B, T, 360]
        return np.asarray(hidden.float().cpu().numpy(), dtype=np.float32)

    def __call__(self, audio16k: NDArray[np.floating], p_len: int, *, filter_radius: int = 3) -> NDArray[np.float64]:
        return fit_length(decode_salience(self.salience(audio16k)), p_len)


def load_rmvpe_state_dict(path: str | Path | None, net: RMVPENet) -> dict[str, Tensor]:
    """Read `rmvpe.pt` safely (`weights_only=True`) and check its keys and shapes against `net`."""
    if path is None:
        raise ModelUnavailableError(RMVPE_HINT)
    path = Path(path)
    if not path.is_file():
        raise ModelUnavailableError(f"rmvpe.pt {str(path)!r}: no such file (set by --rmvpe or RVC_LORA_RMVPE; "
                                    "`rvc-lora models fetch` downloads it)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors all mean: not a usable rmvpe.pt
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch file: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected RMVPE's plain state dict of tensors, got {type(state).__name__}")
    expected = net.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshaped = [k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        raise CheckpointError(
            f"{path}: not an RMVPE state dict: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(misshaped)} misshaped {sorted(misshaped)[:3]}"
        )
    return state
