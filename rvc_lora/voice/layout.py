"""Slot layouts: where a voice model has LoRA slots, at what rank. Each layout is defined here, once, by name.

A layout is a `LoRAConfig` (which layers get a low-rank pair, which parameters a whole-tensor delta) and the
rank the slots are allocated at. An adapter loads into a model when the model's layout holds it: every layer
the adapter adapts has a slot of at least its rank, every full delta it carries has a slot.

- `LIBRARY_LAYOUT`: r=8 on `ups` + `resblocks`: what `rvc-lora train` writes by default, and what a library
  user gets without asking for more.
- `serving_layout(cfg, max_rank)`: every layer extraction can produce (enc_p, flow, dec) plus full-delta slots
  for the small tensors, at `max_rank`: what the server keeps resident, so any adapter fits it.
- `adapter_layout(info)` / `layout_holding(infos)`: the smallest layout holding given adapters (the CLI and
  `VoiceConverter.from_files(adapters=...)` build their model with it).

Where extraction looks is defined here too (`EXTRACT_TARGETS`, `FULL_DELTA_PATTERNS`), since the serving
layout is exactly "whatever extraction can write".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from rvc_lora.adapters import AdapterInfo
from rvc_lora.checkpoint import folded_names
from rvc_lora.config import SynthConfig
from rvc_lora.errors import ConfigError
from rvc_lora.lora import LoRAConfig, name_matches
from rvc_lora.models.synthesizer import build_synthesizer

Targets = Literal["dec", "all"]
EXTRACT_TARGETS: dict[str, tuple[str, ...]] = {"dec": ("dec.conv_pre", "dec.ups", "dec.resblocks", "dec.cond")}
EXTRACT_TARGETS["all"] = EXTRACT_TARGETS["dec"] + ("flow", "enc_p.emb_phone", "enc_p.encoder", "enc_p.proj")
FULL_DELTA_PATTERNS: tuple[str, ...] = (
    "emb_g.weight", "enc_p.emb_pitch.weight", "enc_p.*.bias", "enc_p.*.gamma", "enc_p.*.beta", "enc_p.*.emb_rel_k",
    "enc_p.*.emb_rel_v", "flow.*.bias", "dec.*.bias", "dec.conv_post.weight", "dec.noise_convs.*.weight",
    "dec.m_source.l_linear.weight")

# Extraction defaults, shared by `extract_adapter`, `rvc-lora extract` and the HTTP upload of a `.pth`: every
# layer, at the serving rank, so what one writes the other serves. Chosen from docs/fidelity.md
# (benchmarks/bench_fidelity.py, voices fine-tuned in full): the smallest setting whose mean over the voices
# is within 20 dB SNR (extract's warning line) and 0.6 dB log-mel of the full voice, with voicing >= 0.98.
# Decoder-only adapters never came near it (about 1 dB SNR at any rank), and leaving out the full deltas
# of the small tensors capped SNR at 17 dB or less; rank 32 on every layer is 9.6 MB, 1/5.8 of the .pth.
DEFAULT_SERVING_RANK = 32
DEFAULT_EXTRACT_RANK = DEFAULT_SERVING_RANK
DEFAULT_EXTRACT_TARGETS: Targets = "all"
# How each layer's delta is factored: "svd" (closest in weights) or "data-aware" (closest in the layer's outputs
# on calibration inputs, `rvc_lora.calibration`; synthetic inputs unless speech is given). Data-aware at rank
# 32 was 9 dB closer to the full voices than SVD (docs/fidelity.md); it costs seconds of CPU more per voice.
ExtractMethod = Literal["svd", "data-aware"]
EXTRACT_METHODS: tuple[ExtractMethod, ...] = ("svd", "data-aware")
DEFAULT_EXTRACT_METHOD: ExtractMethod = "data-aware"

# `rvc-lora train`'s defaults, from benchmarks/bench_train_fidelity.py (docs/fidelity.md): on the same data and
# steps as a full fine-tune, LoRA on the decoder alone (ups, resblocks; any rank 8-128) got under a third of the
# full fine-tune's validation gain; every layer extraction writes, with the small tensors trained whole (stored
# as full deltas) and B's learning rate 16x A's (LoRA+), matched it. Rank 32: the serving and extraction rank,
# so what training writes fits the serving layout as extracted adapters do.
DEFAULT_TRAIN_RANK = DEFAULT_SERVING_RANK
DEFAULT_TRAIN_ALPHA = 16.0
DEFAULT_TRAIN_TARGETS: tuple[str, ...] = EXTRACT_TARGETS["all"]
DEFAULT_FULL_DELTA = True
DEFAULT_B_LR_RATIO = 16.0


@dataclass(frozen=True)
class SlotLayout:
    """LoRA pairs on the layers `lora.target_modules` matches and full-delta slots on the parameters
    `lora.full_delta_modules` matches, allocated at `max_rank` (>= `lora.r`, the rank training uses).

    name: how errors call it; setting: what to change to get a layout that holds more (named in the
    `AdapterMismatchError` of an adapter this layout cannot hold)."""

    name: str
    lora: LoRAConfig
    max_rank: int
    setting: str = "build the model with a layout that holds the adapter (rvc_lora.voice.layout_holding)"

    def __post_init__(self) -> None:
        if isinstance(self.max_rank, bool) or not isinstance(self.max_rank, int) or self.max_rank < self.lora.r:
            raise ConfigError(f"layout {self.name!r}: max_rank must be an int >= r={self.lora.r}, "
                              f"got {self.max_rank!r}")


LIBRARY_LAYOUT = SlotLayout("library default (r=8 on ups+resblocks)",
                            LoRAConfig(r=8, lora_alpha=16, target_modules=("ups", "resblocks")), 8,
                            setting="pass adapters=[...] or layout=... when building the model")


def _param_names(cfg: SynthConfig) -> list[str]:
    with torch.device("meta"):  # names only, no memory
        return folded_names(build_synthesizer(cfg, with_posterior=False).state_dict())


def serving_layout(cfg: SynthConfig, max_rank: int = DEFAULT_SERVING_RANK, *,
                   setting: str = "the max_rank of serving_layout") -> SlotLayout:
    """Slots for every adapter extraction can produce for this architecture (`targets="all"`, any rank up
    to `max_rank`); a LIBRARY_LAYOUT adapter (a subset of it) fits too."""
    params = _param_names(cfg)
    full = [p for p in FULL_DELTA_PATTERNS if any(name_matches(p, n) for n in params)]  # no-f0: no emb_pitch
    lora = LoRAConfig(r=max_rank, lora_alpha=float(max_rank), target_modules=EXTRACT_TARGETS["all"],
                      full_delta_modules=full)
    return SlotLayout(f"serving (every layer, rank {max_rank})", lora, max_rank, setting=setting)


def adapter_layout(info: AdapterInfo) -> SlotLayout:
    """The smallest layout an adapter loads into: its exact layer and full-delta names, its rank."""
    return layout_holding([info])


def layout_holding(infos: Iterable[AdapterInfo], at_least: SlotLayout | None = None) -> SlotLayout:
    """The smallest layout holding every adapter in `infos` (and `at_least`'s slots, if given): the union of
    their layers and full deltas, at their largest rank."""
    infos = list(infos)
    targets: dict[str, None] = {}
    full: dict[str, None] = {}
    rank = 1
    if at_least is not None:
        targets.update(dict.fromkeys(at_least.lora.target_modules))
        full.update(dict.fromkeys(at_least.lora.full_delta_modules))
        rank = at_least.max_rank
    for info in infos:
        targets.update(dict.fromkeys(info.target_modules))
        full.update(dict.fromkeys(info.full_delta))
        rank = max(rank, info.r)
    # LoRAConfig needs one target: a full-delta-only adapter gets an (unused, zero) slot on dec.conv_pre
    lora = LoRAConfig(r=rank, lora_alpha=float(rank), target_modules=tuple(targets) or EXTRACT_TARGETS["dec"][:1],
                      full_delta_modules=tuple(full))
    names = ", ".join(i.name for i in infos) or "no adapter"
    return SlotLayout(f"sized for {names}", lora, rank, setting="build the model with every adapter it will "
                      "load (adapters=[...]) or with serving_layout")
