"""The prior encoder's transformer: relative-position multi-head attention, FFN, post-norm Encoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rvc_lora.models.commons import LayerNorm

WINDOW_SIZE = 10  # RVC's relative-attention window: 2w+1 = 21 learned offsets, shared by all heads


def _relative_index(t: int, window: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For a `[T, T]` score grid: the offset column `j - i + w` of each cell, clamped, and whether |j-i| <= w."""
    pos = torch.arange(t, device=device)
    offset = pos.unsqueeze(0) - pos.unsqueeze(1) + window  # [T, T], offset[i, j] = j - i + w
    inside = (offset >= 0) & (offset <= 2 * window)
    return offset.clamp(0, 2 * window), inside


def _band_index(t: int, window: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The inverse map, for a `[T, 2w+1]` grid: the key column `i + o - w` of each (row, offset) cell, clamped,
    and whether it is a key (0 <= i + o - w < T)."""
    key = torch.arange(t, device=device).unsqueeze(1) + torch.arange(2 * window + 1, device=device) - window
    return key.clamp(0, t - 1), (key >= 0) & (key < t)


class MultiHeadAttention(nn.Module):
    """Self-attention with learned relative-position keys and values (window 10, shared across heads).

    Scores `S[i, j] = q_i.k_j / sqrt(d) + q_i.E_k[j-i+w] / sqrt(d)` (second term only for |j-i| <= w),
    masked to -1e4, softmaxed; output `sum_j P[i, j] (v_j + E_v[j-i+w])`. Computed here with a gather
    over the band rather than RVC's pad-and-reshape trick: same closed form.
    """

    def __init__(self, channels: int, out_channels: int, n_heads: int, p_dropout: float = 0.0,
                 window_size: int = WINDOW_SIZE) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.k_channels = channels // n_heads
        self.window_size = window_size
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, out_channels, 1)
        self.drop = nn.Dropout(p_dropout)
        rel_std = self.k_channels**-0.5
        self.emb_rel_k = nn.Parameter(torch.randn(1, 2 * window_size + 1, self.k_channels) * rel_std)
        self.emb_rel_v = nn.Parameter(torch.randn(1, 2 * window_size + 1, self.k_channels) * rel_std)
        for conv in (self.conv_q, self.conv_k, self.conv_v):
            nn.init.xavier_uniform_(conv.weight)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """x `[B, C, T]`, attn_mask `[B, 1, T, T]` (1 = attend) -> `[B, C_out, T]`."""
        b, c, t = x.shape
        h, d = self.n_heads, self.k_channels
        q = self.conv_q(x).view(b, h, d, t).transpose(2, 3)  # [B, H, T, d]
        k = self.conv_k(x).view(b, h, d, t).transpose(2, 3)
        v = self.conv_v(x).view(b, h, d, t).transpose(2, 3)
        q = q / math.sqrt(d)
        offset, inside = _relative_index(t, self.window_size, x.device)
        scores = torch.matmul(q, k.transpose(-2, -1))  # [B, H, T, T]
        rel_logits = torch.matmul(q, self.emb_rel_k[0].transpose(0, 1))  # [B, H, T, 2w+1]
        band = torch.gather(rel_logits, -1, offset.expand(b, h, t, t))  # [B, H, T, T]
        scores = scores + band * inside
        scores = scores.masked_fill(attn_mask == 0, -1e4)  # after the relative term, as RVC: exactly -1e4
        p_attn = self.drop(F.softmax(scores, dim=-1))
        out = torch.matmul(p_attn, v)  # [B, H, T, d]
        # P[i, j] re-indexed by offset j - i + w: each band cell is one key's weight, so a gather (cheaper than a
        # scatter, above all under torch.func.vmap in batched synthesis); offsets past the row's ends weigh 0
        key, is_key = _band_index(t, self.window_size, x.device)
        rel_weights = torch.gather(p_attn, -1, key.expand(b, h, t, key.shape[-1])) * is_key
        out = out + torch.matmul(rel_weights, self.emb_rel_v[0])  # [B, H, T, d]
        out = out.transpose(2, 3).contiguous().view(b, c, t)
        result: Tensor = self.conv_o(out)
        return result


class FFN(nn.Module):
    """Two convs with ReLU and 'same' zero padding applied to the masked input before each conv."""

    def __init__(self, in_channels: int, out_channels: int, filter_channels: int, kernel_size: int,
                 p_dropout: float = 0.0) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv_1 = nn.Conv1d(in_channels, filter_channels, kernel_size)
        self.conv_2 = nn.Conv1d(filter_channels, out_channels, kernel_size)
        self.drop = nn.Dropout(p_dropout)

    def _pad(self, x: Tensor) -> Tensor:
        k = self.kernel_size
        return F.pad(x, ((k - 1) // 2, k // 2)) if k > 1 else x

    def forward(self, x: Tensor, x_mask: Tensor) -> Tensor:
        """x `[B, C, T]`, x_mask `[B, 1, T]` -> `[B, C_out, T]`."""
        x = torch.relu(self.conv_1(self._pad(x * x_mask)))
        x = self.drop(x)
        out: Tensor = self.conv_2(self._pad(x * x_mask))
        return out * x_mask


class Encoder(nn.Module):
    """Post-norm transformer: per layer `x = LN(x + attn(x))`, `x = LN(x + ffn(x))`."""

    def __init__(self, hidden_channels: int, filter_channels: int, n_heads: int, n_layers: int,
                 kernel_size: int = 1, p_dropout: float = 0.0, window_size: int = WINDOW_SIZE) -> None:
        super().__init__()
        self.drop = nn.Dropout(p_dropout)
        self.attn_layers = nn.ModuleList(
            MultiHeadAttention(hidden_channels, hidden_channels, n_heads, p_dropout, window_size)
            for _ in range(n_layers))
        self.norm_layers_1 = nn.ModuleList(LayerNorm(hidden_channels) for _ in range(n_layers))
        self.ffn_layers = nn.ModuleList(
            FFN(hidden_channels, hidden_channels, filter_channels, kernel_size, p_dropout) for _ in range(n_layers))
        self.norm_layers_2 = nn.ModuleList(LayerNorm(hidden_channels) for _ in range(n_layers))

    def forward(self, x: Tensor, x_mask: Tensor) -> Tensor:
        """x `[B, C, T]`, x_mask `[B, 1, T]` -> `[B, C, T]` (masked)."""
        attn_mask = x_mask.unsqueeze(2) * x_mask.unsqueeze(-1)  # [B, 1, T, T]
        x = x * x_mask
        for attn, norm1, ffn, norm2 in zip(self.attn_layers, self.norm_layers_1, self.ffn_layers,
                                           self.norm_layers_2, strict=True):
            x = norm1(x + self.drop(attn(x, attn_mask)))
            x = norm2(x + self.drop(ffn(x, x_mask)))
        return x * x_mask
