"""`fcpe`: the FCPE model that ships inside the `torchfcpe` package, called as RVC HEAD calls it
(`spawn_bundled_infer_model(device).infer(x[1, N], sr=16000, decoder_mode="local_argmax",
threshold=0.006)`).

Only the weight file is taken from the package: importing `torchfcpe` imports torchaudio, which does
not load beside every torch build, so the package is located with `importlib.util.find_spec` (which
does not run it) and the network is `FCPENet`. Install the package without its dependencies:
`pip install --no-deps torchfcpe==0.0.4`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor

from rvc_lora.errors import CheckpointError, ModelUnavailableError
from rvc_lora.frames import HOP_16K, SR_16K
from rvc_lora.pipeline.batching import run_grouped
from rvc_lora.pipeline.f0.base import INSTALL_HINTS, check_audio, fit_length, frame_count
from rvc_lora.pipeline.f0.fcpe_net import HIDDEN, N_BINS, N_LAYERS, N_MELS, FCPENet
from rvc_lora.pipeline.f0.mel import mel_filterbank

INSTALL_HINT = INSTALL_HINTS["torchfcpe"]
WEIGHTS_IN_PACKAGE = Path("assets") / "fcpe_c_v001.pt"
N_FFT = 1024
MEL_FMAX = 8000.0
LOG_FLOOR = 1e-5
MAG_EPS = 1e-9  # added under the square root of the STFT magnitude
THRESHOLD = 0.006  # RVC HEAD's value: frames whose peak latent is <= this are unvoiced
LOCAL_BINS = 4  # the decode averages argmax +- 4 bins (indices clamped at the ends)

# What the bundled file's config must say for FCPENet and this front end to be the right ones.
_EXPECTED_CONFIG: dict[str, dict[str, object]] = {
    "mel": {"sr": SR_16K, "num_mels": N_MELS, "n_fft": N_FFT, "win_size": N_FFT, "hop_size": HOP_16K, "fmin": 0,
            "fmax": 8000},
    "model": {
        "type": "CFNaiveMelPE",
        "out_dims": N_BINS,
        "hidden_dims": HIDDEN,
        "n_layers": N_LAYERS,
        "conv_only": True,
    },
}


def bundled_weights_path() -> Path:
    """Path of `fcpe_c_v001.pt` inside the installed `torchfcpe` package, found without importing it."""
    spec = importlib.util.find_spec("torchfcpe")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / WEIGHTS_IN_PACKAGE
        if path.is_file():
            return path
    raise ModelUnavailableError(
        f"f0_method 'fcpe' needs the FCPE weights shipped in the torchfcpe package; install it with `{INSTALL_HINT}`"
    )


def decode_latent(latent: Tensor, cent_table: Tensor, threshold: float = THRESHOLD) -> Tensor:
    """Latent `[B, T, 360]` -> f0 Hz `[B, T]`: the latent-weighted mean of `cent_table` over the 9
    bins around the argmax (indices clamped to 0..359, so an edge bin counts more than once),
    `10 * 2**(cents / 1200)`; frames whose peak is <= `threshold` are 0."""
    peak_value, peak = torch.max(latent, dim=-1, keepdim=True)  # [B, T, 1]
    offsets = torch.arange(-LOCAL_BINS, LOCAL_BINS + 1, device=latent.device)
    window = (peak + offsets).clamp(0, latent.shape[-1] - 1)  # [B, T, 9]
    weights = torch.gather(latent, -1, window)
    cents = torch.sum(cent_table[window] * weights, dim=-1, keepdim=True) / torch.sum(weights, dim=-1, keepdim=True)
    cents = cents.masked_fill(peak_value <= threshold, float("-inf"))  # 2**-inf = 0 Hz; also covers 0/0
    return (10.0 * 2 ** (cents / 1200.0)).squeeze(-1)


class FCPEPitch:
    """FCPE's mel front end (128 Slaney mels 0-8000 Hz, 1024-point STFT every 160 samples, no
    centring but 432 samples of reflect padding each side) + `FCPENet` + local-argmax decode."""

    name = "fcpe"

    def __init__(self, net: FCPENet, *, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).float().eval()
        basis = mel_filterbank(sr=SR_16K, n_fft=N_FFT, n_mels=N_MELS, fmin=0.0, fmax=MEL_FMAX, htk=False)
        self.mel_basis = torch.from_numpy(basis).to(self.device)  # [128, 513]
        self.window = torch.hann_window(N_FFT).to(self.device)

    @classmethod
    def from_bundled(cls, *, device: str = "cpu") -> FCPEPitch:
        """Load the weights that ship in `torchfcpe` (`ModelUnavailableError` if it is not installed)."""
        return cls.from_file(bundled_weights_path(), device=device)

    @classmethod
    def from_file(cls, path: Path, *, device: str = "cpu") -> FCPEPitch:
        """Load a torchfcpe checkpoint (`{"model": state dict, "config_dict": ...}`) of the bundled kind."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and weights_only errors all mean: not a usable file
            raise CheckpointError(f"{path}: cannot be read as a weights-only torch file: {exc}") from exc
        _check_config(path, ckpt)
        with torch.device("meta"):  # no random init: nothing drawn from torch's global generator
            net = FCPENet()
        try:
            net.load_state_dict(ckpt["model"], assign=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: FCPE weights do not fit the bundled model's layout: {exc}") from exc
        return cls(net, device=device)

    def log_mel(self, audio16k: NDArray[np.floating]) -> Tensor:
        """`[N]` (or `[B, N]`) -> log-mel `[1, N // 160 + 1, 128]` (`[B, ...]`) float32."""
        x = torch.tensor(audio16k, dtype=torch.float32, device=self.device)
        x = x.unsqueeze(0) if x.dim() == 1 else x  # [B, N]
        n = x.shape[-1]
        left = (N_FFT - HOP_16K) // 2
        right = max((N_FFT - HOP_16K + 1) // 2, N_FFT - n - left)  # a signal shorter than a window still gets one
        x = F.pad(x.unsqueeze(1), (left, right), mode="reflect" if right < n else "constant").squeeze(1)
        spec = torch.stft(
            x, N_FFT, hop_length=HOP_16K, win_length=N_FFT, window=self.window, center=False, return_complex=True
        )
        mag = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + MAG_EPS)  # [1, 513, T']
        mel = torch.log(torch.clamp(torch.matmul(self.mel_basis, mag), min=LOG_FLOOR)).transpose(1, 2)
        n_frames = frame_count(n)
        if mel.shape[1] < n_frames:  # T' = N // 160: the last frame is repeated once
            mel = torch.cat((mel, mel[:, -1:]), dim=1)
        return mel[:, :n_frames]

    def __call__(self, audio16k: NDArray[np.floating], p_len: int, *, filter_radius: int = 3) -> NDArray[np.float32]:
        return self._f0(check_audio(audio16k)[None], [p_len])[0]

    def batch(self, audios: Sequence[NDArray[np.floating]], p_lens: Sequence[int], *,
              filter_radius: int = 3) -> list[NDArray[np.float32]]:
        """`__call__` for several inputs, those of equal length in one forward (`rvc_lora.pipeline.batching`)."""
        checked = [check_audio(a) for a in audios]

        def run(group: list[int]) -> list[NDArray[np.float32]]:
            return self._f0(np.stack([checked[i] for i in group]), [p_lens[i] for i in group])

        return run_grouped(list(range(len(checked))), [len(a) for a in checked], run)

    def _f0(self, audio16k: NDArray[np.floating], p_lens: Sequence[int]) -> list[NDArray[np.float32]]:
        """`[B, N]` -> each row's f0, fit to its `p_lens` entry."""
        with torch.inference_mode():
            latent = self.net(self.log_mel(audio16k))  # [B, T, 360]
            f0 = decode_latent(latent, self.net.cent_table).cpu().numpy()
        return [fit_length(np.asarray(row, dtype=np.float32), n) for row, n in zip(f0, p_lens, strict=True)]


def _check_config(path: Path, ckpt: Any) -> None:
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config_dict" not in ckpt:
        raise CheckpointError(f"{path}: expected a torchfcpe checkpoint with 'model' and 'config_dict'")
    config = ckpt["config_dict"]
    for section, wanted in _EXPECTED_CONFIG.items():
        got = {k: config.get(section, {}).get(k) for k in wanted}
        if got != wanted:
            raise CheckpointError(f"{path}: FCPE config {section} is {got}, this loader supports {wanted}")
