"""The VITS/RVC training objective (spec §4.5), computed in float32.

Generator: `L_adv + L_fm + 45 L_mel + 1.0 L_kl`; discriminator: least squares on real (-> 1) and fake (-> 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

C_MEL = 45.0
C_KL = 1.0
C_FM = 2.0  # RVC's feature_loss doubles its sum


def discriminator_loss(real: Sequence[Tensor], fake: Sequence[Tensor]) -> Tensor:
    """`sum_k mean((1 - D_k(y))^2) + mean(D_k(y_hat)^2)` over the sub-discriminators' outputs."""
    loss = real[0].new_zeros((), dtype=torch.float32)
    for dr, dg in zip(real, fake, strict=True):
        loss = loss + torch.mean((1 - dr.float()) ** 2) + torch.mean(dg.float() ** 2)
    return loss


def adversarial_loss(fake: Sequence[Tensor]) -> Tensor:
    """Generator side of LSGAN: `sum_k mean((1 - D_k(y_hat))^2)`."""
    loss = fake[0].new_zeros((), dtype=torch.float32)
    for dg in fake:
        loss = loss + torch.mean((1 - dg.float()) ** 2)
    return loss


def feature_matching_loss(fmap_real: Sequence[Sequence[Tensor]], fmap_fake: Sequence[Sequence[Tensor]]) -> Tensor:
    """`2 * sum_k sum_l mean|fmap_real - fmap_fake|` over every conv output (conv_post included); real detached."""
    loss = fmap_fake[0][0].new_zeros((), dtype=torch.float32)
    for layers_r, layers_g in zip(fmap_real, fmap_fake, strict=True):
        for r, g in zip(layers_r, layers_g, strict=True):
            loss = loss + torch.mean(torch.abs(r.float().detach() - g.float()))
    return loss * C_FM


def kl_loss(z_p: Tensor, logs_q: Tensor, m_p: Tensor, logs_p: Tensor, z_mask: Tensor) -> Tensor:
    """KL between the flowed posterior sample and the prior, averaged over valid frames:
    `sum[(logs_p - logs_q - 0.5 + 0.5 (z_p - m_p)^2 exp(-2 logs_p)) mask] / sum(mask)`; all `[B, C, T]`."""
    z_p, logs_q, m_p, logs_p, z_mask = (t.float() for t in (z_p, logs_q, m_p, logs_p, z_mask))
    kl = logs_p - logs_q - 0.5 + 0.5 * (z_p - m_p) ** 2 * torch.exp(-2.0 * logs_p)
    return torch.sum(kl * z_mask) / torch.sum(z_mask)


def mel_loss(mel_real: Tensor, mel_fake: Tensor) -> Tensor:
    """Mean absolute error between log mels `[B, n_mels, T]` (unweighted; the trainer applies `C_MEL`)."""
    return F.l1_loss(mel_real.float(), mel_fake.float())
