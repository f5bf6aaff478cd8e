"""`SynthesizerLoRA`: an RVC synthesizer with LoRA slots, adapters loaded into them in place.

The slots are allocated once (at `max_rank`); loading an adapter is a validated `copy_()` into them,
so no module is rebuilt and no tensor reallocated: a compiled model or CUDA graph stays valid.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rvc_lora.adapters import Adapter, AdapterInfo, check_adapter_fits, load_adapter
from rvc_lora.checkpoint import base_fingerprint, load_rvc_checkpoint
from rvc_lora.config import SynthConfig
from rvc_lora.errors import CheckpointError
from rvc_lora.lora import (
    LoRAConfig,
    full_delta_slots,
    inject_lora,
    load_lora_weights,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    reset_lora,
    unmerge_lora,
)
from rvc_lora.models.synthesizer import ForwardOutput, InferOutput, RVCSynthesizer

log = logging.getLogger(__name__)

DEFAULT_LORA_CONFIG = LoRAConfig(r=8, lora_alpha=16, target_modules=("ups", "resblocks"))


class SynthesizerLoRA(nn.Module):
    """Wraps an RVC synthesizer (`self.base`); weight norm is folded, LoRA injected, base frozen.

    `infer`/`forward` keep RVC's signatures (f0 models take pitch and nsff0, no-f0 models do not).
    """

    def __init__(self, base_synthesizer: RVCSynthesizer, lora_config: LoRAConfig | None = None,
                 freeze_non_lora: bool = True, *, max_rank: int | None = None,
                 fingerprint: str | None = None) -> None:
        super().__init__()
        self.lora_config = lora_config or DEFAULT_LORA_CONFIG
        # the fingerprint is of the weights as stored (weight_g/weight_v), so take it before folding
        self.fingerprint = fingerprint or base_fingerprint(base_synthesizer.state_dict())
        base_synthesizer.remove_weight_norm()
        inject_lora(base_synthesizer, self.lora_config, max_rank=max_rank or self.lora_config.r)
        self.base = base_synthesizer
        if freeze_non_lora:
            self.freeze_base_model()

    @property
    def cfg(self) -> SynthConfig:
        return self.base.cfg

    def infer(self, *args: Any, **kwargs: Any) -> InferOutput:
        """RVC's `infer`; see `SynthesizerTrnMs768NSFsid.infer` (f0) and `..._nono.infer`."""
        return self.base.infer(*args, **kwargs)  # type: ignore[no-any-return, operator]

    def forward(self, *args: Any, **kwargs: Any) -> ForwardOutput:
        """RVC's training forward, gradients reaching only the trainable (LoRA) parameters by default."""
        return self.base(*args, **kwargs)  # type: ignore[no-any-return]

    # --- parameters -------------------------------------------------------------------------------
    def get_lora_parameters(self) -> list[nn.Parameter]:
        return lora_parameters(self.base)

    def freeze_base_model(self) -> None:
        """Only LoRA tensors train."""
        lora_ids = {id(p) for p in self.get_lora_parameters()}
        for p in self.base.parameters():
            p.requires_grad_(id(p) in lora_ids)

    def unfreeze_all(self) -> None:
        """Full fine-tuning: every parameter trains."""
        for p in self.base.parameters():
            p.requires_grad_(True)

    def parameter_summary(self) -> dict[str, int]:
        """Counts of total / LoRA / frozen / trainable parameters."""
        params = list(self.base.parameters())
        lora_ids = {id(p) for p in self.get_lora_parameters()}
        total = sum(p.numel() for p in params)
        lora = sum(p.numel() for p in params if id(p) in lora_ids)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        return {"total": total, "lora": lora, "frozen": total - trainable, "trainable": trainable}

    def describe_parameters(self) -> str:
        s = self.parameter_summary()
        share = 100 * s["lora"] / s["total"]
        return (f"Total parameters: {s['total']:,}\nLoRA parameters: {s['lora']:,} ({share:.2f}%)\n"
                f"Base frozen: {s['frozen']:,}\nTrainable: {s['trainable']:,}")

    # --- adapters ---------------------------------------------------------------------------------
    def get_lora_state_dict(self, rank: int | None = None) -> dict[str, Tensor]:
        """Resident adapter tensors (effective values), `<layer>.lora_A/lora_B` and `full_delta.<param>`."""
        return lora_state_dict(self.base, rank)

    def load_lora_weights(self, lora_state_dict: Mapping[str, Tensor], strict: bool = True,
                          alpha: float | None = None) -> None:
        """Copy an adapter state into the resident slots in place (validated first; untouched on error)."""
        load_lora_weights(self.base, lora_state_dict, strict=strict, alpha=alpha)

    def slot_ranks(self) -> dict[str, int]:
        return {name: layer.max_rank for name, layer in lora_layers(self.base).items()}

    def full_delta_names(self) -> set[str]:
        slots = full_delta_slots(self.base)
        return set() if slots is None else set(slots.names)

    def check_adapter(self, info: AdapterInfo, source: str = "adapter") -> None:
        """Raise `AdapterMismatchError` unless an adapter with `info` fits this base and its slots."""
        cfg = self.cfg
        check_adapter_fits(info, fingerprint=self.fingerprint, sr=cfg.sr, version=cfg.version, f0=cfg.f0,
                           slots=self.slot_ranks(), full_delta=self.full_delta_names(), source=source)

    def load_adapter(self, adapter: Adapter | str | os.PathLike[str]) -> AdapterInfo:
        """Validate an adapter (file or loaded) against this base, then copy it into the slots in place."""
        if not isinstance(adapter, Adapter):
            adapter = load_adapter(adapter)
        self.check_adapter(adapter.info, source=adapter.info.name)
        self.load_lora_weights(adapter.tensors, strict=True, alpha=adapter.info.lora_alpha)
        return adapter.info

    def reset_adapter(self) -> None:
        """Back to the base voice (exactly the base output)."""
        reset_lora(self.base)

    def merge(self) -> None:
        """Fold the resident adapter into the base weights (single-voice deployments)."""
        merge_lora(self.base)

    def unmerge(self) -> None:
        unmerge_lora(self.base)

    @classmethod
    def from_adapter(cls, checkpoint_path: str | os.PathLike[str], adapter_path: str | os.PathLike[str],
                     device: str | torch.device = "cpu") -> SynthesizerLoRA:
        """A model whose slots match the adapter's rank and targets, with the adapter loaded."""
        adapter = load_adapter(adapter_path)
        info = adapter.info
        config = LoRAConfig(r=info.r, lora_alpha=info.lora_alpha, target_modules=info.target_modules,
                            full_delta_modules=info.full_delta)
        model = load_synthesizer_with_lora(checkpoint_path, config, device=device)
        model.load_adapter(adapter.to(device))
        return model


