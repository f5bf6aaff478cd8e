"""The normalising flow (`flow`): four mean-only affine coupling layers interleaved with channel flips."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rvc_lora.models.encoders import WN


class ResidualCouplingLayer(nn.Module):
    """Mean-only coupling: the second half is shifted by a WN prediction from the first half."""

    def __init__(self, channels: int, hidden_channels: int, kernel_size: int, dilation_rate: int, n_layers: int,
                 p_dropout: float = 0.0, gin_channels: int = 0) -> None:
        super().__init__()
        self.half_channels = channels // 2
        self.pre = nn.Conv1d(self.half_channels, hidden_channels, 1)
        self.enc = WN(hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels, p_dropout)
        self.post = nn.Conv1d(hidden_channels, self.half_channels, 1)
        nn.init.zeros_(self.post.weight)  # identity flow at initialisation (matters for training only)
        nn.init.zeros_(self.post.bias)  # type: ignore[arg-type]

    def forward(self, x: Tensor, x_mask: Tensor, g: Tensor | None = None, reverse: bool = False) -> Tensor:
        """x `[B, C, T]` -> `[B, C, T]`; reverse undoes forward."""
        x0, x1 = torch.split(x, [self.half_channels] * 2, dim=1)
        h = self.enc(self.pre(x0) * x_mask, x_mask, g)
        m = self.post(h) * x_mask
        x1 = (x1 - m) * x_mask if reverse else m + x1 * x_mask  # logs = 0: exp(+-logs) is exactly 1
        return torch.cat([x0, x1], dim=1)

    def remove_weight_norm(self) -> None:
        self.enc.remove_weight_norm()


class Flip(nn.Module):
    """Reverses the channel order; its own inverse. No parameters (so keys skip its list index)."""

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        return torch.flip(x, [1])


class ResidualCouplingBlock(nn.Module):
    """`flows = [C0, Flip, C1, Flip, ...]`; keys `flow.flows.{0,2,4,6}.*`. Inference runs it in reverse."""

    def __init__(self, channels: int, hidden_channels: int, kernel_size: int, dilation_rate: int, n_layers: int,
                 n_flows: int = 4, gin_channels: int = 0) -> None:
        super().__init__()
        self.flows = nn.ModuleList()
        for _ in range(n_flows):
            self.flows.append(ResidualCouplingLayer(channels, hidden_channels, kernel_size, dilation_rate, n_layers,
                                                    gin_channels=gin_channels))
            self.flows.append(Flip())

    def forward(self, x: Tensor, x_mask: Tensor, g: Tensor | None = None, reverse: bool = False) -> Tensor:
        """`[B, C, T] -> [B, C, T]`."""
        flows = reversed(self.flows) if reverse else iter(self.flows)
        for flow in flows:
            x = flow(x, x_mask, g=g, reverse=reverse)
        return x

    def remove_weight_norm(self) -> None:
        for flow in self.flows[::2]:
            flow.remove_weight_norm()  # type: ignore[operator]
