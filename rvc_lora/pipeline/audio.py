"""Audio in and out: decode (libsndfile, else PyAV), resample (soxr), RVC's peak normalisation, encode.

RVC decodes with the ffmpeg CLI straight to 16 kHz mono float32 (spec §3.1). Here libsndfile decodes what
it reads exactly and fast (WAV 8/16/24/32-bit int and float, FLAC, OGG Vorbis/Opus, MP3, AIFF), and PyAV
(ffmpeg's libraries in the `av` wheel) everything else: m4a/AAC, WebM/Opus, Matroska, WMA, ... Channels
are averaged to mono and soxr resamples. For a 16 kHz mono PCM16 file both give exactly `int16 / 32768`;
other rates and channel layouts differ from ffmpeg's resampler by resampling error only.

The same limits hold on both paths: the header's rate, channel count and claimed duration are checked
before a sample is decoded, and decoding stops once more than the allowed duration has come out.
Every failure is typed: `UnsupportedAudioError` when the bytes cannot be decoded, `AudioTooLongError`
past a duration cap, `AudioError` for empty, silent, too short, non-finite or absurd-header input.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import soundfile as sf
import soxr
from numpy.typing import ArrayLike, NDArray

from rvc_lora.errors import AudioError, AudioTooLongError, ParameterError, UnsupportedAudioError
from rvc_lora.frames import SR_16K
from rvc_lora.pipeline import audio_av

AudioSource = bytes | bytearray | memoryview | str | os.PathLike[str]

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


@dataclass(frozen=True)
class OutputFormat:
    """A file format `encode_audio` writes: its name (CLI `--format`, HTTP `format`), file suffixes, media type."""

    name: str
    suffixes: tuple[str, ...]
    media_type: str
    lossless: bool


OUTPUT_FORMATS = {f.name: f for f in (
    OutputFormat("wav", (".wav",), "audio/wav", True),
    OutputFormat("flac", (".flac",), "audio/flac", True),
    OutputFormat("ogg", (".ogg", ".oga"), "audio/ogg", False),  # Vorbis
    OutputFormat("opus", (".opus",), "audio/ogg; codecs=opus", False),  # Opus in Ogg, as browsers record it
    OutputFormat("mp3", (".mp3",), "audio/mpeg", False),
    OutputFormat("m4a", (".m4a",), "audio/mp4", False),  # AAC
)}
EncodeFormat = Literal["wav", "flac", "ogg", "opus", "mp3", "m4a"]
EncodeSubtype = Literal["PCM_16", "FLOAT"]
_SNDFILE_FORMATS: dict[str, str] = {"wav": "WAV", "flac": "FLAC"}
# file suffixes of audio that `decode_audio` reads (for picking files out of a folder)
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".mp4", ".aac", ".webm",
                            ".mka", ".mkv", ".aif", ".aiff", ".aifc", ".caf", ".wma", ".amr", ".wv", ".w64", ".au"})


READABLE = "wav, flac, ogg, opus, mp3, m4a/aac, webm, mka, aiff, caf, wma, ..."


def format_for_suffix(suffix: str) -> str | None:
    """The output format name whose file suffix is `suffix` ('.mp3' -> 'mp3'), None when no format has it."""
    return next((f.name for f in OUTPUT_FORMATS.values() if suffix.lower() in f.suffixes), None)


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says, before decoding: duration (None when unstated), rate, channels, and which
    decoder reads it ('libsndfile' or 'ffmpeg') with its name for the format."""

    duration_s: float | None
    sr: int
    channels: int
    decoder: str
    format: str


def _load(source: AudioSource) -> tuple[bytes | str, str]:
    """`source` -> (bytes or a path string, the name to use in messages); refuses empty input, a missing file
    and a directory by name."""
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise AudioError("audio is empty: 0 bytes received")
        return bytes(source), "audio bytes"
    name = os.fspath(source)
    if os.path.isdir(name):
        raise AudioError(f"audio file {name!r} is a directory, not a file")
    if not os.path.exists(name):
        raise AudioError(f"audio file {name!r} does not exist")
    if not os.path.isfile(name):
        raise AudioError(f"audio file {name!r} is not a regular file")
    if os.path.getsize(name) == 0:
        raise AudioError(f"audio file {name!r} is empty: 0 bytes")
    return name, name


