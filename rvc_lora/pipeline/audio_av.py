"""Decoding and encoding through PyAV (ffmpeg's libraries, bundled in the `av` wheel): every format
libsndfile does not read (m4a/AAC, WebM/Opus, Matroska, AIFF-C, WMA, ...) and the lossy outputs
(mp3, m4a, opus).

Only the demuxers in `DEMUXERS` are allowed: ffmpeg would otherwise also open playlists (HLS, concat)
that name other files or URLs. Every header is checked (rate, channels, claimed duration) before a
sample is decoded, and decoding stops as soon as the duration cap is passed, whatever the header said.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import av
import av.container
import numpy as np
from numpy.typing import NDArray

from rvc_lora.errors import AudioError, AudioTooLongError, UnsupportedAudioError

# ffmpeg demuxer names (a name with commas is one demuxer): audio containers only
DEMUXERS = ("wav", "w64", "flac", "ogg", "mp3", "aac", "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "aiff", "caf",
            "asf", "amr", "ac3", "eac3", "au", "wv", "ape", "tta", "dts", "truehd", "mpc", "mpc8")
_OPEN_OPTIONS = {"format_whitelist": ",".join(DEMUXERS)}


@dataclass(frozen=True)
class StreamInfo:
    """What a container says about its first audio stream, before decoding."""

    duration_s: float | None
    sr: int
    channels: int
    codec: str
    container: str


@contextmanager
def _open(source: bytes | str) -> Iterator[av.container.InputContainer]:
    """An input container on `source` (bytes or a path). A path is opened here and handed over as a file object:
    given the name, ffmpeg would read `concat:a|b` or `http://...` as protocols."""
    with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as f:
        try:
            container = av.open(f, mode="r", options=_OPEN_OPTIONS, metadata_errors="ignore")
        except (av.FFmpegError, ValueError, UnicodeDecodeError) as exc:
            raise UnsupportedAudioError(f"ffmpeg: {exc}") from exc
        with container:
            yield container


def _info(container: av.container.InputContainer) -> tuple[av.AudioStream, StreamInfo]:
    stream = next(iter(container.streams.audio), None)
    if stream is None:
        raise UnsupportedAudioError(f"ffmpeg: the {container.format.name} container holds no audio stream")
    ctx = stream.codec_context
    claims = []  # every duration the container states: the largest is the one to check against a limit
    if stream.duration is not None and stream.time_base is not None:
        claims.append(float(stream.duration * stream.time_base))
    if container.duration is not None:
        claims.append(container.duration / av.time_base)
    duration = max(claims) if claims else None
    return stream, StreamInfo(duration, int(ctx.sample_rate or 0), int(ctx.layout.nb_channels if ctx.layout else 0),
                              ctx.name, container.format.name)


def probe(source: bytes | str) -> StreamInfo:
    """The first audio stream's header values; decodes nothing. UnsupportedAudioError when ffmpeg cannot open it."""
    with _open(source) as container:
        return _info(container)[1]


def decode(source: bytes | str, check: Callable[[StreamInfo], None], cap_s: float) -> tuple[NDArray[np.float32], int]:
    """Decode the first audio stream -> (mono float32 `[N]`, rate Hz). `check` sees the header first (it raises
    to refuse); more than `cap_s` seconds of decoded samples raise `AudioTooLongError` at once.

    Samples are converted to float by ffmpeg (`int / 2^(bits-1)`) and channels averaged in float64, as the
    libsndfile path does."""
    with _open(source) as container:
        stream, info = _info(container)
        check(info)
        cap = math.floor(cap_s * info.sr)
        to_float = av.AudioResampler(format="fltp")  # layout and rate: the first frame's
        blocks: list[NDArray[np.float32]] = []
        n = 0
        try:
            for frame in container.decode(stream):
                for planar in to_float.resample(frame):
                    block = planar.to_ndarray()  # [channels, samples]
                    blocks.append(block[0].copy() if block.shape[0] == 1 else
                                  block.mean(axis=0, dtype=np.float64).astype(np.float32))
                    n += block.shape[1]
                if n > cap:
                    raise AudioTooLongError(f"audio is longer than the limit of {cap_s:g} s")
        except (av.FFmpegError, ValueError) as exc:  # a corrupt packet, or a stream whose layout changes midway
            raise UnsupportedAudioError(f"audio stream is corrupt after {n} samples: {exc}") from exc
    if not blocks:
        raise AudioError(f"audio is empty: the {info.codec} stream decodes to 0 samples")
    return np.concatenate(blocks), info.sr


@dataclass(frozen=True)
class Encoder:
    """One lossy output: ffmpeg's muxer and codec, and the bit rate for mono speech."""

    muxer: str
    codec: str
    bit_rate: int


ENCODERS = {"mp3": Encoder("mp3", "libmp3lame", 192_000), "m4a": Encoder("ipod", "aac", 160_000),
            "opus": Encoder("ogg", "libopus", 96_000)}


def encoder_rate(fmt: str, sr: int) -> int:
    """The rate `fmt` is written at for `sr` Hz input: `sr` when the codec takes it, else the next higher rate it
    takes (mp3 and AAC have no 40 kHz; Opus runs at 8/12/16/24/48 kHz), else its highest."""
    rates = av.codec.Codec(ENCODERS[fmt].codec, "w").audio_rates
    if not rates or sr in rates:
        return sr
    higher = [r for r in rates if r > sr]
    return min(higher) if higher else max(rates)


def encode(samples: NDArray[np.float32], sr: int, fmt: str) -> bytes:
    """Mono float32 `[N]` at `sr` Hz (already at `encoder_rate(fmt, sr)`) -> `fmt` file bytes."""
    spec = ENCODERS[fmt]
    buf = io.BytesIO()
    try:
        with av.open(buf, mode="w", format=spec.muxer) as out:
            stream = out.add_stream(spec.codec, rate=sr, layout="mono")
            stream.bit_rate = spec.bit_rate
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples)[None, :], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = sr, 0, Fraction(1, sr)
            # with a pts the encoder's priming samples get negative timestamps, which the muxer records (an mp4
            # edit list) so that decoders drop them: without it AAC comes back 1024 samples late
            for packet in stream.encode(frame):  # PyAV cuts the frame to the codec's frame size and sample format
                out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
    except av.FFmpegError as exc:
        raise AudioError(f"could not encode {fmt} at {sr} Hz: {exc}") from exc
    return buf.getvalue()

