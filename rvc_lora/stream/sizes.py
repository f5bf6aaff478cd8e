"""RVC's derived realtime buffer sizes (spec §6.3): every buffer is a whole number of 10 ms frames."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rvc_lora.errors import ParameterError
from rvc_lora.frames import HOP_16K
from rvc_lora.stream.params import StreamParams

MAX_SOLA_FRAMES = 4  # the SOLA template and the fades are at most 40 ms
F0_EDGE = 800  # f0 window = newest block + 50 ms
RMVPE_CHUNK = 5120  # rmvpe's window is a multiple of 32 mel frames, minus one hop


def frames_of(time_s: float, sr: int, zc: int) -> int:
    """`int(round(time * sr / zc)) * zc`: a time quantised to whole frames, half to even (numpy's round)."""
    return int(np.round(time_s * sr / zc)) * zc


@dataclass(frozen=True, slots=True)
class StreamSizes:
    """Sizes in samples at the stream rate `sr` (unless named `_16k`) and in frames (`skip_head`, `return_length`).

    `input_wav` (the history) holds `extra | crossfade | zc | block` samples, newest last; the synthesizer
    decodes `return_length` frames from `skip_head` on: the block, the SOLA buffer and the search span."""

    sr: int
    tgt_sr: int
    zc: int
    block_frame: int
    block_frame_16k: int
    crossfade_frame: int
    sola_buffer_frame: int
    sola_search_frame: int
    extra_frame: int
    input_wav_len: int
    input_wav_res_len: int
    skip_head: int
    return_length: int
    f0_window: int
    f0_window_rmvpe: int

    @classmethod
    def derive(cls, params: StreamParams, sr: int, tgt_sr: int) -> StreamSizes:
        """Sizes for a stream at `sr` Hz (a multiple of 100) into a model at `tgt_sr` Hz."""
        if isinstance(sr, bool) or not isinstance(sr, int) or sr < 8000 or sr % 100:
            # zc samples must resample to exactly 160 at 16 kHz (RVC fails with a shape error otherwise)
            raise ParameterError(f"stream sample rate must be a multiple of 100 Hz, >= 8000, got {sr!r}")
        zc = sr // 100
        block = frames_of(params.block_time, sr, zc)
        crossfade = frames_of(params.crossfade_time, sr, zc)
        extra = frames_of(params.extra_time, sr, zc)
        sola_buffer = min(crossfade, MAX_SOLA_FRAMES * zc)
        input_len = extra + crossfade + zc + block
        block_16k = HOP_16K * block // zc
        window = block_16k + F0_EDGE
        return cls(
            sr=sr, tgt_sr=tgt_sr, zc=zc, block_frame=block, block_frame_16k=block_16k, crossfade_frame=crossfade,
            sola_buffer_frame=sola_buffer, sola_search_frame=zc, extra_frame=extra, input_wav_len=input_len,
            input_wav_res_len=HOP_16K * input_len // zc, skip_head=extra // zc,
            return_length=(block + sola_buffer + zc) // zc, f0_window=window,
            f0_window_rmvpe=RMVPE_CHUNK * ((window - 1) // RMVPE_CHUNK + 1) - HOP_16K,
        )

    @property
    def frames(self) -> int:
        """M: 10 ms frames in the history, the synthesizer's `p_len`."""
        return self.input_wav_len // self.zc

    @property
    def shift(self) -> int:
        """f0 cache frames per block."""
        return self.block_frame_16k // HOP_16K

    @property
    def upp(self) -> int:
        """Samples per frame at the model rate."""
        return self.tgt_sr // 100

    def f0_window_for(self, method: str) -> int:
        return self.f0_window_rmvpe if method == "rmvpe" else self.f0_window

    def formant(self, semitones: float) -> tuple[float, int, int]:
        """(factor, return_length2, upp_res): the decoder length and samples per frame before the formant
        resample, `ceil(return_length * factor)` and `floor(factor * tgt_sr // 100)`."""
        factor = 2 ** (semitones / 12)
        return factor, int(math.ceil(self.return_length * factor)), int(math.floor(factor * self.tgt_sr // 100))

    @property
    def latency_samples(self) -> int:
        """Algorithmic delay at SOLA offset 0 (§6.8): output lags input by `crossfade + zc - offset` samples."""
        return self.crossfade_frame + self.zc
