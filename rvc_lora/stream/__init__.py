"""Realtime (streaming) conversion: RVC's block-by-block algorithm (spec §6), one `StreamConverter` per stream.

`StreamConverter` and `StreamBlock` are imported on first use (they pull in the audio pipeline)."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from rvc_lora.stream.params import HOT_FIELDS, StreamParams
from rvc_lora.stream.sizes import StreamSizes

if TYPE_CHECKING:
    from rvc_lora.stream.converter import StreamBlock, StreamConverter

_LAZY = {"StreamBlock": "rvc_lora.stream.converter", "StreamConverter": "rvc_lora.stream.converter"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rvc_lora.stream' has no attribute {name!r}")


__all__ = ["HOT_FIELDS", "StreamBlock", "StreamConverter", "StreamParams", "StreamSizes"]
