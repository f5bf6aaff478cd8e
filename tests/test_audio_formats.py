"""Every common audio format in and out: inputs made here with PyAV (as phones, browsers and editors write
them), decoded by `decode_audio`; each output format written by `encode_audio` and read back; the limits
(rate, channels, claimed duration, decoded duration) on the PyAV path."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from rvc_lora.errors import AudioError, AudioTooLongError, ParameterError, UnsupportedAudioError
from rvc_lora.pipeline import audio as audio_mod
from rvc_lora.pipeline.audio import (
    OUTPUT_FORMATS,
    decode_audio,
    encode_audio,
    format_for_suffix,
    probe_audio,
)
from rvc_lora.pipeline.audio_av import probe as av_probe


def tone(sr: int, seconds: float = 1.0, hz: float = 440.0, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * hz * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


def av_encode(x: np.ndarray, sr: int, muxer: str, codec: str) -> bytes:
    """`x` `[channels, N]` float32 -> a file by ffmpeg's `muxer`/`codec` (independent of the code under test)."""
    buf = io.BytesIO()
    layout = {1: "mono", 2: "stereo"}[x.shape[0]]
    with av.open(buf, "w", format=muxer) as out:
        stream = out.add_stream(codec, rate=sr, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x.T.reshape(1, -1)), format="flt", layout=layout)
        frame.sample_rate = sr
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def dominant_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * sr / len(x))


# what phones, browsers and editors write: (name, muxer, codec, rate)
INPUTS = [
    ("m4a-aac", "ipod", "aac", 44100),
    ("webm-opus", "webm", "libopus", 48000),
    ("ogg-opus", "ogg", "libopus", 48000),
    ("mp3", "mp3", "libmp3lame", 44100),
    ("flac", "flac", "flac", 22050),
    ("wav", "wav", "pcm_s16le", 16000),
    ("m4a-alac", "ipod", "alac", 32000),
]


