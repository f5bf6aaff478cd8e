"""Audio in and out: decode (soundfile), resample (soxr), RVC's peak normalisation, encode.

RVC decodes with the ffmpeg CLI straight to 16 kHz mono float32 (spec §3.1). Here libsndfile decodes
(WAV 8/16/24/32-bit int and float, FLAC, OGG Vorbis/Opus, MP3 with libsndfile >= 1.1), channels are
averaged to mono, and soxr resamples. For a 16 kHz mono PCM16 file both give exactly `int16 / 32768`;
other rates and channel layouts differ from ffmpeg's resampler by resampling error only.

Every failure is typed: `UnsupportedAudioError` when the bytes cannot be decoded, `AudioTooLongError`
past a duration cap, `AudioError` for empty, silent, too short, non-finite or absurd-header input.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import soundfile as sf
import soxr
from numpy.typing import ArrayLike, NDArray

from rvc_lora.errors import AudioError, AudioTooLongError, ParameterError, UnsupportedAudioError

AudioSource = bytes | bytearray | memoryview | str | os.PathLike[str]

SR_16K = 16000  # the rate of RVC's whole front-end (f0, content features, cut points)
MIN_DURATION_S = 0.1  # shorter input is rejected with a clear error rather than converted to near nothing
# The conversion itself (`prepare_16k`) follows RVC: 400 samples at 16 kHz is the content encoder's first
# frame; below that, RVC's trimmed output is empty and its rms/int16 steps fail on it.
MIN_SAMPLES_16K = 400
PEAK_TARGET = 0.95  # RVC's vc_single: peaks above 0.95 are scaled down to exactly 0.95
INT16_PEAK = 0.99  # RVC's final int16 rule: peaks above 0.99 are scaled down to 0.99
MIN_SAMPLE_RATE = 1000  # header sanity bounds: outside them the header is broken or hostile
MAX_SAMPLE_RATE = 768000
MAX_CHANNELS = 64
MAX_DECLARED_S = 24 * 3600.0  # a header claiming more than a day of audio is not trusted (e.g. 2^36 FLAC frames)
UNKNOWN_FRAMES = 2**63 - 1  # libsndfile's frame count when the header leaves the length open
_BLOCK_FRAMES = 1 << 16  # decode in blocks: never allocate what a header merely claims

EncodeFormat = Literal["wav", "flac", "ogg"]
EncodeSubtype = Literal["PCM_16", "FLOAT"]
_FORMATS: dict[str, str] = {"wav": "WAV", "flac": "FLAC", "ogg": "OGG"}


@contextmanager
def _open(source: AudioSource) -> Iterator[sf.SoundFile]:
    """Open `source` (bytes or path) for reading; any libsndfile refusal becomes UnsupportedAudioError."""
    handle: str | io.BytesIO
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise AudioError("audio is empty: 0 bytes received")
        name, handle = "audio bytes", io.BytesIO(bytes(source))
    else:
        name = handle = os.fspath(source)
        if not os.path.isfile(name):
            raise AudioError(f"audio file {name!r} does not exist or is not a file")
        if os.path.getsize(name) == 0:
            raise AudioError(f"audio file {name!r} is empty: 0 bytes")
    try:
        f = sf.SoundFile(handle)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise UnsupportedAudioError(f"{name}: not a decodable audio file (WAV, FLAC, OGG or MP3): {exc}") from exc
    with f:
        _check_header(name, f.samplerate, f.channels, f.frames)
        yield f


def _check_header(name: str, sr: int, channels: int, frames: int) -> None:
    """Reject headers no real recording has, before anything is allocated from them."""
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioError(f"{name}: header declares {sr} Hz, outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"{name}: header declares {channels} channels, expected 1..{MAX_CHANNELS}")
    if frames != UNKNOWN_FRAMES and (frames < 0 or frames / sr > MAX_DECLARED_S):
        raise AudioError(f"{name}: header declares {frames} frames ({frames / sr / 3600:.1f} h), not a plausible file")


def probe_duration(source: AudioSource) -> tuple[float | None, int, int]:
    """Header-only look at `source` -> (duration seconds, sample rate Hz, channels); decodes nothing.

    For a cheap size/duration check before `decode_audio`. The duration is None where the header does not
    say (a FLAC streamed without its total length); MP3 durations come from libsndfile's frame scan and can
    be off by a frame or so. Raises like `decode_audio` for undecodable headers."""
    with _open(source) as f:
        duration = None if f.frames == UNKNOWN_FRAMES else f.frames / f.samplerate
        return duration, int(f.samplerate), int(f.channels)


def decode_audio(source: AudioSource, *, max_duration_s: float | None = None) -> tuple[NDArray[np.float32], int]:
    """Decode a whole file (bytes or path) -> (mono float32 `[N]` in about [-1, 1], sample rate Hz).

    Integer PCM maps to `int / 2^(bits-1)` (8-bit unsigned WAV is centred first); float files keep
    their values. Several channels are averaged to mono (mean in float64, then float32) block by block,
    so memory follows the mono length whatever the channel count. Raises
    `AudioTooLongError` as soon as more than `max_duration_s` seconds have been decoded, and
    `AudioError` for empty, silent, too short (< 0.1 s) or non-finite content."""
    with _open(source) as f:
        sr, channels = int(f.samplerate), int(f.channels)
        if max_duration_s is None and f.frames == UNKNOWN_FRAMES:  # nothing else bounds what a small file holds
            max_duration_s = MAX_DECLARED_S
        cap = None if max_duration_s is None else int(math.floor(max_duration_s * sr))
        blocks: list[NDArray[np.float32]] = []
        n = 0
        try:
            while True:  # block reads: a header's frame count is not an allocation size
                block = f.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
                if len(block) == 0:
                    break
                # mono files skip the mean so that PCM16 stays bit-exact int16/32768
                blocks.append(block[:, 0].copy() if channels == 1 else
                              block.mean(axis=1, dtype=np.float64).astype(np.float32))
                n += len(block)
                if cap is not None and n > cap:
                    raise AudioTooLongError(f"audio is longer than the limit of {max_duration_s:g} s")
                if len(block) < _BLOCK_FRAMES:
                    break
        except sf.LibsndfileError as exc:  # corrupt stream after a valid header
            if f.frames == UNKNOWN_FRAMES and n == 0:  # libsndfile cannot read e.g. a FLAC without its length
                raise UnsupportedAudioError("the audio header does not give its length (a streamed FLAC?), which "
                                            f"the decoder cannot read ({exc}); re-encode the file") from exc
            raise UnsupportedAudioError(f"audio stream is corrupt after {n} frames: {exc}") from exc
    mono = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    check_audio(mono, sr)
    return mono, sr


def check_audio(audio: NDArray[np.floating], sr: int) -> None:
    """Raise `AudioError` naming the problem if mono `audio` `[N]` at `sr` Hz cannot be converted:
    not 1-D, empty, NaN/inf, shorter than 0.1 s, or silent (every sample exactly 0)."""
    if audio.ndim != 1:
        raise AudioError(f"audio must be mono 1-D samples, got shape {audio.shape}")
    if sr <= 0:
        raise AudioError(f"sample rate must be positive, got {sr}")
    if audio.size == 0:
        raise AudioError("audio is empty: it decodes to 0 samples")
    if not np.isfinite(audio).all():
        bad = int(np.count_nonzero(~np.isfinite(audio)))
        raise AudioError(f"audio contains {bad} NaN or infinite samples")
    if audio.size < MIN_DURATION_S * sr:
        raise AudioError(f"audio is too short: {audio.size / sr:.3f} s, at least {MIN_DURATION_S} s needed")
    if not np.any(audio):
        raise AudioError(f"audio is silent: all {audio.size} samples are 0")


def resample(audio: NDArray[np.floating], sr_in: int, sr_out: int) -> NDArray[np.floating]:
    """Resample mono `audio` `[N]` from `sr_in` to `sr_out` Hz -> `[ceil(N * sr_out / sr_in)]`, same dtype.

    soxr "HQ", then zero-padded/cut to `ceil(N * ratio)`: exactly what `librosa.resample` (default
    `soxr_hq`, librosa >= 0.10) returns, which is what RVC's optional `resample_sr` step calls."""
    if sr_in <= 0 or sr_out <= 0:
        raise ParameterError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    if sr_in == sr_out:
        return audio
    n_out = math.ceil(len(audio) * (float(sr_out) / sr_in))  # librosa's float ratio: 32000 -> 16001 Hz can ceil up
    out = np.asarray(soxr.resample(audio, sr_in, sr_out, quality="HQ"), dtype=audio.dtype)
    if len(out) >= n_out:  # soxr rounds the length, librosa ceils it and pads with zeros
        return out[:n_out]
    return np.concatenate([out, np.zeros(n_out - len(out), dtype=audio.dtype)])


