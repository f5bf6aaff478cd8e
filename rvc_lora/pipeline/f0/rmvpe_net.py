"""The RMVPE network (deep U-Net on the log-mel image, then a BiGRU head) with the module names that
make `rmvpe.pt`'s state dict load strictly: `unet.{encoder,intermediate,decoder}.*`, `cnn.*`, `fc.*`.

Fixed configuration, as RVC builds it: 4 residual blocks per stage, 5 encoder/decoder stages
(16 -> 256 channels, 2x2 average pooling), 4 intermediate stages at 512 channels, one BiGRU layer.
Every BatchNorm has momentum 0.01 (only training would notice).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

N_MELS = 128
N_BINS = 360  # 20-cent pitch bins
BLOCKS_PER_STAGE = 4
STAGES = 5  # encoder pools and decoder upsamplings: T must be a multiple of 2**5 = 32
INTER_STAGES = 4
BASE_CHANNELS = 16
GRU_HIDDEN = 256
BN_MOMENTUM = 0.01


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)


class ConvBlockRes(nn.Module):
    """Two 3x3 conv-BN-ReLU layers plus a residual path (1x1 conv with bias when channels change).
    Keys: `conv.{0,3}.weight`, `conv.{1,4}.*` (BN), `shortcut.{weight,bias}`."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv3x3(cin, cout), _bn(cout), nn.ReLU(), _conv3x3(cout, cout), _bn(cout), nn.ReLU())
        self.shortcut = nn.Conv2d(cin, cout, kernel_size=1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        """`[B, cin, T, F] -> [B, cout, T, F]`."""
        residual: Tensor = x if self.shortcut is None else self.shortcut(x)
        out: Tensor = self.conv(x)
        return out + residual


def _res_blocks(cin: int, cout: int) -> nn.ModuleList:
    """`BLOCKS_PER_STAGE` ConvBlockRes, the first one changing `cin` to `cout`."""
    return nn.ModuleList([ConvBlockRes(cin if i == 0 else cout, cout) for i in range(BLOCKS_PER_STAGE)])


class ResStack(nn.Module):
    """A stage of residual blocks under the key `conv.{i}`."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = _res_blocks(cin, cout)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.conv:
            x = block(x)
        return x


class Encoder(nn.Module):
    """Input BatchNorm, then stages of ResStack + 2x2 average pool; keeps each pre-pool map as a skip."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = _bn(1)
        widths = [1] + [BASE_CHANNELS << i for i in range(STAGES)]  # 1, 16, 32, 64, 128, 256
        self.layers = nn.ModuleList([ResStack(widths[i], widths[i + 1]) for i in range(STAGES)])
        self.pool = nn.AvgPool2d(kernel_size=2)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """`[B, 1, T, 128] -> ([B, 256, T/32, 4], skips [B, 16 << i, T/2**i, 128/2**i])`."""
        skips = []
        x = self.bn(x)
        for stage in self.layers:
            x = stage(x)
            skips.append(x)
            x = self.pool(x)
        return x, skips


class Intermediate(nn.Module):
    """`INTER_STAGES` ResStacks at the bottom of the U, 256 -> 512 channels, no pooling."""

    def __init__(self) -> None:
        super().__init__()
        cin = BASE_CHANNELS << (STAGES - 1)  # 256
        self.layers = nn.ModuleList([ResStack(cin if i == 0 else 2 * cin, 2 * cin) for i in range(INTER_STAGES)])

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.layers:
            x = stage(x)
        return x


class DecoderStage(nn.Module):
    """2x transposed-conv upsampling (`conv1`: ConvTranspose-BN-ReLU), concat the skip, ResStack (`conv2`)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        up = nn.ConvTranspose2d(cin, cout, kernel_size=3, stride=2, padding=1, output_padding=1, bias=False)
        self.conv1 = nn.Sequential(up, _bn(cout), nn.ReLU())
        self.conv2 = _res_blocks(2 * cout, cout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """`[B, cin, T, F]`, skip `[B, cout, 2T, 2F]` -> `[B, cout, 2T, 2F]`."""
        x = torch.cat((self.conv1(x), skip), dim=1)
        for block in self.conv2:
            x = block(x)
        return x


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        top = BASE_CHANNELS << STAGES  # 512
        self.layers = nn.ModuleList([DecoderStage(top >> i, top >> (i + 1)) for i in range(STAGES)])

    def forward(self, x: Tensor, skips: list[Tensor]) -> Tensor:
        for stage, skip in zip(self.layers, reversed(skips), strict=True):
            x = stage(x, skip)
        return x


class DeepUnet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.intermediate = Intermediate()
        self.decoder = Decoder()

    def forward(self, x: Tensor) -> Tensor:
        """`[B, 1, T, 128] -> [B, 16, T, 128]`."""
        x, skips = self.encoder(x)
        out: Tensor = self.decoder(self.intermediate(x), skips)
        return out


class BiGRU(nn.Module):
    """Attribute `gru` so the keys read `fc.0.gru.*`."""

    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, num_layers=1, batch_first=True, bidirectional=True)

    def forward(self, x: Tensor) -> Tensor:
        """`[B, T, features] -> [B, T, 2 * hidden]`."""
        out: Tensor = self.gru(x)[0]
        return out


class RMVPENet(nn.Module):
    """log-mel `[B, 128, T]` (T a multiple of 32) -> pitch salience `[B, T, 360]` in (0, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = DeepUnet()
        self.cnn = nn.Conv2d(BASE_CHANNELS, 3, kernel_size=3, padding=1)
        self.fc = nn.Sequential(
            BiGRU(3 * N_MELS, GRU_HIDDEN), nn.Linear(2 * GRU_HIDDEN, N_BINS), nn.Dropout(0.25), nn.Sigmoid()
        )

    def forward(self, mel: Tensor) -> Tensor:
        x = mel.transpose(-1, -2).unsqueeze(1)  # [B, 1, T, 128]
        x = self.cnn(self.unet(x))  # [B, 3, T, 128]
        x = x.transpose(1, 2).flatten(-2)  # [B, T, 384]: channel-major per frame, as trained
        salience: Tensor = self.fc(x)
        return salience
