"""`rvc-lora inspect` on every kind of model file, the pretrained G/D that training starts from included, and
on files that are no model at all (audio, text, a folder, a pickle that would run code)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from rvc_lora.cli import main
from rvc_lora.demo import ensure_demo_assets


def inspect(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, object] | str]:
    code = main(["inspect", str(path), "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else err)


def test_pretrained_generator_and_discriminator(demo_assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = ensure_demo_assets(demo_assets)
    code, info = inspect(demo_assets / manifest["pretrained"], capsys)  # {"model": sd}: no 'config' key
    assert code == 0 and isinstance(info, dict)
    assert str(info["kind"]).startswith("pretrained generator")
    assert (info["version"], info["sr"], info["f0"], info["has_posterior_encoder"]) == ("v2", 40000, True, True)
    code, served = inspect(demo_assets / manifest["model"], capsys)
    assert code == 0 and isinstance(served, dict) and served["kind"] == "voice model"
    assert info["fingerprint"] == served["fingerprint"]  # adapters trained on the one fit the other
    code, disc = inspect(demo_assets / manifest["discriminator"], capsys)
    assert code == 0 and isinstance(disc, dict)
    assert str(disc["kind"]).startswith("pretrained discriminator") and disc["version"] == "v2"
    code, hubert = inspect(demo_assets / manifest["hubert"], capsys)
    assert code == 0 and isinstance(hubert, dict) and str(hubert["kind"]).startswith("content encoder")


def test_audio_is_not_a_model_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wav = tmp_path / "voice.wav"
    sf.write(wav, (0.3 * np.sin(np.arange(16000) / 8)).astype(np.float32), 16000)
    code, err = inspect(wav, capsys)
    assert code == 2
    assert "voice.wav: not a model file: it is audio (16000 Hz, 1 channel(s), 1.0 s)" in str(err)
    assert "pop from empty list" not in str(err)


@pytest.mark.parametrize("kind", ["text", "folder", "tensor", "pickle"])
def test_other_files_are_named_plainly(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    path = tmp_path / "thing.pth"
    if kind == "text":
        path.write_text("not a model\n")
    elif kind == "folder":
        path.mkdir()
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        torch.save({"weight": {}, "config": np.dtype("float32")}, path)  # not loadable with weights_only
    code, err = inspect(path, capsys)
    assert code == 2
    expected = {"text": "not a model file", "folder": "is a directory", "tensor": "holding a Tensor",
                "pickle": "pickled Python objects"}[kind]
    assert expected in str(err)
    assert "allow_unsafe_pickle" not in str(err) and "rmvpe_path" not in str(err)  # no options the CLI lacks
