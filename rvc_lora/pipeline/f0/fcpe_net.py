"""The FCPE network as `torchfcpe`'s bundled model (`fcpe_c_v001.pt`) is configured: conv-only
conformer, so no attention. Module names follow the file's keys so its `model` state dict loads
strictly: `input_stack.*`, `net.encoder_layers.{i}.*`, `norm.*`, `output_proj.*`, `cent_table`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

N_MELS = 128
HIDDEN = 512
N_LAYERS = 6
N_BINS = 360
DW_KERNEL = 31  # depthwise conv of each layer, "same" padding
EXPANSION = 2  # the pointwise conv widens to 2 * EXPANSION * HIDDEN, GLU halves it


class DepthwiseConv(nn.Module):
    """One filter per channel; the wrapper exists for the key `conv`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, DW_KERNEL, padding=DW_KERNEL // 2, groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv(x)
        return out


class ConvModule(nn.Module):
    """LayerNorm -> 1x1 conv -> GLU -> depthwise conv -> SiLU -> 1x1 conv, over `[B, T, C]`.
    Keys `net.{0,2,4,6}`: the file's layout keeps parameter-free steps at the odd indices."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        inner = dim * EXPANSION
        self.net = nn.ModuleDict(
            {
                "0": nn.LayerNorm(dim),
                "2": nn.Conv1d(dim, 2 * inner, 1),
                "4": DepthwiseConv(inner),
                "6": nn.Conv1d(inner, dim, 1),
            }
        )

    def forward(self, x: Tensor) -> Tensor:
        """`[B, T, C] -> [B, T, C]`."""
        h = self.net["0"](x).transpose(1, 2)  # [B, C, T]
        h = F.glu(self.net["2"](h), dim=1)  # [B, inner, T]
        h = F.silu(self.net["4"](h))
        out: Tensor = self.net["6"](h)
        return out.transpose(1, 2)


class EncoderLayer(nn.Module):
    """`x + conformer(x)`. `norm` is the pre-attention LayerNorm of the attention variant: this
    model has no attention, but the file carries the tensors, so it exists to load strictly."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conformer = ConvModule(dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conformer(x)
        return x + out


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder_layers = nn.ModuleList([EncoderLayer(HIDDEN) for _ in range(N_LAYERS)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.encoder_layers:
            x = layer(x)
        return x


class WeightNormLinear(nn.Module):
    """Linear layer stored as weight norm over rows (`weight_g [out, 1]`, `weight_v [out, in]`)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(cout, 1))
        self.weight_v = nn.Parameter(torch.empty(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x: Tensor) -> Tensor:
        # torch's own weight-norm kernel: the same float rounding as the model was run with
        return F.linear(x, torch._weight_norm(self.weight_v, self.weight_g, 0), self.bias)


class FCPENet(nn.Module):
    """log-mel `[B, T, 128]` -> pitch latent `[B, T, 360]` in (0, 1); `cent_table [360]` gives each
    bin's cents re 10 Hz (stored in the file)."""

    def __init__(self) -> None:
        super().__init__()
        self.input_stack = nn.Sequential(
            nn.Conv1d(N_MELS, HIDDEN, 3, padding=1),
            nn.GroupNorm(4, HIDDEN),
            nn.LeakyReLU(),
            nn.Conv1d(HIDDEN, HIDDEN, 3, padding=1),
        )
        self.net = Encoder()
        self.norm = nn.LayerNorm(HIDDEN)
        self.output_proj = WeightNormLinear(HIDDEN, N_BINS)
        self.cent_table: Tensor
        self.register_buffer("cent_table", torch.zeros(N_BINS))
        self.register_buffer("gaussian_blurred_cent_mask", torch.zeros(()))  # training-only, kept to load strictly

    def forward(self, mel: Tensor) -> Tensor:
        x = self.input_stack(mel.transpose(1, 2)).transpose(1, 2)  # [B, T, 512]
        x = self.norm(self.net(x))
        return torch.sigmoid(self.output_proj(x))
