"""`GeneratorLoRA`: the HiFi-GAN decoder with LoRA in its upsamplers and residual blocks (seed API)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from rvc_lora.lora import LoRAConfig, inject_lora
from rvc_lora.models.generator import Generator


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

    def forward(self, x: Tensor, g: Tensor | None = None, n_res: Tensor | int | None = None) -> Tensor:
        """x `[B, C_in, T]`, g `[B, gin, 1]` -> audio `[B, 1, T' * upp]`."""
        return super().forward(x, g, n_res)