def load_synthesizer_with_lora(checkpoint_path: str | os.PathLike[str], lora_config: LoRAConfig,
                               device: str | torch.device = "cpu", version: str | None = None,
                               f0: bool | None = None, *, max_rank: int | None = None) -> SynthesizerLoRA:
    """Load an RVC `.pth` and wrap it with LoRA slots; `version`/`f0`, when given, must match the file."""
    ckpt = load_rvc_checkpoint(checkpoint_path)
    if version is not None and version != ckpt.version:
        raise CheckpointError(f"{Path(checkpoint_path)}: holds a {ckpt.version} model, not {version}")
    if f0 is not None and bool(f0) != ckpt.f0:
        raise CheckpointError(f"{Path(checkpoint_path)}: f0={int(ckpt.f0)} in the file, f0={int(bool(f0))} asked")
    model = SynthesizerLoRA(ckpt.model, lora_config, max_rank=max_rank, fingerprint=ckpt.fingerprint)
    return model.to(device).eval()


def create_synthesizer_lora_from_pretrained(pretrained_model: RVCSynthesizer,
                                            lora_config: LoRAConfig | None = None) -> SynthesizerLoRA:
    """Wrap an already-built synthesizer (its weight norm is folded in place)."""
    return SynthesizerLoRA(pretrained_model, lora_config)
