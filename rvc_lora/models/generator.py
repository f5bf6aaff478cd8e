"""The decoders (`dec`): HiFi-GAN `Generator` (no-f0 models) and the harmonic-source `GeneratorNSF`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rvc_lora.convs import Conv1d, ConvTranspose1d
from rvc_lora.models.commons import LRELU_SLOPE, remove_weight_norm, weight_norm
from rvc_lora.models.nsf import SineDraws, SineGenVariant, SourceModuleHnNSF
from rvc_lora.models.resblock import make_resblock


class _Masks:
    """Zeroes a padded batch past each row's end at a given resolution (samples per frame); a no-op
    without lengths, so a solo run pays nothing."""

    def __init__(self, lengths: Tensor | None) -> None:
        self.lengths = lengths

    def of(self, x: Tensor, scale: int) -> Tensor | None:
        """The `[B, 1, T]` mask of `x` `[B, C, T]` at `scale` samples per frame, or None."""
        if self.lengths is None:
            return None
        positions = torch.arange(x.shape[-1], device=x.device)
        return (positions < (self.lengths * scale).unsqueeze(-1)).unsqueeze(1).to(x.dtype)

    def __call__(self, x: Tensor, scale: int) -> Tensor:
        m = self.of(x, scale)
        return x if m is None else x * m


class Generator(nn.Module):
    """z `[B, C_in, T]` (+ speaker g `[B, gin, 1]`) -> audio `[B, 1, T * prod(upsample_rates)]` in (-1, 1).

    Attribute names mirror RVC's `dec.*` keys: `conv_pre`, `ups.{i}`, `resblocks.{i*K+j}`, `conv_post`, `cond`.
    """

    def __init__(self, initial_channel: int, resblock: str, resblock_kernel_sizes: Sequence[int],
                 resblock_dilation_sizes: Sequence[Sequence[int]], upsample_rates: Sequence[int],
                 upsample_initial_channel: int, upsample_kernel_sizes: Sequence[int], gin_channels: int = 0) -> None:
        super().__init__()
        self.num_kernels = len(resblock_kernel_sizes)
        self.num_upsamples = len(upsample_rates)
        self.upp = math.prod(upsample_rates)
        self.ups_rates = tuple(upsample_rates)
        ch = upsample_initial_channel
        self.conv_pre = Conv1d(initial_channel, ch, 7, 1, padding=3)
        self.ups = nn.ModuleList(
            weight_norm(ConvTranspose1d(ch >> i, ch >> (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes, strict=True)))
        self.resblocks = nn.ModuleList(
            make_resblock(resblock, ch >> (i + 1), k, d)
            for i in range(self.num_upsamples)
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes, strict=True))
        self.conv_post = Conv1d(ch >> self.num_upsamples, 1, 7, 1, padding=3, bias=False)
        if gin_channels:
            self.cond = nn.Conv1d(gin_channels, ch, 1)

    def _excitation(self, i: int, har: Tensor | None) -> Tensor | float:
        return 0.0

    def _stages(self, x: Tensor, g: Tensor | None, har: Tensor | None, lengths: Tensor | None = None) -> Tensor:
        """lengths `[B]`: valid frames per row of a padded batch (None: every frame is valid). The decoder has
        no masks of its own, so each conv input is zeroed past its row's end, at each resolution: every valid
        sample then sees the zero padding a row run alone sees, and nothing of its neighbours' padding."""
        mask = _Masks(lengths)
        if har is not None:
            har = mask(har, self.upp)
        x = self.conv_pre(mask(x, 1))
        if g is not None:
            x = x + self.cond(g)
        scale = 1
        for i, up in enumerate(self.ups):
            x = up(mask(F.leaky_relu(x, LRELU_SLOPE), scale))
            scale *= self.ups_rates[i]
            x = x + self._excitation(i, har)
            x_mask = mask.of(x, scale)
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            xs = blocks[0](x, x_mask)
            for block in blocks[1:]:
                xs = xs + block(x, x_mask)
            x = xs / self.num_kernels
        x = F.leaky_relu(x)  # default slope 0.01 here, unlike every other activation
        return torch.tanh(self.conv_post(x))

    def forward(self, x: Tensor, g: Tensor | None = None, n_res: Tensor | int | None = None, *,
                lengths: Tensor | None = None) -> Tensor:
        """x `[B, C_in, T]` -> `[B, 1, T' * upp]`, T' = n_res if given (x linearly resampled to it);
        lengths `[B]`: valid frames per row of a padded batch (see `_stages`)."""
        if n_res is not None:
            n = int(n_res)
            if n != x.shape[-1]:
                x = F.interpolate(x, size=n, mode="linear")
        return self._stages(x, g, None, lengths)

    def remove_weight_norm(self) -> None:
        for up in self.ups:
            remove_weight_norm(up)
        for block in self.resblocks:
            block.remove_weight_norm()  # type: ignore[operator]


class GeneratorNSF(Generator):
    """`Generator` driven by a harmonic source made from f0; adds `m_source` and `noise_convs` (`dec.*` keys)."""

    def __init__(self, initial_channel: int, resblock: str, resblock_kernel_sizes: Sequence[int],
                 resblock_dilation_sizes: Sequence[Sequence[int]], upsample_rates: Sequence[int],
                 upsample_initial_channel: int, upsample_kernel_sizes: Sequence[int], gin_channels: int, sr: int,
                 sinegen_variant: SineGenVariant = "B") -> None:
        super().__init__(initial_channel, resblock, resblock_kernel_sizes, resblock_dilation_sizes, upsample_rates,
                         upsample_initial_channel, upsample_kernel_sizes, gin_channels)
        self.m_source = SourceModuleHnNSF(sampling_rate=sr, harmonic_num=0, variant=sinegen_variant)
        self.noise_convs = nn.ModuleList()
        for i in range(self.num_upsamples):
            c_out = upsample_initial_channel >> (i + 1)
            if i + 1 < self.num_upsamples:
                s = math.prod(upsample_rates[i + 1 :])  # the source, at audio rate, down to this stage's rate
                self.noise_convs.append(Conv1d(1, c_out, kernel_size=s * 2, stride=s, padding=s // 2))
            else:
                self.noise_convs.append(Conv1d(1, c_out, kernel_size=1))

    def _excitation(self, i: int, har: Tensor | None) -> Tensor | float:
        assert har is not None
        conv: nn.Module = self.noise_convs[i]
        return conv(har)  # type: ignore[no-any-return]

    def forward(self, x: Tensor, f0: Tensor, g: Tensor | None = None,  # type: ignore[override]
                n_res: Tensor | int | None = None, *, draws: SineDraws | None = None,
                lengths: Tensor | None = None) -> Tensor:
        """x `[B, C_in, T]`, f0 Hz `[B, T]` float32 -> `[B, 1, T' * upp]` (T' = n_res if given).

        With n_res, SineGen still runs at f0's length (its random draws do not depend on n_res); the
        source and x are then linearly resampled, as RVC's realtime formant shift expects.
        draws: SineGen's numbers, drawn beforehand; lengths `[B]`: valid frames per row (see `_stages`).
        """
        har = self.m_source(f0, self.upp, draws).transpose(1, 2)  # [B, 1, T*upp]
        if n_res is not None:
            n = int(n_res)
            if n * self.upp != har.shape[-1]:
                har = F.interpolate(har, size=n * self.upp, mode="linear")
            if n != x.shape[-1]:
                x = F.interpolate(x, size=n, mode="linear")
        return self._stages(x, g, har, lengths)
