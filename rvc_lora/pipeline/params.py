"""`ConvertParams`: one conversion's parameters, named and defaulted as RVC users know them.

`BOUNDS` is the only place their ranges are written: `ConvertParams` checks against it, the HTTP form
(`service/schemas.py` `ConvertForm`) and the CLI flags (`rvc_lora/cli.py`) are generated from it, and tests
compare the form's OpenAPI schema and the CLI's refusals with it. The transpose is `f0_up_key` everywhere
(`--f0-up-key` on the command line); `pitch` names the coarse pitch tensor the synthesizer takes, never this.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from rvc_lora.errors import ParameterError
from rvc_lora.frames import SR_16K
from rvc_lora.pipeline.f0.base import F0_METHODS

MIN_RESAMPLE_SR = SR_16K  # resample_sr is 0 (the model's rate) or in [MIN_RESAMPLE_SR, its upper bound]


@dataclass(frozen=True)
class Bound:
    """A numeric parameter's closed range [lo, hi], its type and what it means (the form's description and the
    flag's help). `nullable`: None is allowed too (the default, e.g. no seed)."""

    kind: type[int] | type[float]
    lo: int | float
    hi: int | float
    help: str
    nullable: bool = False

    def expected(self) -> str:
        """What a valid value is, e.g. "an integer in [-48, 48]"."""
        what = "an integer" if self.kind is int else "a number"
        return f"{what} in [{self.lo}, {self.hi}]{' or None' if self.nullable else ''}"

    def problem(self, name: str, value: object) -> str | None:
        """Why `value` is not a valid `name`, or None."""
        if value is None and self.nullable:
            return None
        allowed = int if self.kind is int else (int, float)
        if isinstance(value, allowed) and not isinstance(value, bool) and math.isfinite(value) \
                and self.lo <= value <= self.hi:
            return None
        return f"{name} must be {self.expected()}, got {value!r}"


BOUNDS: dict[str, Bound] = {
    "sid": Bound(int, 0, 1 << 20, "speaker id (row of the model's emb_g); must be below the model's speaker count"),
    "f0_up_key": Bound(int, -48, 48, "transpose in semitones"),
    "index_rate": Bound(float, 0.0, 1.0, "share of retrieved features (0: index off; needs an index)"),
    "filter_radius": Bound(int, 0, 7, "median filter on harvest's f0 (>= 3 applies it)"),
    "rms_mix_rate": Bound(float, 0.0, 1.0, "loudness envelope: 1 as converted, 0 as the input"),
    "protect": Bound(float, 0.0, 0.5, "consonant protection (0.5: off)"),
    "resample_sr": Bound(int, 0, 192000, f"output rate in Hz: 0 (the model's rate) or {MIN_RESAMPLE_SR} and up"),
    "seed": Bound(int, 0, 2**32 - 1, "fixes the synthesizer's noise: same seed, same output (exact as a JSON number)",
                  nullable=True),
}


@dataclass(frozen=True)
class ConvertParams:
    """RVC WebUI's single-conversion parameters (defaults as its single-file tab) plus `seed`; ranges in `BOUNDS`.

    f0_method: pm, harvest, rmvpe, fcpe, crepe or crepe-tiny, None = the best available (rmvpe when its weights
    are configured, else fcpe, else pm: `default_f0_method`); seed: `torch.manual_seed(seed)` before the first
    chunk (None = don't touch the generator).
    """

    sid: int = 0
    f0_up_key: int = 0
    f0_method: str | None = None
    index_rate: float = 0.75
    filter_radius: int = 3
    rms_mix_rate: float = 0.25
    protect: float = 0.33
    resample_sr: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, bound in BOUNDS.items():
            if (problem := bound.problem(name, getattr(self, name))) is not None:
                raise ParameterError(problem)
        if 0 < self.resample_sr < MIN_RESAMPLE_SR:
            raise ParameterError(f"resample_sr must be 0 (model rate) or in [{MIN_RESAMPLE_SR}, "
                                 f"{BOUNDS['resample_sr'].hi}], got {self.resample_sr!r}")
        if self.f0_method is not None and self.f0_method not in F0_METHODS:
            raise ParameterError(f"unknown f0_method {self.f0_method!r}; valid: {', '.join(F0_METHODS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(ConvertParams)}
