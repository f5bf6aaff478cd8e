"""LoRA for any `nn.Module`: config, layer wrappers, injection and in-place adapter swaps."""

from rvc_lora.lora.config import LoRAConfig
from rvc_lora.lora.inject import (
    FULL_DELTA_ATTR,
    FULL_DELTA_PREFIX,
    FullDeltaSlots,
    base_state_dict,
    fold_weight_norm,
    full_delta_slots,
    inject_lora,
    load_lora_weights,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    name_matches,
    reset_lora,
    unmerge_lora,
)
from rvc_lora.lora.layers import (
    LoRAConv1d,
    LoRAConvTranspose1d,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    wrap_layer,
)

__all__ = [
    "FULL_DELTA_ATTR",
    "FULL_DELTA_PREFIX",
    "FullDeltaSlots",
    "LoRAConfig",
    "LoRAConv1d",
    "LoRAConvTranspose1d",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "base_state_dict",
    "fold_weight_norm",
    "full_delta_slots",
    "inject_lora",
    "load_lora_weights",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "name_matches",
    "reset_lora",
    "unmerge_lora",
    "wrap_layer",
]