def _sndfile(data: bytes | str) -> sf.SoundFile | sf.LibsndfileError | RuntimeError | TypeError:
    """libsndfile's handle, or its refusal (kept for the message when ffmpeg refuses too)."""
    try:
        return sf.SoundFile(io.BytesIO(data) if isinstance(data, bytes) else data)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        return exc


def _ffmpeg_info(data: bytes | str, name: str, sndfile_error: Exception) -> audio_av.StreamInfo:
    try:
        return audio_av.probe(data)
    except UnsupportedAudioError as exc:
        raise UnsupportedAudioError(f"{name}: not a decodable audio file (read: {READABLE}; libsndfile: "
                                    f"{sndfile_error}; {exc})") from exc


def _check_header(name: str, sr: int, channels: int, duration_s: float | None, what: str) -> None:
    """Reject headers no real recording has, before anything is allocated from them."""
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioError(f"{name}: header declares {sr} Hz, outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"{name}: header declares {channels} channels, expected 1..{MAX_CHANNELS}")
    if duration_s is not None and not 0 <= duration_s <= MAX_DECLARED_S:
        raise AudioError(f"{name}: header declares {what} ({duration_s / 3600:.1f} h), not a plausible file")


def _check_length(duration_s: float | None, max_duration_s: float | None) -> None:
    if duration_s is not None and max_duration_s is not None and duration_s > max_duration_s:
        raise AudioTooLongError(f"audio is {duration_s:.1f} s long, the limit is {max_duration_s:g} s")


def _sndfile_info(f: sf.SoundFile, name: str) -> AudioInfo:
    sr, frames = int(f.samplerate), int(f.frames)
    duration = frames / sr if frames != UNKNOWN_FRAMES and sr > 0 else None
    _check_header(name, sr, int(f.channels), duration, f"{frames} frames")
    return AudioInfo(duration, sr, int(f.channels), "libsndfile", str(f.format))


def probe_audio(source: AudioSource) -> AudioInfo:
    """Header-only look at `source` (bytes or path): duration, rate, channels; decodes nothing.

    For cheap checks before `decode_audio` (and before loading any model). The duration is None where the
    header does not say (a FLAC streamed without its total length); for ffmpeg-read containers it is the
    largest duration the container states. Raises like `decode_audio` for undecodable or absurd headers."""
    data, name = _load(source)
    f = _sndfile(data)
    if isinstance(f, sf.SoundFile):
        with f:
            return _sndfile_info(f, name)
    info = _ffmpeg_info(data, name, f)
    _check_header(name, info.sr, info.channels, info.duration_s, f"{info.duration_s} s")
    return AudioInfo(info.duration_s, info.sr, info.channels, "ffmpeg", f"{info.container}/{info.codec}")


def decode_audio(source: AudioSource, *, max_duration_s: float | None = None) -> tuple[NDArray[np.float32], int]:
    """Decode a whole file (bytes or path) -> (mono float32 `[N]` in about [-1, 1], sample rate Hz).

    Integer PCM maps to `int / 2^(bits-1)` (8-bit unsigned WAV is centred first); float files keep
    their values. Several channels are averaged to mono (mean in float64, then float32) block by block,
    so memory follows the mono length whatever the channel count. Raises `AudioTooLongError` when the
    header claims more than `max_duration_s` seconds (before decoding) or as soon as more have been
    decoded, and `AudioError` for empty, silent, too short (< 0.1 s) or non-finite content."""
    data, name = _load(source)
    cap = MAX_DECLARED_S if max_duration_s is None else max_duration_s  # bounds what a small file can expand to
    f = _sndfile(data)
    if isinstance(f, sf.SoundFile):
        with f:
            info = _sndfile_info(f, name)
            _check_length(info.duration_s, max_duration_s)
            mono = _decode_sndfile(f, cap)
        if mono is None:  # libsndfile cannot read e.g. a FLAC without its length: ffmpeg can
            mono, sr = audio_av.decode(data, lambda i: _check_ffmpeg(name, i, max_duration_s), cap)
        else:
            sr = info.sr
    else:
        _ffmpeg_info(data, name, f)  # the combined message when neither decoder opens it
        mono, sr = audio_av.decode(data, lambda i: _check_ffmpeg(name, i, max_duration_s), cap)
    check_audio(mono, sr)
    return mono, sr


def _check_ffmpeg(name: str, info: audio_av.StreamInfo, max_duration_s: float | None) -> None:
    _check_header(name, info.sr, info.channels, info.duration_s, f"{info.duration_s} s")
    _check_length(info.duration_s, max_duration_s)


def _decode_sndfile(f: sf.SoundFile, cap_s: float) -> NDArray[np.float32] | None:
    """libsndfile's samples as mono float32 `[N]`; None when it fails before the first block of a file whose
    header leaves the length open (ffmpeg reads those)."""
    channels = int(f.channels)
    cap = int(math.floor(cap_s * f.samplerate))
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
            if n > cap:
                raise AudioTooLongError(f"audio is longer than the limit of {cap_s:g} s")
            if len(block) < _BLOCK_FRAMES:
                break
    except sf.LibsndfileError as exc:  # corrupt stream after a valid header
        if f.frames == UNKNOWN_FRAMES and n == 0:
            return None
        raise UnsupportedAudioError(f"audio stream is corrupt after {n} frames: {exc}") from exc
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)


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
    """Mono `audio` `[N]` at `sr` Hz -> file bytes in one of `OUTPUT_FORMATS`.

    wav: `PCM_16` or `FLOAT` (32-bit); every other format takes `PCM_16` only. Float input becomes int16
    through `to_int16` (RVC's 0.99 peak rule), so wav/flac samples equal RVC's int16 output and the lossy
    formats encode those same samples (`v / 32768`): ogg (Vorbis) through libsndfile; opus, mp3 and m4a (AAC)
    through PyAV, at `audio_av.encoder_rate` (e.g. 40 kHz is written as 44.1 kHz mp3/m4a, 48 kHz opus)."""
    if format not in OUTPUT_FORMATS:
        raise ParameterError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {format!r}")
    if subtype not in ("PCM_16", "FLOAT"):
        raise ParameterError(f"output subtype must be 'PCM_16' or 'FLOAT', got {subtype!r}")
    if format != "wav" and subtype == "FLOAT":
        raise ParameterError(f"{format} cannot store float samples: use subtype 'PCM_16' or format 'wav'")
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise ParameterError(f"output sample rate must be {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz, got {sr}")
    x = np.asarray(audio)
    if x.ndim != 1:
        raise AudioError(f"audio to encode must be mono 1-D samples, got shape {x.shape}")
    if x.dtype != np.int16 and not np.issubdtype(x.dtype, np.floating):
        raise AudioError(f"audio to encode must be float or int16 samples, got {x.dtype}")
    if subtype == "FLOAT":
        data = x.astype(np.float32) / np.float32(32768) if x.dtype == np.int16 else x.astype(np.float32)
        if not np.isfinite(data).all():
            raise AudioError("audio to encode contains NaN or infinite samples")
        return _sndfile_bytes(data, sr, "WAV", "FLOAT")
    ints = x if x.dtype == np.int16 else to_int16(x)
    if format in ("wav", "flac"):
        return _sndfile_bytes(ints, sr, _SNDFILE_FORMATS[format], "PCM_16")
    lossy = ints.astype(np.float32) / np.float32(32768)
    if format == "ogg":
        return _sndfile_bytes(lossy, sr, "OGG", "VORBIS")
    rate = audio_av.encoder_rate(format, sr)
    return audio_av.encode(np.asarray(resample(lossy, sr, rate), dtype=np.float32), rate, format)


def _sndfile_bytes(data: NDArray[np.int16] | NDArray[np.float32], sr: int, container: str, subtype: str) -> bytes:
    """libsndfile's encoding, fed in blocks: given about 2^21 frames or more in one call, its Vorbis encoder
    (libsndfile 1.2.2) crashes the process, and a converted minute of audio is past that."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", sr, 1, format=container, subtype=subtype) as f:
        for start in range(0, len(data), _BLOCK_FRAMES):
            f.write(data[start : start + _BLOCK_FRAMES])
    return buf.getvalue()
