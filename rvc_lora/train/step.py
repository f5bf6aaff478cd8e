"""One RVC training step (spec §4.5, §4.7): discriminator update, then generator update, one GradScaler.

`GANTrainer` is agnostic of what in the generator trains: `run_train` hands it LoRA parameter groups,
the benchmark all generator parameters (a full fine-tune) for comparison.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rvc_lora.models.commons import slice_segments
from rvc_lora.train.data import Batch
from rvc_lora.train.losses import (
    C_KL,
    C_MEL,
    adversarial_loss,
    discriminator_loss,
    feature_matching_loss,
    kl_loss,
    mel_loss,
)
from rvc_lora.train.mel import MelScale
from rvc_lora.train.pretrained import TrainParams

BETAS = (0.8, 0.99)
EPS = 1e-9
WEIGHT_DECAY = 0.01  # torch's AdamW default, which RVC keeps
LR_DECAY = 0.999875  # ExponentialLR gamma, stepped once per epoch

ParamGroups = Sequence[dict[str, Any]]


def lora_param_groups(a: Sequence[Tensor], b: Sequence[Tensor], lr: float, scale: float,
                      b_lr_ratio: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups that train the *effective* B (alpha/r folded in) exactly as standard LoRA trains its raw B.

    With B_eff = s * B_raw, Adam on B_raw moves B_eff by `s * lr * m / (sqrt(v) + eps / s)` and decays it by
    `lr * wd`: the same as Adam on B_eff with lr `s * lr`, eps `eps / s` and weight decay `wd / s`. A is unchanged.
    `b_lr_ratio` multiplies B's learning rate only (LoRA+: B starts at zero and must travel further than A)."""
    return [{"params": list(a), "lr": lr, "eps": EPS, "weight_decay": WEIGHT_DECAY},
            {"params": list(b), "lr": lr * scale * b_lr_ratio, "eps": EPS / scale,
             "weight_decay": WEIGHT_DECAY / scale}]


def _grad_norm(params: Iterable[Tensor], max_norm: float | None) -> float:
    """Total L2 norm of the gradients (before clipping); clips to `max_norm` when given (RVC only measures)."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm is not None else float("inf")))


class GANTrainer:
    """Optimisers, schedulers and the step for `generator` (an RVC synthesizer or `SynthesizerLoRA`).

    fp16 autocast and loss scaling only on CUDA; mels and losses always in float32, outside autocast."""

    def __init__(self, generator: nn.Module, g_groups: ParamGroups, discriminator: nn.Module, params: TrainParams,
                 *, f0: bool, device: torch.device, fp16: bool = False, lr: float = 1e-4,
                 grad_clip: float | None = None) -> None:
        self.generator, self.discriminator, self.params = generator, discriminator, params
        self.f0, self.device, self.grad_clip = f0, device, grad_clip
        self.fp16 = fp16 and device.type == "cuda"
        self.mel = MelScale(params).to(device)
        self.g_params = [p for g in g_groups for p in g["params"]]
        self.opt_g = torch.optim.AdamW(g_groups, lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
        self.opt_d = torch.optim.AdamW(discriminator.parameters(), lr=lr, betas=BETAS, eps=EPS,
                                       weight_decay=WEIGHT_DECAY)
        self.sched_g = torch.optim.lr_scheduler.ExponentialLR(self.opt_g, gamma=LR_DECAY)
        self.sched_d = torch.optim.lr_scheduler.ExponentialLR(self.opt_d, gamma=LR_DECAY)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.fp16)

    def _autocast(self, enabled: bool = True) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16 and enabled)

    def _scaled(self, loss: Tensor) -> Tensor:
        scaled = self.scaler.scale(loss)
        assert isinstance(scaled, Tensor)
        return scaled

    @property
    def lr(self) -> float:
        return float(self.opt_g.param_groups[0]["lr"])

    def end_epoch(self) -> None:
        self.sched_g.step()
        self.sched_d.step()

    def step(self, batch: Batch) -> dict[str, float]:
        """One batch: D step on the detached generation, then G step through the updated D. -> losses, norms."""
        b = batch.to(self.device)
        hop, seg = self.params.hop, self.params.segment_frames
        args = (b.phone, b.phone_lengths, b.pitch, b.pitchf) if self.f0 else (b.phone, b.phone_lengths)
        with self._autocast():
            y_hat, ids, _, z_mask, (_, z_p, m_p, logs_p, _, logs_q) = self.generator(
                *args, b.spec, b.spec_lengths, b.sid)
        with self._autocast(enabled=False):
            mel_real = self.mel.spec_to_mel(slice_segments(b.spec, ids, seg).float())
            mel_fake = self.mel(y_hat.float().squeeze(1))
        wave = slice_segments(b.wave, ids * hop, seg * hop)  # [B, 1, seg * hop]

        with self._autocast():
            real, fake, _, _ = self.discriminator(wave, y_hat.detach())
        loss_d = discriminator_loss(real, fake)
        self.opt_d.zero_grad(set_to_none=True)
        torch.autograd.backward(self._scaled(loss_d))
        self.scaler.unscale_(self.opt_d)
        norm_d = _grad_norm(self.discriminator.parameters(), self.grad_clip)
        self.scaler.step(self.opt_d)

        self.discriminator.requires_grad_(False)  # its gradients from the G loss would be thrown away
        try:
            with self._autocast():
                _, fake, fmap_real, fmap_fake = self.discriminator(wave, y_hat)
        finally:
            self.discriminator.requires_grad_(True)
        loss_mel = mel_loss(mel_real, mel_fake) * C_MEL
        loss_kl = kl_loss(z_p, logs_q, m_p, logs_p, z_mask) * C_KL
        loss_fm = feature_matching_loss(fmap_real, fmap_fake)
        loss_adv = adversarial_loss(fake)
        loss_g = loss_adv + loss_fm + loss_mel + loss_kl
        self.opt_g.zero_grad(set_to_none=True)
        torch.autograd.backward(self._scaled(loss_g))
        self.scaler.unscale_(self.opt_g)
        norm_g = _grad_norm(self.g_params, self.grad_clip)
        self.scaler.step(self.opt_g)
        self.scaler.update()
        values = torch.stack([loss_g, loss_d, loss_mel, loss_kl, loss_fm, loss_adv]).detach().cpu().tolist()
        names = ("loss_g", "loss_d", "loss_mel", "loss_kl", "loss_fm", "loss_adv")
        return {**dict(zip(names, values, strict=True)), "grad_norm_g": norm_g, "grad_norm_d": norm_d}

    def state_dict(self) -> dict[str, Any]:
        return {"optim_g": self.opt_g.state_dict(), "optim_d": self.opt_d.state_dict(),
                "sched_g": self.sched_g.state_dict(), "sched_d": self.sched_d.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt_g.load_state_dict(state["optim_g"])
        self.opt_d.load_state_dict(state["optim_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        self.scaler.load_state_dict(state["scaler"])
