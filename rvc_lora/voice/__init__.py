"""The voice model: the LoRA-wrapped synthesizer, its slot layouts, fit checks, loaders and fast swaps.

Everything that builds a model with LoRA slots (the CLI, `VoiceConverter.from_files`, extraction, training,
the service) builds it here, so that what one writes the others load.
"""

from rvc_lora.voice.bank import AdapterBank, Slot
from rvc_lora.voice.batch import SynthRow, make_row, synthesize_rows
from rvc_lora.voice.layout import (
    DEFAULT_EXTRACT_METHOD,
    DEFAULT_EXTRACT_RANK,
    DEFAULT_EXTRACT_TARGETS,
    DEFAULT_SERVING_RANK,
    EXTRACT_METHODS,
    EXTRACT_TARGETS,
    FULL_DELTA_PATTERNS,
    LIBRARY_LAYOUT,
    ExtractMethod,
    SlotLayout,
    Targets,
    adapter_layout,
    layout_holding,
    serving_layout,
)
from rvc_lora.voice.model import (
    SynthesizerLoRA,
    build_voice_model,
    load_synthesizer_with_lora,
    load_voice_model,
    save_adapter,
)
from rvc_lora.voice.slots import PreparedAdapter, ResidentSlots, SlotKey

__all__ = [
    "AdapterBank", "DEFAULT_EXTRACT_METHOD", "DEFAULT_EXTRACT_RANK", "DEFAULT_EXTRACT_TARGETS",
    "DEFAULT_SERVING_RANK", "EXTRACT_METHODS", "EXTRACT_TARGETS", "ExtractMethod", "FULL_DELTA_PATTERNS",
    "LIBRARY_LAYOUT", "PreparedAdapter", "ResidentSlots", "Slot", "SlotKey", "SlotLayout", "SynthRow",
    "SynthesizerLoRA", "Targets", "adapter_layout", "build_voice_model", "layout_holding",
    "load_synthesizer_with_lora", "load_voice_model", "make_row", "save_adapter", "serving_layout",
    "synthesize_rows",
]
