"""Audio in/out: decode every format and bit depth (fixtures made here), downmix, resample, peak rules,
encode, and every bad-input case."""

from __future__ import annotations

import io
import math
import struct
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import soundfile as sf
import soxr

from rvc_lora.errors import AudioError, AudioTooLongError, ParameterError, UnsupportedAudioError
from rvc_lora.pipeline.audio import (
    check_audio,
    decode_audio,
    encode_audio,
    load_audio_16k,
    normalize_peak,
    prepare_16k,
    probe_audio,
    resample,
    to_int16,
)

PIPELINE_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "rvc-pipeline-reference"


def tone(sr: int = 22050, seconds: float = 0.5, hz: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def encode(x: np.ndarray, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def wav_header(channels: int = 1, sr: int = 16000, n: int = 1600, data: bytes | None = None) -> bytes:
    """A PCM16 WAV written by hand, so its header fields can be set to anything."""
    data = (b"\x01\x00" * n * channels) if data is None else data
    block = 2 * channels
    fmt = struct.pack("<HHIIHH", 1, channels, sr, sr * block, block, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def flac_claiming_2_to_36_frames() -> bytes:
    """A valid small FLAC whose STREAMINFO total-samples field says 2^36 - 1 (about 50 days at 16 kHz)."""
    x = np.zeros(16000, np.float32)
    x[::7] = 0.1
    data = bytearray(encode(x, 16000, "FLAC"))
    assert data[:4] == b"fLaC"
    data[8 + 13] |= 0x0F  # low 4 bits of byte 13 of STREAMINFO + the next 4 bytes: total samples
    data[8 + 14 : 8 + 18] = b"\xff\xff\xff\xff"
    return bytes(data)


# (format, subtype, max abs error of a 0.5-amplitude tone after the round trip)
LOSSLESS = [
    ("WAV", "PCM_U8", 1 / 128),
    ("WAV", "PCM_16", 1 / 32768),
    ("WAV", "PCM_24", 1 / 2**23),
    ("WAV", "PCM_32", 1e-7),
    ("WAV", "FLOAT", 0.0),
    ("WAV", "DOUBLE", 0.0),
    ("FLAC", "PCM_16", 1 / 32768),
    ("FLAC", "PCM_24", 1 / 2**23),
]


@pytest.mark.parametrize(("fmt", "subtype", "tol"), LOSSLESS)
def test_lossless_round_trip(fmt: str, subtype: str, tol: float) -> None:
    x = tone()
    audio, sr = decode_audio(encode(x, 22050, fmt, subtype))
    assert (sr, audio.dtype.name, audio.shape) == (22050, "float32", x.shape)
    assert np.abs(audio - x).max() <= tol


@pytest.mark.parametrize(("fmt", "subtype"), [("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_lossy_round_trip(fmt: str, subtype: str) -> None:
    x = tone(sr=44100, seconds=1.0)
    try:
        data = encode(x, 44100, fmt, subtype)
    except sf.LibsndfileError:
        pytest.skip(f"this libsndfile cannot write {fmt}")
    audio, sr = decode_audio(data)
    assert sr == 44100
    assert abs(len(audio) - len(x)) <= 1152  # at most one MPEG frame of encoder delay/padding
    n = min(len(audio), len(x))
    assert np.corrcoef(audio[:n], x[:n])[0, 1] > 0.99  # same waveform, lossy coding aside
    assert abs(np.abs(audio).max() - 0.5) < 0.05


def test_pcm16_mono_decodes_to_int16_over_32768() -> None:
    ints = np.random.default_rng(0).integers(-32768, 32767, 4000, dtype=np.int16)
    audio, _ = decode_audio(encode(ints, 16000, "WAV", "PCM_16"))
    np.testing.assert_array_equal(audio, ints.astype(np.float32) / 32768)  # exactly RVC's ffmpeg load


def test_path_and_bytes_decode_alike(tmp_path: Path) -> None:
    data = encode(tone(), 22050, "FLAC")
    (tmp_path / "a.flac").write_bytes(data)
    a, sr_a = decode_audio(tmp_path / "a.flac")
    b, sr_b = decode_audio(data)
    c, _ = decode_audio(str(tmp_path / "a.flac"))
    assert sr_a == sr_b == 22050
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("channels", [2, 3, 6])
def test_channels_are_averaged(channels: int) -> None:
    rng = np.random.default_rng(channels)
    x = (rng.uniform(-0.4, 0.4, (8000, channels))).astype(np.float32)
    audio, _ = decode_audio(encode(x, 16000, "WAV", "FLOAT"))
    np.testing.assert_allclose(audio, x.astype(np.float64).mean(axis=1), rtol=0, atol=1e-7)


def test_opposite_channels_cancel_to_silence() -> None:
    x = tone(16000)
    with pytest.raises(AudioError, match="silent"):  # L = -R: the mono mix is all zeros
        decode_audio(encode(np.stack([x, -x], axis=1), 16000, "WAV", "FLOAT"))


@pytest.mark.parametrize(("sr_in", "sr_out"), [(44100, 16000), (8000, 16000), (48000, 44100), (40000, 32000)])
def test_resample_length_and_pitch(sr_in: int, sr_out: int) -> None:
    x = tone(sr_in, seconds=1.0, hz=300.0, amp=0.3)
    y = resample(x, sr_in, sr_out)
    assert (len(y), y.dtype.name) == (math.ceil(len(x) * sr_out / sr_in), "float32")
    spectrum = np.abs(np.fft.rfft(y[: sr_out // 2 * 2]))
    assert abs(np.argmax(spectrum) * sr_out / (sr_out // 2 * 2) - 300.0) <= 1.0  # the tone stays at 300 Hz
    direct = soxr.resample(x, sr_in, sr_out, quality="HQ")
    n = min(len(direct), len(y))
    np.testing.assert_array_equal(y[:n], direct[:n])  # only the length is librosa's (ceil, zero tail)


@pytest.mark.parametrize(("n", "sr_in", "sr_out", "expected"), [
    (12344, 40000, 32000, 9876), (7, 48000, 44100, 7),
    (32000, 32000, 16001, 16002),  # librosa: ceil(n * (16001 / 32000)) = ceil(16001.000000000002)
])  # fmt: skip
def test_resample_length_is_librosa_ceil(n: int, sr_in: int, sr_out: int, expected: int) -> None:
    x = np.full(n, 0.1, np.float32)
    assert len(soxr.resample(x, sr_in, sr_out, quality="HQ")) < expected  # soxr alone rounds
    y = resample(x, sr_in, sr_out)
    assert len(y) == expected and y[-1] == 0.0  # librosa's fix_length pads the missing sample with 0


def test_resample_same_rate_is_identity() -> None:
    x = tone()
    assert resample(x, 22050, 22050) is x


def test_resample_rejects_bad_rates() -> None:
    with pytest.raises(ParameterError):
        resample(tone(), 0, 16000)


def test_load_audio_16k_resamples_and_normalises() -> None:
    x = tone(44100, seconds=1.0, amp=0.99)
    audio = load_audio_16k(encode(x, 44100, "WAV", "FLOAT"))
    assert (len(audio), audio.dtype.name) == (16000, "float32")
    assert abs(np.abs(audio).max() - 0.95) < 1e-6  # RVC scales peaks above 0.95 down to 0.95


def test_normalize_peak_rule() -> None:
    loud = np.array([0.0, 0.5, -0.99], dtype=np.float32)
    np.testing.assert_array_equal(normalize_peak(loud), loud / (np.float32(0.99) / np.float32(0.95)))
    quiet = np.array([0.0, 0.3, -0.95], dtype=np.float32)  # exactly 0.95: ratio 1, not > 1
    out = normalize_peak(quiet)
    np.testing.assert_array_equal(out, quiet)
    assert out is not quiet


def test_prepare_16k_keeps_16k_input_length() -> None:
    x = tone(16000, amp=0.2)
    np.testing.assert_array_equal(prepare_16k(x, 16000), x)  # no resample, below the 0.95 peak: untouched


def test_prepare_16k_takes_what_rvc_converts() -> None:
    # silence is converted (unscaled) by RVC; 400 samples at 16 kHz is the least with a non-empty output
    np.testing.assert_array_equal(prepare_16k(np.zeros(400, np.float32), 16000), np.zeros(400))
    assert len(prepare_16k(tone(32000, seconds=800 / 32000), 32000)) == 400
    for bad, sr in [(np.zeros(399, np.float32), 16000), (np.full(797, 0.1, np.float32), 32000),
                    (np.full(500, np.nan, np.float32), 16000), (np.zeros((500, 2), np.float32), 16000)]:
        with pytest.raises(AudioError):
            prepare_16k(bad, sr)


@pytest.mark.skipif(not (PIPELINE_REFERENCE / "speech.wav").exists(), reason="shared reference fixtures absent")
def test_reference_speech_loads_as_rvc_does() -> None:
    ints, sr = sf.read(PIPELINE_REFERENCE / "speech.wav", dtype="int16")
    expected = ints.astype(np.float32) / 32768
    expected /= np.float32(np.abs(expected).max()) / np.float32(0.95)
    assert sr == 16000
    np.testing.assert_array_equal(load_audio_16k(PIPELINE_REFERENCE / "speech.wav"), expected)


def test_probe_reads_the_header_only() -> None:
    x = np.zeros((int(22050 * 2.5), 2), np.float32)
    x[::3] = 0.1
    info = probe_audio(encode(x, 22050, "FLAC"))
    assert (info.duration_s, info.sr, info.channels, info.decoder) == (2.5, 22050, 2, "libsndfile")


def test_probe_and_decode_reject_absurd_declared_length() -> None:
    data = flac_claiming_2_to_36_frames()
    with pytest.raises(AudioError, match="header declares 68719476735 frames"):
        probe_audio(data)
    with pytest.raises(AudioError, match="header declares"):
        decode_audio(data)


BAD_INPUTS = [
    ("empty bytes", b"", AudioError, "empty"),
    ("text", b"not audio", UnsupportedAudioError, "not a decodable audio file"),
    ("noise bytes", np.random.default_rng(0).bytes(5000), UnsupportedAudioError, "not a decodable"),
    ("RIFF stub", b"RIFF" + b"\x00" * 40, UnsupportedAudioError, "not a decodable"),
    ("zero channels", wav_header(channels=0), AudioError, "declares 0 channels"),
    ("absurd rate", wav_header(sr=2_000_000_000), AudioError, "2000000000 Hz"),
    ("300 channels", wav_header(channels=300, n=100), AudioError, "300 channels"),
    ("no frames", wav_header(n=0), AudioError, "0 samples"),
    ("silent", encode(np.zeros(16000, np.int16), 16000, "WAV", "PCM_16"), AudioError, "silent"),
    ("too short", encode(tone(16000, 0.099), 16000, "WAV"), AudioError, "too short: 0.099 s"),
    ("NaN", encode(np.where(np.arange(4000) == 7, np.nan, 0.1).astype(np.float32), 16000, "WAV", "FLOAT"),
     AudioError, "1 NaN or infinite"),
    ("inf", encode(np.full(4000, np.inf, np.float32), 16000, "WAV", "FLOAT"), AudioError, "4000 NaN or infinite"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "data", "error", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_typed_error(case: str, data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as info:
        load_audio_16k(data)
    assert type(info.value) is error  # not merely a subclass: the code tells the client what happened


def test_exactly_minimum_duration_is_accepted() -> None:
    assert len(load_audio_16k(encode(tone(16000, 0.1), 16000, "WAV"))) == 1600


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="does not exist"):
        decode_audio(tmp_path / "nope.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        decode_audio(tmp_path / "empty.wav")


def test_duration_cap() -> None:
    data = encode(tone(16000, 3.0), 16000, "WAV")
    with pytest.raises(AudioTooLongError, match="2 s"):
        decode_audio(data, max_duration_s=2.0)
    assert len(decode_audio(data, max_duration_s=3.0)[0]) == 48000


def test_check_audio_on_arrays() -> None:
    with pytest.raises(AudioError, match="mono"):
        check_audio(np.ones((10, 2), np.float32), 16000)
    with pytest.raises(AudioError, match="must be float"):
        prepare_16k(np.ones(16000, np.int16), 16000)
    check_audio(tone(16000), 16000)


# --- output -------------------------------------------------------------------------------------------


def test_to_int16_scales_only_peaks_above_099() -> None:
    x = np.array([0.5, -0.5, 0.99, -1.7 / 32768, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(to_int16(x), [16384, -16384, 32440, -1, 0])  # truncation toward zero
    clipped = np.array([1.5, -0.75, 0.1], dtype=np.float32)
    out = to_int16(clipped)
    assert out[0] == 32440  # 1.5 * 32768 / (1.5 / 0.99) = 0.99 * 32768 = 32440.3
    assert out[1] == -16220
    assert out.dtype == np.int16


def test_to_int16_edge_cases() -> None:
    assert to_int16(np.zeros(0, np.float32)).shape == (0,)
    with pytest.raises(AudioError, match="NaN"):
        to_int16(np.array([0.1, np.nan], np.float32))


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_encode_pcm16_is_exact(fmt: Literal["wav", "flac"]) -> None:
    ints = np.random.default_rng(1).integers(-32768, 32767, 8000, dtype=np.int16)
    data = encode_audio(ints, 40000, fmt, "PCM_16")
    back, sr = sf.read(io.BytesIO(data), dtype="int16")
    assert (sr, sf.info(io.BytesIO(data)).subtype) == (40000, "PCM_16")
    np.testing.assert_array_equal(back, ints)


def test_encode_float_input_uses_rvc_int16_rule() -> None:
    x = tone(40000, amp=1.2)
    back, _ = sf.read(io.BytesIO(encode_audio(x, 40000, "wav")), dtype="int16")
    np.testing.assert_array_equal(back, to_int16(x))


def test_encode_float_wav_is_exact() -> None:
    x = tone(48000, amp=1.3)  # float WAV keeps values above 1
    back, sr = sf.read(io.BytesIO(encode_audio(x, 48000, "wav", "FLOAT")), dtype="float32")
    assert sr == 48000
    np.testing.assert_array_equal(back, x)


def test_encode_ogg_decodes_back() -> None:
    x = tone(40000, seconds=1.0, amp=0.4)
    data = encode_audio(x, 40000, "ogg")
    assert sf.info(io.BytesIO(data)).subtype == "VORBIS"
    back, sr = decode_audio(data)
    assert (sr, len(back)) == (40000, len(x))
    assert np.corrcoef(back, x)[0, 1] > 0.99


@pytest.mark.parametrize(
    ("audio", "sr", "fmt", "subtype", "error"),
    [
        (tone(), 22050, "aiff", "PCM_16", ParameterError),
        (tone(), 22050, "mp3", "FLOAT", ParameterError),
        (tone(), 22050, "wav", "PCM_24", ParameterError),
        (tone(), 22050, "flac", "FLOAT", ParameterError),
        (tone(), 0, "wav", "PCM_16", ParameterError),
        (np.array([0.1, np.inf], np.float32), 22050, "wav", "FLOAT", AudioError),
        (np.ones((4, 2), np.float32), 22050, "wav", "PCM_16", AudioError),
        (np.ones(4, np.int32), 22050, "wav", "PCM_16", AudioError),
    ],
)
def test_encode_rejects(audio: np.ndarray, sr: int, fmt: str, subtype: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        encode_audio(audio, sr, fmt, subtype)  # type: ignore[arg-type]


def flac_of_unknown_length(audio: np.ndarray, sr: int) -> bytes:
    """A FLAC whose STREAMINFO total-samples field is 0 ("unknown"), as streaming encoders write it."""
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format="FLAC")
    data = bytearray(buf.getvalue())
    # "fLaC", a 4-byte block header, then STREAMINFO: 10 bytes, then 20 bits rate, 3 channels, 5 bps, 36 samples
    packed = struct.unpack(">Q", bytes(data[18:26]))[0] & ~((1 << 36) - 1)
    data[18:26] = struct.pack(">Q", packed)
    return bytes(data)


def test_flac_of_unknown_length_decodes_through_ffmpeg() -> None:
    x = (0.3 * np.sin(2 * np.pi * 220 * np.arange(24000) / 16000)).astype(np.float32)
    data = flac_of_unknown_length(x, 16000)
    info = probe_audio(data)
    assert (info.duration_s, info.sr, info.channels) == (None, 16000, 1)  # not refused as an implausible header
    with sf.SoundFile(io.BytesIO(data)) as f, pytest.raises(sf.LibsndfileError):
        f.read(1 << 16)  # libsndfile itself cannot read such a FLAC ...
    audio, sr = decode_audio(data)  # ... so ffmpeg decodes it, to the samples libsndfile gives with the length
    assert sr == 16000
    np.testing.assert_array_equal(audio, decode_audio(encode(x, 16000, "FLAC"))[0])
