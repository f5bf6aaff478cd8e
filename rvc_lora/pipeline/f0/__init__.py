"""Pitch extractors behind one interface, by RVC's `f0_method` names: pm, harvest, rmvpe, fcpe."""

from rvc_lora.pipeline.f0.base import (
    F0_MAX,
    F0_METHODS,
    F0_MIN,
    HOP,
    SR,
    F0Extractor,
    clear_f0_cache,
    get_f0_extractor,
)
from rvc_lora.pipeline.f0.given import f0_curve_from_table, overlay_f0, read_f0_file

__all__ = [
    "F0_MAX",
    "F0_METHODS",
    "F0_MIN",
    "HOP",
    "SR",
    "F0Extractor",
    "clear_f0_cache",
    "f0_curve_from_table",
    "get_f0_extractor",
    "overlay_f0",
    "read_f0_file",
]
