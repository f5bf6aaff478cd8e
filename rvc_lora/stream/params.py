"""`StreamParams`: one realtime stream's settings, named and defaulted as RVC's realtime GUI (spec §6.2)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from rvc_lora.errors import ParameterError
from rvc_lora.pipeline.f0.base import F0_METHODS
from rvc_lora.pipeline.params import BOUNDS

# Settings that change from the next block on without resetting the stream (RVC's `event_handler`);
# every other change needs a new stream (RVC stops and restarts, rebuilding all state).
HOT_FIELDS = ("f0_up_key", "formant", "index_rate", "threshold", "rms_mix_rate", "f0_method")
GATE_OFF_DB = -60  # the gate is active only above this threshold (RVC's slider minimum)


@dataclass(frozen=True)
class StreamParams:
    """RVC's realtime parameters (GUI `GUIConfig` defaults, f0 `pm` so that nothing needs a model file).

    block_time: seconds per block (0.02-1.5); crossfade_time: lookahead and crossfade (0.01-0.15);
    extra_time: left context given to the content encoder (0.05-5); threshold: noise gate in dB
    (-60 = off, up to 0); f0_up_key: transpose in semitones; formant: formant shift in semitones (-2..2);
    f0_method: pm, harvest, rmvpe or fcpe; index_rate: share of retrieved features (0 = index off);
    rms_mix_rate: 1 keeps the output's loudness, 0 copies the input's envelope; seed: the stream's own
    generator is seeded with it once before block 0 (None: a fresh random seed per stream).
    """

    block_time: float = 0.25
    crossfade_time: float = 0.05
    extra_time: float = 2.5
    threshold: float = GATE_OFF_DB
    f0_up_key: int = 0
    formant: float = 0.0
    f0_method: str = "pm"
    index_rate: float = 0.0
    rms_mix_rate: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        def number(name: str, lo: float, hi: float) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not lo <= value <= hi:
                raise ParameterError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")

        number("block_time", 0.02, 1.5)
        number("crossfade_time", 0.01, 0.15)
        number("extra_time", 0.05, 5.0)
        number("threshold", GATE_OFF_DB, 0)
        number("formant", -2.0, 2.0)
        for name in ("index_rate", "rms_mix_rate", "f0_up_key", "seed"):  # shared with ConvertParams: its bounds
            if (problem := BOUNDS[name].problem(name, getattr(self, name))) is not None:
                raise ParameterError(problem)
        if self.f0_method not in F0_METHODS:
            raise ParameterError(f"unknown f0_method {self.f0_method!r}; valid: {', '.join(F0_METHODS)}")

    @property
    def gate_on(self) -> bool:
        return self.threshold > GATE_OFF_DB

    def with_hot(self, **changes: Any) -> StreamParams:
        """These parameters with hot settings changed (validated); a cold one raises `ParameterError`."""
        cold = sorted(set(changes) - set(HOT_FIELDS))
        if cold:
            raise ParameterError(f"{', '.join(cold)} cannot change mid-stream (only {', '.join(HOT_FIELDS)} can); "
                                 "open a new stream")
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamParams:
        """Build from a mapping; an unknown key raises `ParameterError` naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ParameterError(f"unknown stream parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
