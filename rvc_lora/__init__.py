"""rvc_lora: RVC-compatible synthesizers with hot-swappable LoRA adapters (pure PyTorch).

The audio pipeline (`VoiceConverter`, `ConvertParams`) and adapter extraction (`extract_adapter`) are
imported on first use: they pull in transformers and faiss, which a model-only user does not need.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from rvc_lora.adapters import Adapter, AdapterInfo, load_adapter
from rvc_lora.checkpoint import (
    RVCCheckpoint,
    base_fingerprint,
    load_rvc_checkpoint,
    read_rvc_checkpoint,
    save_rvc_checkpoint,
)
from rvc_lora.compat import GeneratorLoRA, create_synthesizer_lora_from_pretrained
from rvc_lora.config import SynthConfig
from rvc_lora.errors import (
    AdapterError,
    AdapterMismatchError,
    AdapterNotFoundError,
    AudioError,
    CheckpointError,
    ConfigError,
    IndexFileError,
    ModelUnavailableError,
    ParameterError,
    RVCLoraError,
    UnsupportedAudioError,
)
from rvc_lora.lora import (
    LoRAConfig,
    LoRAConv1d,
    LoRAConvTranspose1d,
    LoRAEmbedding,
    LoRALinear,
    inject_lora,
    load_lora_weights,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)
from rvc_lora.models.generator import Generator, GeneratorNSF
from rvc_lora.models.resblock import ResBlock1, ResBlock2
from rvc_lora.models.synthesizer import (
    RVCSynthesizer,
    SynthesizerTrnMs256NSFsid,
    SynthesizerTrnMs256NSFsid_nono,
    SynthesizerTrnMs768NSFsid,
    SynthesizerTrnMs768NSFsid_nono,
    build_synthesizer,
)
from rvc_lora.voice import (
    LIBRARY_LAYOUT,
    PreparedAdapter,
    SlotLayout,
    SynthesizerLoRA,
    load_synthesizer_with_lora,
    load_voice_model,
    save_adapter,
    serving_layout,
)

_LAZY = {"VoiceConverter": "rvc_lora.pipeline.converter", "ConversionResult": "rvc_lora.pipeline.converter",
         "ConvertParams": "rvc_lora.pipeline.params", "extract_adapter": "rvc_lora.extract",
         "ExtractionResult": "rvc_lora.extract", "ExtractionReport": "rvc_lora.extract"}

if TYPE_CHECKING:
    from rvc_lora.extract import ExtractionReport, ExtractionResult, extract_adapter
    from rvc_lora.pipeline.converter import ConversionResult, VoiceConverter
    from rvc_lora.pipeline.params import ConvertParams


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rvc_lora' has no attribute {name!r}")


__all__ = [
    "ConversionResult", "ConvertParams", "ExtractionReport", "ExtractionResult", "VoiceConverter", "extract_adapter",
    "Adapter", "AdapterError", "AdapterInfo", "AdapterMismatchError", "AdapterNotFoundError", "AudioError",
    "CheckpointError", "ConfigError", "LIBRARY_LAYOUT", "PreparedAdapter", "SlotLayout", "load_voice_model",
    "serving_layout", "Generator", "GeneratorLoRA", "GeneratorNSF", "IndexFileError", "LoRAConfig",
    "LoRAConv1d", "LoRAConvTranspose1d", "LoRAEmbedding", "LoRALinear", "ModelUnavailableError", "ParameterError",
    "RVCCheckpoint", "RVCLoraError", "RVCSynthesizer", "ResBlock1", "ResBlock2", "SynthConfig", "SynthesizerLoRA",
    "SynthesizerTrnMs256NSFsid", "SynthesizerTrnMs256NSFsid_nono", "SynthesizerTrnMs768NSFsid",
    "SynthesizerTrnMs768NSFsid_nono", "UnsupportedAudioError", "base_fingerprint", "build_synthesizer",
    "create_synthesizer_lora_from_pretrained", "inject_lora", "load_adapter", "load_lora_weights",
    "load_rvc_checkpoint", "load_synthesizer_with_lora", "lora_state_dict", "merge_lora", "read_rvc_checkpoint",
    "save_adapter", "save_rvc_checkpoint", "unmerge_lora",
]
