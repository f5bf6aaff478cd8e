"""`rvc-lora convert --realtime`: the file goes through the realtime algorithm, block by block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rvc_lora.cli import main
from rvc_lora.demo import speech_like
from rvc_lora.pipeline.audio import decode_audio, encode_audio, to_int16
from rvc_lora.pipeline.converter import VoiceConverter
from rvc_lora.pipeline.f0 import default_f0_method
from rvc_lora.stream import StreamConverter, StreamParams


def test_convert_realtime_writes_what_the_stream_emits(tiny_service_assets: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model, hubert = tiny_service_assets["model"], tiny_service_assets["hubert"]
    adapter = tiny_service_assets["adapters"][0]
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    audio = speech_like(0.8, 48000, seed=1)
    src.write_bytes(encode_audio(audio, 48000, "wav", "FLOAT"))
    args = ["convert", str(src), str(dst), "--model", str(model), "--hubert", str(hubert), "--adapter", str(adapter),
            "--device", "cpu", "--realtime", "--block-time", "0.1", "--extra-time", "0.5", "--f0-up-key", "3",
            "--rms-mix-rate", "0.5", "--seed", "7"]
    assert main(args) == 0
    assert "blocks of 100 ms" in capsys.readouterr().out
    got, sr = decode_audio(dst)
    vc = VoiceConverter.from_files(model, hubert, device="cpu")
    params = StreamParams(block_time=0.1, extra_time=0.5, f0_up_key=3, rms_mix_rate=0.5, index_rate=0.75, seed=7,
                          f0_method=default_f0_method(None))  # the CLI's default: fcpe when installed, else pm
    want = StreamConverter(vc, params, sr=48000, adapter=adapter).convert(audio)
    blocks = -(-(len(audio) + 2400 + 480) // 4800)  # every input sample is emitted, after the 60 ms latency
    assert sr == 48000 and len(got) == len(want) == blocks * 4800
    np.testing.assert_array_equal((got * 32768).astype(np.int16), to_int16(want))


def test_convert_realtime_refuses_bad_settings(tiny_service_assets: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.wav"
    src.write_bytes(encode_audio(speech_like(0.3, 16000), 16000, "wav"))
    assert main(["convert", str(src), str(tmp_path / "o.wav"), "--model", str(tiny_service_assets["model"]),
                 "--hubert", str(tiny_service_assets["hubert"]), "--realtime", "--block-time", "3"]) == 2
    assert "block_time must be a number in [0.02, 1.5]" in capsys.readouterr().err