@pytest.mark.parametrize(("name", "muxer", "codec", "sr"), INPUTS, ids=[i[0] for i in INPUTS])
def test_common_formats_decode(name: str, muxer: str, codec: str, sr: int) -> None:
    x = tone(sr, 1.0)
    data = av_encode(x[None], sr, muxer, codec)
    info = probe_audio(data)
    assert (info.sr, info.channels) == (sr, 1)
    audio, got_sr = decode_audio(data)
    assert got_sr == sr
    assert abs(len(audio) / sr - 1.0) < 0.05  # lossy codecs add at most a frame or two of delay/padding
    assert dominant_hz(audio, sr) == pytest.approx(440, abs=2)
    assert np.sqrt(np.mean(audio**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)


def test_libsndfile_keeps_what_it_reads_and_ffmpeg_takes_the_rest() -> None:
    assert probe_audio(av_encode(tone(16000)[None], 16000, "wav", "pcm_s16le")).decoder == "libsndfile"
    info = probe_audio(av_encode(tone(48000)[None], 48000, "webm", "libopus"))
    assert (info.decoder, info.format) == ("ffmpeg", "matroska,webm/opus")


def test_stereo_is_averaged_on_the_ffmpeg_path() -> None:
    x = tone(48000)
    audio, _ = decode_audio(av_encode(np.stack([x, np.zeros_like(x)]), 48000, "ipod", "aac"))
    assert np.sqrt(np.mean(audio**2)) == pytest.approx(0.25 / np.sqrt(2), rel=0.05)


@pytest.mark.parametrize("fmt", list(OUTPUT_FORMATS))
def test_every_output_format_round_trips(fmt: str) -> None:
    x = tone(40000, 1.0, hz=330, amp=0.6)
    data = encode_audio(x, 40000, fmt)  # type: ignore[arg-type]
    expected_sr = {"mp3": 44100, "m4a": 44100, "opus": 48000}.get(fmt, 40000)  # codecs without 40 kHz
    expected_codec = {"wav": "pcm_s16le", "flac": "flac", "ogg": "vorbis", "opus": "opus", "mp3": "mp3",
                      "m4a": "aac"}[fmt]
    assert av_probe(data).codec.startswith(expected_codec)
    audio, sr = decode_audio(data)
    assert sr == expected_sr
    assert abs(len(audio) / sr - 1.0) < 0.05
    assert dominant_hz(audio, sr) == pytest.approx(330, abs=2)
    assert np.sqrt(np.mean(audio**2)) == pytest.approx(0.6 / np.sqrt(2), rel=0.05)


def test_format_for_suffix() -> None:
    assert [format_for_suffix(s) for s in (".mp3", ".M4A", ".oga", ".opus", ".aac", "")] == \
        ["mp3", "m4a", "ogg", "opus", None, None]


def test_lossy_formats_refuse_float_samples() -> None:
    with pytest.raises(ParameterError, match="mp3 cannot store float"):
        encode_audio(tone(40000), 40000, "mp3", "FLOAT")


def webm(seconds: float, claimed_s: float | None = None, sr: int = 48000) -> bytes:
    """A WebM/Opus file holding `seconds` of audio whose Segment Duration claims `claimed_s` (the actual
    length when None)."""
    data = bytearray(av_encode(tone(sr, seconds)[None], sr, "webm", "libopus"))
    if claimed_s is not None:
        at = data.find(b"\x44\x89\x88")  # the Duration element: an 8-byte float in ms (TimecodeScale 1e6 ns)
        assert at > 0
        struct.pack_into(">d", data, at + 3, claimed_s * 1000)
    return bytes(data)


def test_container_claiming_a_huge_duration_is_refused_before_decoding() -> None:
    data = webm(1.0, claimed_s=40 * 24 * 3600)  # 40 days, in a 10 KB file
    with pytest.raises(AudioError, match="not a plausible file"):
        probe_audio(data)
    with pytest.raises(AudioError, match="not a plausible file"):
        decode_audio(data)


def test_claimed_duration_over_the_limit_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = webm(1.0, claimed_s=7200)
    assert probe_audio(data).duration_s == pytest.approx(7200)
    decoded: list[int] = []
    monkeypatch.setattr(av.AudioResampler, "resample", lambda self, frame: decoded.append(1) or [])
    with pytest.raises(AudioTooLongError, match="7200.0 s long, the limit is 60 s"):
        decode_audio(data, max_duration_s=60)
    assert decoded == []  # not a single frame decoded


def test_decoding_stops_at_the_limit_whatever_the_header_claims() -> None:
    data = webm(3.0, claimed_s=0.5)  # claims half a second, holds three
    assert probe_audio(data).duration_s == pytest.approx(0.5)
    with pytest.raises(AudioTooLongError, match="longer than the limit of 2 s"):
        decode_audio(data, max_duration_s=2.0)
    assert len(decode_audio(data, max_duration_s=4.0)[0]) / 48000 == pytest.approx(3.0, abs=0.05)


def test_rate_and_channel_limits_on_the_ffmpeg_path(monkeypatch: pytest.MonkeyPatch) -> None:
    stereo = av_encode(np.stack([tone(48000)] * 2), 48000, "webm", "libopus")
    monkeypatch.setattr(audio_mod, "MAX_CHANNELS", 1)
    with pytest.raises(AudioError, match="declares 2 channels"):
        decode_audio(stereo)
    monkeypatch.setattr(audio_mod, "MAX_SAMPLE_RATE", 44100)
    with pytest.raises(AudioError, match="declares 48000 Hz"):
        probe_audio(stereo)


@pytest.mark.parametrize(("data", "message"), [
    (b"\x1aE\xdf\xa3" + bytes(60), "not a decodable audio file"),  # a Matroska magic and nothing else
    (b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n", "not a decodable audio file"),
])
def test_broken_or_refused_containers(data: bytes, message: str) -> None:
    with pytest.raises(UnsupportedAudioError, match=message):
        decode_audio(data)


def test_video_without_audio_is_refused() -> None:
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        stream = out.add_stream("ffv1", rate=1)
        stream.width = stream.height = 16
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    with pytest.raises(UnsupportedAudioError, match="holds no audio stream"):
        decode_audio(buf.getvalue())


def test_directory_and_missing_file_are_named(tmp_path) -> None:
    with pytest.raises(AudioError, match="is a directory"):
        probe_audio(tmp_path)
    with pytest.raises(AudioError, match="does not exist"):
        probe_audio(tmp_path / "nope.m4a")


def test_a_path_is_a_file_not_an_ffmpeg_protocol(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b.webm").write_bytes(webm(3.0))
    name = "concat:a.webm|b.webm"  # a file name that ffmpeg, given it, would read as its concat protocol
    (tmp_path / name).write_bytes(webm(1.0))
    audio, sr = decode_audio(name)
    assert sr == 48000 and abs(len(audio) / sr - 1.0) < 0.05


def test_a_long_ogg_vorbis_is_encoded_without_crashing() -> None:
    """libsndfile's Vorbis encoder crashes the process when handed ~2^21 frames in one call (50 s at 44.1 kHz);
    run in a child process so that a regression fails this test instead of killing the test run."""
    code = ("import numpy as np; from rvc_lora.pipeline.audio import encode_audio, decode_audio; "
            "x = (0.3 * np.sin(np.arange(44100 * 55) / 10)).astype(np.float32); "
            "a, sr = decode_audio(encode_audio(x, 44100, 'ogg')); print(len(a) / sr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) == pytest.approx(55.0, abs=0.01)
