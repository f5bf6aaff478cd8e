"""Pitch extractors behind one interface, by RVC's `f0_method` names: pm, harvest, rmvpe, fcpe, crepe,
crepe-tiny."""

from rvc_lora.pipeline.f0.base import (
    F0_MAX,
    F0_METHODS,
    F0_MIN,
    F0Extractor,
    F0Method,
    available_f0_methods,
    clear_f0_cache,
    default_f0_method,
    f0_method_problem,
    get_f0_extractor,
    preferred_f0_method,
)
from rvc_lora.pipeline.f0.given import f0_curve_from_table, overlay_f0, read_f0_file

__all__ = [
    "F0_MAX",
    "F0_METHODS",
    "F0_MIN",
    "F0Extractor",
    "F0Method",
    "available_f0_methods",
    "clear_f0_cache",
    "default_f0_method",
    "f0_method_problem",
    "f0_curve_from_table",
    "get_f0_extractor",
    "overlay_f0",
    "preferred_f0_method",
    "read_f0_file",
]
