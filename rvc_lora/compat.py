"""The seed's API names (phase-2 model integration), kept importable from `rvc_lora`.

`GeneratorLoRA` (the HiFi-GAN decoder with LoRA built in) and `create_synthesizer_lora_from_pretrained`
predate the voice model (`rvc_lora.voice`); new code builds models there.
"""

from __future__ import annotations

from collections.abc import Sequence

from rvc_lora.lora import LoRAConfig, inject_lora
from rvc_lora.models.generator import Generator
from rvc_lora.models.synthesizer import RVCSynthesizer
from rvc_lora.voice.model import SynthesizerLoRA


class GeneratorLoRA(Generator):
    """A `Generator` whose targeted layers (default `ups` + `resblocks`) carry LoRA; weight norm is
    folded before injection, since LoRA adds to a plain weight."""

    def __init__(self, initial_channel: int, resblock: str, resblock_kernel_sizes: Sequence[int],
                 resblock_dilation_sizes: Sequence[Sequence[int]], upsample_rates: Sequence[int],
                 upsample_initial_channel: int, upsample_kernel_sizes: Sequence[int], gin_channels: int = 0,
                 lora_config: LoRAConfig | None = None) -> None:
        super().__init__(initial_channel, resblock, resblock_kernel_sizes, resblock_dilation_sizes, upsample_rates,
                         upsample_initial_channel, upsample_kernel_sizes, gin_channels)
        self.lora_config = lora_config
        if lora_config is not None:
            self.remove_weight_norm()
            inject_lora(self, lora_config)


def create_synthesizer_lora_from_pretrained(pretrained_model: RVCSynthesizer,
                                            lora_config: LoRAConfig | None = None) -> SynthesizerLoRA:
    """Wrap an already-built synthesizer (its weight norm is folded in place)."""
    return SynthesizerLoRA(pretrained_model, lora_config)
