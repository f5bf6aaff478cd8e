"""`SynthConfig`: RVC's 18-item positional `config` list as a typed, frozen dataclass."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from rvc_lora.errors import ConfigError

N_LISTED = 18  # spec_channels .. sr: the length of `cpt["config"]`
SR_NAMES = {"32k": 32000, "40k": 40000, "48k": 48000}
Version = Literal["v1", "v2"]
MAX_LAYERS = 64  # RVC's encoder has 6: a bound on the modules a config (e.g. an uploaded file's) makes us build
MAX_STAGES = 16  # RVC has 3 resblock kernels of 3 dilations and 4-5 upsample stages


def parse_sr(value: object, *, field_name: str = "sr") -> int:
    """RVC writes the rate as an int (config[17]) or as "32k"/"40k"/"48k" (`cpt["sr"]`): both give Hz."""
    if isinstance(value, str) and value in SR_NAMES:
        return SR_NAMES[value]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{field_name}: expected a positive int in Hz or one of {sorted(SR_NAMES)}, got {value!r}")
    return value


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _thaw(value: Any) -> Any:
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class SynthConfig:
    """One RVC synthesizer's hyper-parameters; fields 0..17 follow `cpt["config"]` in order.

    `version` ("v1": 256-d content, "v2": 768-d) and `f0` (NSF decoder with pitch or not) are not
    in the list: RVC keeps them as separate checkpoint keys.
    """

    spec_channels: int
    segment_size: int
    inter_channels: int
    hidden_channels: int
    filter_channels: int
    n_heads: int
    n_layers: int
    kernel_size: int
    p_dropout: float
    resblock: str
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    upsample_rates: tuple[int, ...]
    upsample_initial_channel: int
    upsample_kernel_sizes: tuple[int, ...]
    spk_embed_dim: int
    gin_channels: int
    sr: int
    version: Version = field(default="v2", kw_only=True)
    f0: bool = field(default=True, kw_only=True)

    def __post_init__(self) -> None:
        ints = ("spec_channels", "segment_size", "inter_channels", "hidden_channels", "filter_channels", "n_heads",
                "n_layers", "kernel_size", "upsample_initial_channel", "spk_embed_dim", "gin_channels")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config.{name}: expected a positive int, got {value!r}")
        if self.n_layers > MAX_LAYERS:
            raise ConfigError(f"config.n_layers: {self.n_layers} is more than {MAX_LAYERS} (RVC uses 6)")
        stages = (self.resblock_kernel_sizes, self.upsample_rates, *self.resblock_dilation_sizes)
        if any(isinstance(x, tuple) and len(x) > MAX_STAGES for x in stages):
            raise ConfigError(f"config: more than {MAX_STAGES} resblock kernels, dilations or upsample stages")
        if self.hidden_channels % self.n_heads:
            raise ConfigError(f"config.hidden_channels ({self.hidden_channels}) is not divisible by "
                              f"n_heads ({self.n_heads})")
        if self.inter_channels % 2:
            raise ConfigError(f"config.inter_channels must be even (the flow splits it), got {self.inter_channels}")
        if not isinstance(self.p_dropout, (int, float)) or not 0 <= self.p_dropout < 1:
            raise ConfigError(f"config.p_dropout: expected 0 <= p < 1, got {self.p_dropout!r}")
        if not isinstance(self.resblock, str):
            raise ConfigError(f"config.resblock: expected the string '1' or '2', got {self.resblock!r}")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes) or not self.resblock_kernel_sizes:
            raise ConfigError("config.resblock_kernel_sizes and resblock_dilation_sizes must be non-empty and of "
                              f"equal length, got {self.resblock_kernel_sizes} / {self.resblock_dilation_sizes}")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes) or not self.upsample_rates:
            raise ConfigError("config.upsample_rates and upsample_kernel_sizes must be non-empty and of equal "
                              f"length, got {self.upsample_rates} / {self.upsample_kernel_sizes}")
        if self.upsample_initial_channel >> len(self.upsample_rates) < 1:
            raise ConfigError(f"config.upsample_initial_channel ({self.upsample_initial_channel}) leaves no channels "
                              f"after {len(self.upsample_rates)} halving upsample stages")
        if self.version not in ("v1", "v2"):
            raise ConfigError(f"version: expected 'v1' or 'v2', got {self.version!r}")
        object.__setattr__(self, "sr", parse_sr(self.sr, field_name="config.sr"))

    @classmethod
    def from_list(cls, values: Sequence[Any], *, version: str = "v2", f0: bool = True) -> SynthConfig:
        """Build from RVC's positional list (`cpt["config"]`); lists become tuples so the config is hashable."""
        if not isinstance(values, (list, tuple)) or len(values) != N_LISTED:
            n = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise ConfigError(f"config has {n} entries, expected {N_LISTED}")
        if version not in ("v1", "v2"):
            raise ConfigError(f"version: expected 'v1' or 'v2', got {version!r}")
        frozen = [_freeze(v) for v in values]
        try:
            return cls(*frozen, version=version, f0=bool(f0))  # type: ignore[arg-type]
        except TypeError as exc:  # e.g. a nested list where an int belongs
            raise ConfigError(f"config list is malformed: {exc}") from exc

    def to_list(self) -> list[Any]:
        """The exact inverse of `from_list`: RVC's positional list, tuples back to lists."""
        return [_thaw(getattr(self, f.name)) for f in fields(self)[:N_LISTED]]

    def replace(self, **changes: Any) -> SynthConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SynthConfig(**values)

    @property
    def content_dim(self) -> int:
        """Width of the content features `phone`: 256 for v1 (HuBERT final_proj), 768 for v2 (layer 12)."""
        return 256 if self.version == "v1" else 768

    @property
    def upp(self) -> int:
        """Audio samples per content frame, a Python int (RVC: `math.prod(upsample_rates)`)."""
        return math.prod(self.upsample_rates)

    @property
    def class_name(self) -> str:
        """RVC's class name for this (version, f0) pair."""
        width = "256" if self.version == "v1" else "768"
        return f"SynthesizerTrnMs{width}NSFsid" + ("" if self.f0 else "_nono")
