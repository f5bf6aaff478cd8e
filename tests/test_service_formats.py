"""POST /convert with what phones and browsers record (m4a/AAC, WebM/Opus) and every output `format`, with its
Content-Type; format and length checks happen before a job is queued (fake engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rvc_lora.pipeline.audio import OUTPUT_FORMATS, decode_audio
from rvc_lora.pipeline.audio_av import probe as av_probe
from tests.test_audio_formats import av_encode, tone, webm
from tests.test_service_engine import FakeEngine, running_app, sine_wav


def post(client, data: bytes, filename: str = "in.wav", **fields: object):
    return client.post("/convert", data={k: str(v) for k, v in fields.items()}, files={"audio": (filename, data)})


@pytest.mark.parametrize("fmt", list(OUTPUT_FORMATS))
def test_every_output_format_with_its_content_type(tmp_path: Path, fmt: str) -> None:
    with running_app(tmp_path) as client:
        r = post(client, sine_wav(1.0), format=fmt)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == OUTPUT_FORMATS[fmt].media_type
    codec = {"wav": "pcm_s16le", "flac": "flac", "ogg": "vorbis", "opus": "opus", "mp3": "mp3", "m4a": "aac"}[fmt]
    assert av_probe(r.content).codec.startswith(codec)
    audio, sr = decode_audio(r.content)
    assert sr == 16000  # the fake engine's rate, which every codec takes
    assert abs(len(audio) / sr - 1.0) < 0.05


@pytest.mark.parametrize(("name", "payload"), [
    ("voice.m4a", av_encode(tone(44100, 1.0)[None], 44100, "ipod", "aac")),
    ("voice.webm", webm(1.0)),
])
def test_phone_and_browser_recordings_convert(tmp_path: Path, name: str, payload: bytes) -> None:
    engine = FakeEngine()
    with running_app(tmp_path, engine) as client:
        r = post(client, payload, name, format="wav")
    assert r.status_code == 200, r.text
    audio, sr = decode_audio(r.content)
    assert sr == 16000 and abs(len(audio) / sr - 1.0) < 0.05
    assert engine.calls == ["convert"]


@pytest.mark.parametrize(("payload", "status", "code"), [
    (webm(1.0, claimed_s=3 * 3600), 413, "audio_too_long"),  # the container's claim, refused before decoding
    (b"\x1aE\xdf\xa3" + bytes(200), 415, "unsupported_audio"),
])
def test_refused_before_queueing(tmp_path: Path, payload: bytes, status: int, code: str) -> None:
    engine = FakeEngine()
    with running_app(tmp_path, engine) as client:
        r = post(client, payload, "in.webm")
    assert (r.status_code, r.json()["error"]["code"]) == (status, code)
    assert engine.calls == []  # nothing reached the device queue


def test_ffmpeg_path_decoding_stops_at_the_limit(tmp_path: Path) -> None:
    with running_app(tmp_path, max_audio_s=2.0) as client:
        r = post(client, webm(3.0, claimed_s=0.5), "in.webm")  # claims half a second, holds three
    assert (r.status_code, r.json()["error"]["code"]) == (413, "audio_too_long")


def test_rate_limit_applies_to_the_ffmpeg_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.media.MAX_SOURCE_RATE", 44100)
    with running_app(tmp_path) as client:
        r = post(client, webm(1.0), "in.webm")  # Opus decodes at 48 kHz
    assert r.status_code == 422 and "48000 Hz" in r.json()["error"]["message"]
