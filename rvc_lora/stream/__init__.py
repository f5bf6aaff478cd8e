"""Realtime (streaming) conversion: RVC's block-by-block algorithm (spec §6), one `StreamConverter` per stream."""

from rvc_lora.stream.converter import StreamBlock, StreamConverter
from rvc_lora.stream.params import HOT_FIELDS, StreamParams
from rvc_lora.stream.sizes import StreamSizes

__all__ = ["HOT_FIELDS", "StreamBlock", "StreamConverter", "StreamParams", "StreamSizes"]
