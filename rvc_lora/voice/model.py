"""`SynthesizerLoRA`: an RVC synthesizer with LoRA slots, and every way to build one.

The slots are allocated once, by a `SlotLayout`; loading an adapter is a check (once, in `prepare`) and a
fused `copy_` into them (`swap`), so no module is rebuilt and no tensor reallocated: a compiled model or
CUDA graph stays valid.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rvc_lora.adapters import Adapter, AdapterInfo, load_adapter, save_adapter_tensors
from rvc_lora.checkpoint import RawCheckpoint, base_fingerprint, build_from_raw, read_rvc_checkpoint
from rvc_lora.config import SynthConfig
from rvc_lora.errors import CheckpointError
from rvc_lora.lora import (
    FULL_DELTA_PREFIX,
    LoRAConfig,
    inject_lora,
    load_lora_weights,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)
from rvc_lora.models.synthesizer import ForwardOutput, InferOutput, RVCSynthesizer
from rvc_lora.voice.layout import LIBRARY_LAYOUT, SlotLayout, adapter_layout, layout_holding
from rvc_lora.voice.slots import PreparedAdapter, ResidentSlots

log = logging.getLogger(__name__)

AdapterSource = Adapter | str | os.PathLike[str]


class SynthesizerLoRA(nn.Module):
    """Wraps an RVC synthesizer (`self.base`); weight norm is folded, LoRA injected, base frozen.

    `layout` (default `LIBRARY_LAYOUT`) says where the slots are; the older spelling `lora_config` (+
    `max_rank`) builds a custom layout. `infer`/`forward` keep RVC's signatures (f0 models take pitch and
    nsff0, no-f0 models do not).
    """

    def __init__(self, base_synthesizer: RVCSynthesizer, lora_config: LoRAConfig | None = None,
                 freeze_non_lora: bool = True, *, max_rank: int | None = None, fingerprint: str | None = None,
                 layout: SlotLayout | None = None) -> None:
        super().__init__()
        if layout is None:
            layout = LIBRARY_LAYOUT if lora_config is None and max_rank is None else SlotLayout(
                "custom", lora_config or LIBRARY_LAYOUT.lora, max_rank or (lora_config or LIBRARY_LAYOUT.lora).r)
        self.layout = layout
        self.lora_config = layout.lora
        # the fingerprint is of the weights as stored (weight_g/weight_v), so take it before folding
        self.fingerprint = fingerprint or base_fingerprint(base_synthesizer.state_dict())
        base_synthesizer.remove_weight_norm()
        inject_lora(base_synthesizer, layout.lora, max_rank=layout.max_rank)
        self.base = base_synthesizer
        self._slots: ResidentSlots | None = None
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

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> SynthesizerLoRA:
        self._slots = None  # .to()/.half() may move or recast the slot tensors: list them again
        return super()._apply(fn, recurse)  # type: ignore[no-any-return, no-untyped-call]

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
    @property
    def slots(self) -> ResidentSlots:
        """The adapter memory in swap order (listed again after `.to()`)."""
        if self._slots is None:
            self._slots = ResidentSlots(self.base, self.cfg, self.fingerprint, self.layout)
        return self._slots

    def refresh_slots(self) -> None:
        """List the adapter memory again (after its parameters were rebound, as `AdapterBank` does)."""
        self._slots = None

    def get_lora_state_dict(self, rank: int | None = None) -> dict[str, Tensor]:
        """Resident adapter tensors (effective values), `<layer>.lora_A/lora_B` and `full_delta.<param>`."""
        return lora_state_dict(self.base, rank)

    def load_lora_weights(self, lora_state_dict: Mapping[str, Tensor], strict: bool = True,
                          alpha: float | None = None) -> None:
        """Copy a raw adapter state into the slots in place, every key and value checked first (untouched on
        error). For files and `Adapter`s, `prepare` once and `swap` is the fast path."""
        load_lora_weights(self.base, lora_state_dict, strict=strict, alpha=alpha)

    def slot_ranks(self) -> dict[str, int]:
        return {name: layer.max_rank for name, layer in lora_layers(self.base).items()}

    def full_delta_names(self) -> set[str]:
        return set(self.slots.delta_names)

    def check_adapter(self, adapter: Adapter, source: str | None = None) -> None:
        """Raise `AdapterMismatchError` unless `adapter` was made for this base and fits its slots."""
        self.slots.check(adapter, source)

    def prepare(self, adapter: AdapterSource, device: str | torch.device | None = None) -> PreparedAdapter:
        """Check an adapter (file or loaded) against this model once; the result swaps in at copy speed."""
        loaded = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
        return self.slots.prepare(loaded, device)

    def swap(self, prepared: PreparedAdapter | None) -> None:
        """Make a prepared adapter resident (None: the base voice): one fused in-place copy."""
        self.slots.swap(prepared)

    def load_adapter(self, adapter: AdapterSource | PreparedAdapter) -> AdapterInfo:
        """Check an adapter against this base (unless prepared already), then copy it into the slots in place."""
        prepared = adapter if isinstance(adapter, PreparedAdapter) else self.prepare(adapter)
        self.swap(prepared)
        return prepared.info

    def reset_adapter(self) -> None:
        """Back to the base voice (exactly the base output)."""
        self.swap(None)

    def merge(self) -> None:
        """Fold the resident adapter into the base weights (single-voice deployments)."""
        merge_lora(self.base)

    def unmerge(self) -> None:
        unmerge_lora(self.base)

    @classmethod
    def from_adapter(cls, checkpoint_path: str | os.PathLike[str], adapter_path: AdapterSource,
                     device: str | torch.device = "cpu") -> SynthesizerLoRA:
        """A model whose slots are exactly the adapter's (rank and layers), with the adapter loaded."""
        adapter = adapter_path if isinstance(adapter_path, Adapter) else load_adapter(adapter_path)
        model = load_voice_model(checkpoint_path, adapter_layout(adapter.info), device=device)
        model.load_adapter(adapter)
        return model


