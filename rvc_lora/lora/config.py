"""`LoRAConfig`: which layers get low-rank adapters, at what rank and scale, and which parameters
take whole-tensor ("full") deltas. Validated on construction so a bad value fails where it is made."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from rvc_lora.errors import ConfigError


def _patterns(field_name: str, value: object, *, allow_empty: bool) -> tuple[str, ...]:
    # A bare str is a Sequence of 1-char strs: "ups" would silently become ("u", "p", "s").
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"LoRAConfig.{field_name} must be a list of name patterns, got {value!r}")
    if not value and not allow_empty:
        raise ConfigError(f"LoRAConfig.{field_name} must name at least one module, got {value!r}")
    for pattern in value:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"LoRAConfig.{field_name} entries must be non-empty str, got {pattern!r}")
        if "" in pattern.split("."):  # "dec..ups" or ".ups" can never match a qualified name
            raise ConfigError(f"LoRAConfig.{field_name} entry {pattern!r} has an empty dotted component")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class LoRAConfig:
    """LoRA hyper-parameters.

    r: rank of every adapter (>= 1); lora_alpha: scale numerator, the update is `alpha / r * B @ A`;
    target_modules: name patterns of the layers to wrap (see `rvc_lora.lora.inject.name_matches`);
    lora_dropout: dropout on the LoRA branch input, training only, in [0, 1);
    full_delta_modules: name patterns of parameters adapted by a whole-tensor delta (biases, norms,
    embeddings) instead of a low-rank one. Sequences are stored as tuples (hashable, immutable).
    """

    r: int
    lora_alpha: float
    target_modules: Sequence[str]  # stored as tuple[str, ...]; Sequence so callers may pass a list
    lora_dropout: float = 0.0
    full_delta_modules: Sequence[str] = ()  # stored as tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRAConfig.r must be an int >= 1, got {self.r!r}")
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ConfigError(f"LoRAConfig.lora_alpha must be a finite number > 0, got {alpha!r}")
        p = self.lora_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ConfigError(f"LoRAConfig.lora_dropout must be in [0, 1), got {p!r}")
        # frozen dataclass: normalised values go in through object.__setattr__
        object.__setattr__(self, "target_modules", _patterns("target_modules", self.target_modules, allow_empty=False))
        full = _patterns("full_delta_modules", self.full_delta_modules, allow_empty=True)
        object.__setattr__(self, "full_delta_modules", full)
        object.__setattr__(self, "lora_alpha", float(alpha))
        object.__setattr__(self, "lora_dropout", float(p))

    @property
    def scaling(self) -> float:
        """`lora_alpha / r`: the factor folded into `lora_B` when an adapter is loaded."""
        return self.lora_alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists), the inverse of `from_dict`."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoRAConfig:
        """Build from `to_dict()` output (e.g. adapter metadata); unknown or missing keys raise `ConfigError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"LoRAConfig has no field(s) {unknown}")
        missing = sorted({"r", "lora_alpha", "target_modules"} - set(data))
        if missing:
            raise ConfigError(f"LoRAConfig is missing required field(s) {missing}")
        return cls(**data)
