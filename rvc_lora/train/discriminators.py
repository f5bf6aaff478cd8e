"""RVC's multi-period discriminators (spec §4.6), with its state-dict keys so `f0D40k.pth` loads strictly.

`MultiPeriodDiscriminator("v1")`: one 1-D scale discriminator + periods 2, 3, 5, 7, 11, 17;
`"v2"` (v2 models, 40k included) adds periods 23 and 37. Every conv is weight-normed (`weight_g`/
`weight_v`), LeakyReLU 0.1 after each but `conv_post`. Channel widths are parameters so tests can use
a narrow copy; `discriminator_from_state_dict` reads them (and the version) back from a file's shapes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rvc_lora.checkpoint import rename_parametrizations, torch_load_checked
from rvc_lora.errors import CheckpointError
from rvc_lora.models.commons import LRELU_SLOPE, weight_norm

PERIODS = {"v1": (2, 3, 5, 7, 11, 17), "v2": (2, 3, 5, 7, 11, 17, 23, 37)}
S_CHANNELS = (16, 64, 256, 1024, 1024, 1024)
S_GROUPS = (1, 4, 16, 64, 256, 1)
S_KERNELS = (15, 41, 41, 41, 41, 5)
S_STRIDES = (1, 4, 4, 4, 4, 1)
P_CHANNELS = (32, 128, 512, 1024, 1024)

DiscriminatorOutput = tuple[list[Tensor], list[Tensor], list[list[Tensor]], list[list[Tensor]]]


class DiscriminatorS(nn.Module):
    """The 1-D scale discriminator: audio `[B, 1, T]` -> (scores `[B, T']`, feature maps)."""

    def __init__(self, channels: Sequence[int] = S_CHANNELS, groups: Sequence[int] = S_GROUPS) -> None:
        super().__init__()
        ins = (1, *channels[:-1])
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv1d(i, o, k, s, groups=g, padding=k // 2))
            for i, o, k, s, g in zip(ins, channels, S_KERNELS, S_STRIDES, groups, strict=True))
        self.conv_post = weight_norm(nn.Conv1d(channels[-1], 1, 3, 1, padding=1))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        fmap = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            fmap.append(x)
        x = self.conv_post(x)
        fmap.append(x)
        return torch.flatten(x, 1, -1), fmap


class DiscriminatorP(nn.Module):
    """Period-p discriminator: audio `[B, 1, T]` folded to `[B, 1, T/p, p]` (reflect-padded to a multiple
    of p), 2-D convs with (5, 1) kernels -> (scores `[B, T']`, feature maps)."""

    def __init__(self, period: int, channels: Sequence[int] = P_CHANNELS) -> None:
        super().__init__()
        self.period = period
        ins = (1, *channels[:-1])
        strides = (3,) * (len(channels) - 1) + (1,)
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(i, o, (5, 1), (s, 1), padding=(2, 0)))
            for i, o, s in zip(ins, channels, strides, strict=True))
        self.conv_post = weight_norm(nn.Conv2d(channels[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        b, c, t = x.shape
        if t % self.period:
            pad = self.period - t % self.period
            x = F.pad(x, (0, pad), "reflect")
            t += pad
        x = x.view(b, c, t // self.period, self.period)
        fmap = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            fmap.append(x)
        x = self.conv_post(x)
        fmap.append(x)
        return torch.flatten(x, 1, -1), fmap


def narrow(channels: Sequence[int], groups: Sequence[int] | None, div: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Channels divided by `div` (at least 1), groups cut to what still divides both sides (tests' copies)."""
    chans = tuple(max(c // div, 1) for c in channels)
    ins = (1, *chans[:-1])
    gs = tuple(math.gcd(g, i, o) for g, i, o in zip(groups or (1,) * len(chans), ins, chans, strict=True))
    return chans, gs


class MultiPeriodDiscriminator(nn.Module):
    """`discriminators.0` is the scale discriminator, `discriminators.{1..}` the period ones (RVC's keys)."""

    def __init__(self, version: str = "v2", *, width_div: int = 1, s_channels: Sequence[int] | None = None,
                 s_groups: Sequence[int] | None = None, p_channels: Sequence[int] | None = None) -> None:
        super().__init__()
        if version not in PERIODS:
            raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
        self.version = version
        sc, sg = narrow(s_channels or S_CHANNELS, s_groups or S_GROUPS, 1 if s_channels else width_div)
        pc, _ = narrow(p_channels or P_CHANNELS, None, 1 if p_channels else width_div)
        self.discriminators = nn.ModuleList(
            [DiscriminatorS(sc, sg), *(DiscriminatorP(p, pc) for p in PERIODS[version])])

    def forward(self, y: Tensor, y_hat: Tensor) -> DiscriminatorOutput:
        """Real `y` and generated `y_hat` `[B, 1, T]` -> (real scores, fake scores, real fmaps, fake fmaps)."""
        real, fake, fmap_real, fmap_fake = [], [], [], []
        for d in self.discriminators:
            r, fr = d(y)
            g, fg = d(y_hat)
            real.append(r)
            fake.append(g)
            fmap_real.append(fr)
            fmap_fake.append(fg)
        return real, fake, fmap_real, fmap_fake


def discriminator_from_state_dict(state: Mapping[str, Tensor], source: str = "state dict") -> MultiPeriodDiscriminator:
    """Build the discriminator whose layout `state` has (v1: 7 sub-discriminators, v2: 9; widths from the
    `weight_v` shapes) and load it strictly. Raises `CheckpointError` naming `source` when it does not fit."""
    state = rename_parametrizations(state)
    count = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("discriminators.")), default=-1)
    version = next((v for v, periods in PERIODS.items() if len(periods) + 1 == count), None)
    if version is None:
        raise CheckpointError(f"{source}: {count} sub-discriminators; RVC's have 7 (v1) or 9 (v2)")
    try:
        s_channels = [int(state[f"discriminators.0.convs.{j}.weight_v"].shape[0]) for j in range(len(S_CHANNELS))]
        s_ins = [1, *s_channels[:-1]]
        s_groups = [i // int(state[f"discriminators.0.convs.{j}.weight_v"].shape[1]) for j, i in enumerate(s_ins)]
        p_channels = [int(state[f"discriminators.1.convs.{j}.weight_v"].shape[0]) for j in range(len(P_CHANNELS))]
        model = MultiPeriodDiscriminator(version, s_channels=s_channels, s_groups=s_groups, p_channels=p_channels)
        model.load_state_dict(dict(state), strict=True)
    except (KeyError, RuntimeError, ValueError, ZeroDivisionError) as exc:
        raise CheckpointError(f"{source}: not an RVC multi-period discriminator: {str(exc).splitlines()[0]}") from exc
    return model


def load_discriminator(path: str | os.PathLike[str]) -> MultiPeriodDiscriminator:
    """Read a pretrained discriminator (`f0D40k.pth`: `{"model": state_dict}`) strictly, fp32."""
    path = Path(path)
    cpt = torch_load_checked(path, allow_unsafe_pickle=False)
    state = cpt.get("model") if isinstance(cpt, Mapping) else None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected {{'model': state_dict}} (RVC's pretrained D*.pth layout)")
    model = discriminator_from_state_dict({k: v.float() for k, v in state.items()}, str(path))
    return model