def build_voice_model(raw: RawCheckpoint, layout: SlotLayout = LIBRARY_LAYOUT,
                      device: str | torch.device = "cpu") -> SynthesizerLoRA:
    """The LoRA-wrapped synthesizer of a read checkpoint, slots as `layout` says, eval mode, on `device`."""
    model = SynthesizerLoRA(build_from_raw(raw), layout=layout, fingerprint=raw.fingerprint)
    return model.to(device).eval()


def load_voice_model(checkpoint: str | os.PathLike[str] | RawCheckpoint, layout: SlotLayout = LIBRARY_LAYOUT,
                     device: str | torch.device = "cpu", *,
                     adapters: Iterable[AdapterInfo] = ()) -> SynthesizerLoRA:
    """Read a base `.pth` and build its voice model. With `adapters`, the layout is grown (`layout_holding`) so
    that every one of them loads: the CLI and `VoiceConverter.from_files` build their model this way."""
    raw = checkpoint if isinstance(checkpoint, RawCheckpoint) else read_rvc_checkpoint(checkpoint)
    infos = list(adapters)
    if infos:
        layout = layout_holding(infos, at_least=layout)
    return build_voice_model(raw, layout, device)


def load_synthesizer_with_lora(checkpoint_path: str | os.PathLike[str], lora_config: LoRAConfig,
                               device: str | torch.device = "cpu", version: str | None = None,
                               f0: bool | None = None, *, max_rank: int | None = None) -> SynthesizerLoRA:
    """Load an RVC `.pth` and wrap it with LoRA slots; `version`/`f0`, when given, must match the file."""
    raw = read_rvc_checkpoint(checkpoint_path)
    cfg = raw.config
    if version is not None and version != cfg.version:
        raise CheckpointError(f"{Path(checkpoint_path)}: holds a {cfg.version} model, not {version}")
    if f0 is not None and bool(f0) != cfg.f0:
        raise CheckpointError(f"{Path(checkpoint_path)}: f0={int(cfg.f0)} in the file, f0={int(bool(f0))} asked")
    return build_voice_model(raw, SlotLayout("custom", lora_config, max_rank or lora_config.r), device)


def save_adapter(path: str | os.PathLike[str], model: SynthesizerLoRA, *, name: str | None = None,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write the resident adapter of `model` (trimmed to its configured rank) with its base's metadata.

    Resident tensors already hold `alpha/r * B`, so the file says `lora_alpha = r` (scale 1) and loading
    it back reproduces the resident values exactly.
    """
    r = model.lora_config.r
    state = model.get_lora_state_dict(rank=r)
    layers = sorted({k.rsplit(".", 1)[0] for k in state if not k.startswith(FULL_DELTA_PREFIX)})
    fulls = sorted(k.removeprefix(FULL_DELTA_PREFIX) for k in state if k.startswith(FULL_DELTA_PREFIX))
    cfg = model.cfg
    info = AdapterInfo(name=name or Path(path).stem, r=r, lora_alpha=float(r), target_modules=tuple(layers),
                       base_fingerprint=model.fingerprint, sr=cfg.sr, version=cfg.version, f0=cfg.f0,
                       full_delta=tuple(fulls))
    return save_adapter_tensors(path, state, info, dtype)
