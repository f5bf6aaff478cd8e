"""Small pieces shared by the synthesizer modules: LayerNorm over channels, masks, weight norm."""

from __future__ import annotations

import warnings
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LRELU_SLOPE = 0.1  # every LeakyReLU in RVC except the one before dec.conv_post (torch default 0.01)

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    """'Same' padding of a stride-1 conv: (k*d - d) / 2, truncated as RVC does."""
    return int((kernel_size * dilation - dilation) / 2)


def weight_norm(module: ModuleT) -> ModuleT:
    """Old-API weight norm (dim 0), whose `weight_g`/`weight_v` names are what RVC checkpoints hold.

    The parametrizations API would rename the keys to `parametrizations.weight.original0/1`, so the
    deprecated function is used on purpose; its FutureWarning is noise for our users.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(module)


def remove_weight_norm(module: nn.Module) -> None:
    """Fuse `weight_g`/`weight_v` into a plain `weight` (no-op when the module has no weight norm)."""
    for hook in list(module._forward_pre_hooks.values()):
        if type(hook).__name__ == "WeightNorm":
            torch.nn.utils.remove_weight_norm(module)
            return


def sequence_mask(lengths: Tensor, max_length: int) -> Tensor:
    """lengths `[B]` -> bool mask `[B, T]`, True where t < length (RVC builds it in lengths' dtype)."""
    positions = torch.arange(max_length, dtype=lengths.dtype, device=lengths.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)


class LayerNorm(nn.Module):
    """LayerNorm over the channel axis of `[B, C, T]`; parameters are named `gamma`/`beta` as in RVC."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        """`[B, C, T] -> [B, C, T]`, normalised per (b, t) over C."""
        x = x.transpose(1, -1)
        x = F.layer_norm(x, (self.channels,), self.gamma, self.beta, self.eps)
        return x.transpose(1, -1)


def gated_activation(x_in: Tensor, cond: Tensor, n_channels: int) -> Tensor:
    """WaveNet gate: `tanh(a[:, :n]) * sigmoid(a[:, n:])` with `a = x_in + cond`; `[B, 2n, T] -> [B, n, T]`."""
    a = x_in + cond
    return torch.tanh(a[:, :n_channels]) * torch.sigmoid(a[:, n_channels:])


def slice_segments(x: Tensor, ids_start: Tensor, segment_size: int) -> Tensor:
    """Per-batch time slices: x `[B, C, T]` (or `[B, T]`), ids `[B]` -> `[B, C, segment_size]` (or `[B, seg]`)."""
    return torch.stack([x[i, ..., int(s) : int(s) + segment_size] for i, s in enumerate(ids_start)])


def rand_slice_segments(x: Tensor, lengths: Tensor, segment_size: int) -> tuple[Tensor, Tensor]:
    """RVC's training crop: one `torch.rand([B])` on the CPU generator, ids = floor(u * (len - seg + 1))."""
    ids_max = lengths - segment_size + 1
    ids = (torch.rand([x.size(0)]).to(device=x.device) * ids_max).to(dtype=torch.long)
    return slice_segments(x, ids, segment_size), ids
