"""The prior (`enc_p`, TextEncoder) and posterior (`enc_q`) encoders, and the gated WaveNet stack WN."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rvc_lora.models.attentions import Encoder
from rvc_lora.models.commons import LRELU_SLOPE, gated_activation, remove_weight_norm, sequence_mask, weight_norm


class TextEncoder(nn.Module):
    """Content features (+ coarse pitch) -> prior mean and log-std: `enc_p` in RVC checkpoints."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, filter_channels: int,
                 n_heads: int, n_layers: int, kernel_size: int, p_dropout: float, f0: bool = True) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.hidden_channels = hidden_channels
        self.emb_phone = nn.Linear(in_channels, hidden_channels)
        self.emb_pitch = nn.Embedding(256, hidden_channels) if f0 else None
        self.encoder = Encoder(hidden_channels, filter_channels, n_heads, n_layers, kernel_size, float(p_dropout))
        self.proj = nn.Conv1d(hidden_channels, out_channels * 2, 1)

    def forward(self, phone: Tensor, pitch: Tensor | None, lengths: Tensor,
                skip_head: Tensor | int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """phone `[B, T, in]`, pitch `[B, T]` int64 1..255 (None for no-f0), lengths `[B]` int64
        -> (m `[B, out, T']`, logs `[B, out, T']`, x_mask `[B, 1, T']`), T' = T - skip_head.

        skip_head drops leading frames after the encoder, so attention still saw them.
        """
        x = self.emb_phone(phone)
        if pitch is not None and self.emb_pitch is not None:
            x = x + self.emb_pitch(pitch)
        x = x * math.sqrt(self.hidden_channels)  # scale before the activation, as RVC
        x = F.leaky_relu(x, LRELU_SLOPE).transpose(1, -1)  # [B, hidden, T]
        x_mask = sequence_mask(lengths, x.size(2)).unsqueeze(1).to(x.dtype)
        x = self.encoder(x * x_mask, x_mask)
        if skip_head is not None:
            head = int(skip_head)
            x, x_mask = x[:, :, head:], x_mask[:, :, head:]
        stats = self.proj(x) * x_mask
        m, logs = torch.split(stats, self.out_channels, dim=1)
        return m, logs, x_mask


class WN(nn.Module):
    """Gated WaveNet stack with a global condition; the last residual/skip conv outputs skip channels only."""

    def __init__(self, hidden_channels: int, kernel_size: int, dilation_rate: int, n_layers: int,
                 gin_channels: int = 0, p_dropout: float = 0.0) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.n_layers = n_layers
        self.drop = nn.Dropout(p_dropout)
        if gin_channels:
            self.cond_layer = weight_norm(nn.Conv1d(gin_channels, 2 * hidden_channels * n_layers, 1))
        self.in_layers = nn.ModuleList()
        self.res_skip_layers = nn.ModuleList()
        for i in range(n_layers):
            dilation = dilation_rate**i
            padding = int((kernel_size * dilation - dilation) / 2)
            self.in_layers.append(weight_norm(
                nn.Conv1d(hidden_channels, 2 * hidden_channels, kernel_size, dilation=dilation, padding=padding)))
            out = 2 * hidden_channels if i < n_layers - 1 else hidden_channels
            self.res_skip_layers.append(weight_norm(nn.Conv1d(hidden_channels, out, 1)))

    def forward(self, x: Tensor, x_mask: Tensor, g: Tensor | None = None) -> Tensor:
        """x `[B, H, T]`, x_mask `[B, 1, T]`, g `[B, gin, 1]` -> skip sum `[B, H, T]` (masked)."""
        h = self.hidden_channels
        output = torch.zeros_like(x)
        cond = self.cond_layer(g) if g is not None else None  # [B, 2H*L, 1]
        for i, (in_layer, res_skip) in enumerate(zip(self.in_layers, self.res_skip_layers, strict=True)):
            x_in = in_layer(x)
            g_l = cond[:, i * 2 * h : (i + 1) * 2 * h] if cond is not None else torch.zeros_like(x_in)
            acts = self.drop(gated_activation(x_in, g_l, h))
            rs = res_skip(acts)
            if i < self.n_layers - 1:
                x = (x + rs[:, :h]) * x_mask
                output = output + rs[:, h:]
            else:
                output = output + rs
        return output * x_mask

    def remove_weight_norm(self) -> None:
        if hasattr(self, "cond_layer"):
            remove_weight_norm(self.cond_layer)
        for layer in (*self.in_layers, *self.res_skip_layers):
            remove_weight_norm(layer)


class PosteriorEncoder(nn.Module):
    """Linear spectrogram -> latent z (training only; `enc_q`, absent from inference checkpoints)."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, kernel_size: int,
                 dilation_rate: int, n_layers: int, gin_channels: int = 0) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.pre = nn.Conv1d(in_channels, hidden_channels, 1)
        self.enc = WN(hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels=gin_channels)
        self.proj = nn.Conv1d(hidden_channels, out_channels * 2, 1)

    def forward(self, y: Tensor, y_lengths: Tensor, g: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """y `[B, spec, T]` -> (z, m, logs `[B, out, T]`, y_mask `[B, 1, T]`); draws one randn like m."""
        y_mask = sequence_mask(y_lengths, y.size(2)).unsqueeze(1).to(y.dtype)
        h = self.enc(self.pre(y) * y_mask, y_mask, g)
        stats = self.proj(h) * y_mask
        m, logs = torch.split(stats, self.out_channels, dim=1)
        z = (m + torch.randn_like(m) * torch.exp(logs)) * y_mask
        return z, m, logs, y_mask

    def remove_weight_norm(self) -> None:
        self.enc.remove_weight_norm()
