"""`ConvertParams`: one conversion's parameters, named and defaulted as RVC users know them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from rvc_lora.errors import ParameterError
from rvc_lora.pipeline.f0.base import F0_METHODS

MAX_TRANSPOSE = 48  # semitones: four octaves either way is already far outside any voice
MAX_RESAMPLE_SR = 192000


@dataclass(frozen=True)
class ConvertParams:
    """RVC WebUI's single-conversion parameters (defaults as its single-file tab) plus `seed`.

    sid: speaker row of the model's `emb_g`; f0_up_key: transpose in semitones; f0_method: pm, harvest,
    rmvpe, fcpe, crepe or crepe-tiny, None = the best available (rmvpe when its weights are configured,
    else fcpe, else pm: `default_f0_method`); index_rate: share of retrieved features (0 = index off);
    filter_radius: harvest's median filter switch (> 2 = on); rms_mix_rate: 1 keeps the output's loudness
    envelope, 0 takes the input's; protect: consonant protection (0.5 = off); resample_sr: output rate (0 = model rate);
    seed: `torch.manual_seed(seed)` before the first chunk (None = don't touch the generator).
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
        def integer(name: str, lo: int, hi: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ParameterError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")

        def fraction(name: str, hi: float = 1.0) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0.0 <= value <= hi:
                raise ParameterError(f"{name} must be a number in [0, {hi}], got {value!r}")

        integer("sid", 0, 1 << 20)
        integer("f0_up_key", -MAX_TRANSPOSE, MAX_TRANSPOSE)
        integer("filter_radius", 0, 7)
        fraction("index_rate")
        fraction("rms_mix_rate")
        fraction("protect", 0.5)
        if self.f0_method is not None and self.f0_method not in F0_METHODS:
            raise ParameterError(f"unknown f0_method {self.f0_method!r}; valid: {', '.join(F0_METHODS)}")
        if isinstance(self.resample_sr, bool) or not isinstance(self.resample_sr, int) \
                or not (self.resample_sr == 0 or 16000 <= self.resample_sr <= MAX_RESAMPLE_SR):
            raise ParameterError(f"resample_sr must be 0 (model rate) or in [16000, {MAX_RESAMPLE_SR}], "
                                 f"got {self.resample_sr!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ParameterError(f"seed must be an integer in [0, 2**63) or None, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