def normalize_peak(audio: NDArray[np.float32]) -> NDArray[np.float32]:
    """RVC's input rule: if `max|x| / 0.95 > 1`, divide by it (peak becomes 0.95); else unchanged.

    float32 `[N]` -> float32 `[N]` (a new array); the ratio is formed in float32 as RVC's numpy does."""
    x: NDArray[np.float32] = np.array(audio, dtype=np.float32)  # a copy: the caller's array is left alone
    if x.size and (ratio := np.float32(np.abs(x).max()) / np.float32(PEAK_TARGET)) > 1:
        x /= ratio
    return x


def prepare_16k(audio: ArrayLike, sr: int) -> NDArray[np.float32]:
    """Mono samples at `sr` Hz -> what RVC's pipeline starts from: float32 `[ceil(N * 16000 / sr)]` at
    16 kHz, peak-normalised (`normalize_peak`).

    Accepts what RVC converts, silence included (RVC leaves it unscaled and converts it); raises
    `AudioError` for non-float, not 1-D, non-finite input, a rate <= 0, or fewer than 400 samples at 16 kHz.
    File intake (`decode_audio`) applies the stricter `check_audio` policy on top."""
    x = np.asarray(audio)
    if not np.issubdtype(x.dtype, np.floating):
        raise AudioError(f"audio samples must be float, got {x.dtype}")
    if x.ndim != 1 or sr <= 0:
        raise AudioError(f"audio must be mono 1-D samples at a positive rate, got shape {x.shape} at {sr} Hz")
    if not np.isfinite(x).all():
        raise AudioError(f"audio contains {int(np.count_nonzero(~np.isfinite(x)))} NaN or infinite samples")
    x16 = resample(x.astype(np.float32, copy=False), sr, SR_16K)
    if len(x16) < MIN_SAMPLES_16K:
        raise AudioError(f"audio is too short: {len(x16)} samples at 16 kHz, at least {MIN_SAMPLES_16K} needed "
                         "(RVC's output would be empty)")
    return normalize_peak(np.asarray(x16, dtype=np.float32))


