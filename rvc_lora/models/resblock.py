"""HiFi-GAN residual blocks as RVC uses them: weight-normed dilated convs, LeakyReLU 0.1."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from rvc_lora.convs import Conv1d
from rvc_lora.models.commons import LRELU_SLOPE, get_padding, remove_weight_norm, weight_norm


def _dilated_convs(channels: int, kernel_size: int, dilations: Sequence[int]) -> nn.ModuleList:
    return nn.ModuleList(
        weight_norm(Conv1d(channels, channels, kernel_size, dilation=d, padding=get_padding(kernel_size, d)))
        for d in dilations)


class ResBlock1(nn.Module):
    """Three paths (dilations d0, d1, d2), each a dilated conv then a dilation-1 conv, added to the input."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: Sequence[int] = (1, 3, 5)) -> None:
        super().__init__()
        if len(dilation) != 3:
            raise ValueError(f"ResBlock1 takes 3 dilations, got {tuple(dilation)}")
        self.convs1 = _dilated_convs(channels, kernel_size, dilation)
        self.convs2 = _dilated_convs(channels, kernel_size, (1, 1, 1))

    def forward(self, x: Tensor, x_mask: Tensor | None = None) -> Tensor:
        """`[B, C, T] -> [B, C, T]`; with a mask `[B, 1, T]`, activations are masked before every conv."""
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            t = F.leaky_relu(x, LRELU_SLOPE)
            if x_mask is not None:
                t = t * x_mask
            t = F.leaky_relu(c1(t), LRELU_SLOPE)
            if x_mask is not None:
                t = t * x_mask
            x = c2(t) + x
        return x if x_mask is None else x * x_mask

    def remove_weight_norm(self) -> None:
        for conv in (*self.convs1, *self.convs2):
            remove_weight_norm(conv)


class ResBlock2(nn.Module):
    """Two paths (dilations d0, d1), each one dilated conv added to the input."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: Sequence[int] = (1, 3)) -> None:
        super().__init__()
        if len(dilation) < 2:
            raise ValueError(f"ResBlock2 takes 2 dilations, got {tuple(dilation)}")
        # RVC's configs list 3 dilations per kernel even for ResBlock2, which uses only the first two
        self.convs = _dilated_convs(channels, kernel_size, tuple(dilation)[:2])

    def forward(self, x: Tensor, x_mask: Tensor | None = None) -> Tensor:
        """`[B, C, T] -> [B, C, T]`."""
        for conv in self.convs:
            t = F.leaky_relu(x, LRELU_SLOPE)
            if x_mask is not None:
                t = t * x_mask
            x = conv(t) + x
        return x if x_mask is None else x * x_mask

    def remove_weight_norm(self) -> None:
        for conv in self.convs:
            remove_weight_norm(conv)


def make_resblock(kind: str, channels: int, kernel_size: int, dilation: Sequence[int]) -> nn.Module:
    """RVC's rule: resblock "1" is ResBlock1, anything else ResBlock2."""
    return (ResBlock1 if kind == "1" else ResBlock2)(channels, kernel_size, dilation)