def load_audio_16k(source: AudioSource, *, max_duration_s: float | None = None) -> NDArray[np.float32]:
    """Decode (`decode_audio`) and `prepare_16k`: bytes or path -> float32 `[N16]` at 16 kHz."""
    audio, sr = decode_audio(source, max_duration_s=max_duration_s)
    return prepare_16k(audio, sr)


def to_int16(audio: NDArray[np.floating]) -> NDArray[np.int16]:
    """RVC's final output rule: float `[N]` -> int16 `[N]`.

    `scale = 32768`, divided by `max|x| / 0.99` when that exceeds 1, then `(x * scale)` truncated
    toward zero, in float32 as RVC computes it. A clipped peak lands at 32440; |x| <= 0.99 maps to
    |v| <= 32440 unchanged in scale. NaN/inf raise `AudioError` (RVC's cast is undefined there)."""
    x = np.asarray(audio, dtype=np.float32)
    if x.size == 0:
        return np.zeros(0, dtype=np.int16)
    if not np.isfinite(x).all():
        raise AudioError("converted audio contains NaN or infinite samples")
    peak = np.float32(np.abs(x).max()) / np.float32(INT16_PEAK)
    scale = np.float32(32768)
    if peak > 1:
        scale = scale / peak
    return np.asarray(x * scale).astype(np.int16)


def encode_audio(
    audio: NDArray[np.floating] | NDArray[np.int16],
    sr: int,
    format: EncodeFormat = "wav",
    subtype: EncodeSubtype = "PCM_16",
) -> bytes:
    """Mono `audio` `[N]` at `sr` Hz -> file bytes.

    wav: `PCM_16` or `FLOAT` (32-bit). flac: `PCM_16` only. ogg: always Vorbis (`subtype` does not apply).
    int16 input is written as is for PCM_16 (and as `v / 32768` for float output); float input becomes
    PCM_16 through `to_int16` (RVC's 0.99 peak rule), so the samples equal RVC's int16 output."""
    if format not in _FORMATS:
        raise ParameterError(f"output format must be one of {sorted(_FORMATS)}, got {format!r}")
    if subtype not in ("PCM_16", "FLOAT"):
        raise ParameterError(f"output subtype must be 'PCM_16' or 'FLOAT', got {subtype!r}")
    if format == "flac" and subtype == "FLOAT":
        raise ParameterError("flac cannot store float samples: use subtype 'PCM_16' or format 'wav'")
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise ParameterError(f"output sample rate must be {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz, got {sr}")
    x = np.asarray(audio)
    if x.ndim != 1:
        raise AudioError(f"audio to encode must be mono 1-D samples, got shape {x.shape}")
    if x.dtype != np.int16 and not np.issubdtype(x.dtype, np.floating):
        raise AudioError(f"audio to encode must be float or int16 samples, got {x.dtype}")
    data: NDArray[np.int16] | NDArray[np.float32]
    if format == "ogg" or subtype == "FLOAT":
        if x.dtype == np.int16:
            data = x.astype(np.float32) / np.float32(32768)
        else:
            data = x.astype(np.float32)
            if not np.isfinite(data).all():
                raise AudioError("audio to encode contains NaN or infinite samples")
        sf_subtype = "VORBIS" if format == "ogg" else "FLOAT"
    else:
        data = x if x.dtype == np.int16 else to_int16(x)
        sf_subtype = "PCM_16"
    buf = io.BytesIO()
    sf.write(buf, data, sr, format=_FORMATS[format], subtype=sf_subtype)
    return buf.getvalue()
