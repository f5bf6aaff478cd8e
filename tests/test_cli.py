"""The `rvc-lora` command line: convert, inspect, demo assets; errors exit 2 with a message."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from rvc_lora import LoRAConfig, SynthesizerLoRA, save_adapter, save_rvc_checkpoint
from rvc_lora.cli import main
from rvc_lora.demo import ensure_demo_assets, speech_like, write_demo_assets
from rvc_lora.pipeline.content import build_random_hubert, save_fairseq_hubert
from rvc_lora.pipeline.index import build_index
from tests.conftest import tiny_model
from tests.test_converter import TINY_HUBERT


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    base = tiny_model(seed=9)
    paths = {"model": save_rvc_checkpoint(d / "base.pth", base, info="tiny")}
    hubert = build_random_hubert(TINY_HUBERT, seed=1)
    paths["hubert"] = save_fairseq_hubert(hubert, d / "hubert_base.pt")
    lora = SynthesizerLoRA(tiny_model(seed=9), LoRAConfig(r=4, lora_alpha=4, target_modules=["ups", "resblocks"]))
    gen = torch.Generator().manual_seed(0)
    state = lora.get_lora_state_dict()
    lora.load_lora_weights({k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in state.items()})
    paths["adapter"] = save_adapter(d / "voice.safetensors", lora, name="tiny voice")
    paths["index"] = build_index(np.random.default_rng(0).standard_normal((100, 768)).astype(np.float32), d / "v.index")
    paths["input"] = d / "in.flac"
    sf.write(paths["input"], speech_like(1.5, 22050), 22050)
    return paths


def test_convert_writes_pcm16_wav_with_every_flag(files: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.wav"
    code = main(["convert", str(files["input"]), str(out), "--model", str(files["model"]), "--hubert",
                 str(files["hubert"]), "--adapter", str(files["adapter"]), "--index", str(files["index"]),
                 "--f0-method", "harvest", "--f0-up-key", "12", "--index-rate", "0.5", "--filter-radius", "3",
                 "--rms-mix-rate", "0.5", "--protect", "0.4", "--resample-sr", "32000", "--sid", "1", "--seed", "3",
                 "--device", "cpu"])
    assert code == 0 and "RTF" in capsys.readouterr().out
    info = sf.info(out)
    assert (info.samplerate, info.subtype, info.channels) == (32000, "PCM_16", 1)
    assert abs(info.duration - 1.5) < 0.05
    flac = tmp_path / "out.flac"
    assert main(["convert", str(files["input"]), str(flac), "--model", str(files["model"]), "--hubert",
                 str(files["hubert"]), "--seed", "3", "--device", "cpu"]) == 0
    assert sf.info(flac).format == "FLAC"


def test_convert_with_an_f0_file(files: dict[str, Path], tmp_path: Path) -> None:
    base = ["--model", str(files["model"]), "--hubert", str(files["hubert"]), "--seed", "3", "--device", "cpu"]
    f0_file = tmp_path / "f0.txt"
    f0_file.write_text("".join(f"{t / 100:.2f},{330.0 if t % 40 < 20 else 0.0}\n" for t in range(200)))
    plain, guided = tmp_path / "plain.wav", tmp_path / "guided.wav"
    assert main(["convert", str(files["input"]), str(plain), *base]) == 0
    assert main(["convert", str(files["input"]), str(guided), *base, "--f0-file", str(f0_file)]) == 0
    a, b = sf.read(plain)[0], sf.read(guided)[0]
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert main(["convert", str(files["input"]), str(guided), *base, "--f0-file", str(tmp_path / "none.txt")]) == 2


def test_inspect_every_kind(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    for key, expected in (("model", "voice model"), ("adapter", "adapter"), ("index", "index")):
        assert main(["inspect", str(files[key]), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["kind"] == expected
    assert main(["inspect", str(files["adapter"])]) == 0
    text = capsys.readouterr().out
    assert "tiny voice" in text and "rank" in text


def test_errors_exit_2_with_the_reason(files: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_text("not a model")
    assert main(["inspect", str(bad)]) == 2
    assert "bad.pth" in capsys.readouterr().err
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    assert main(["convert", str(silent), str(tmp_path / "o.wav"), "--model", str(files["model"]), "--hubert",
                 str(files["hubert"]), "--device", "cpu"]) == 2
    assert "silent" in capsys.readouterr().err
    assert not (tmp_path / "o.wav").exists()


def test_demo_assets_are_deterministic_and_complete(demo_assets: Path, tmp_path: Path) -> None:
    manifest = ensure_demo_assets(demo_assets)  # already there: not rewritten
    for key in ("model", "pretrained", "discriminator", "hubert", "voice_model", "input"):
        assert (demo_assets / manifest[key]).is_file()
    from rvc_lora.checkpoint import read_rvc_checkpoint
    from rvc_lora.train.discriminators import load_discriminator
    from rvc_lora.train.pretrained import load_pretrained_base

    assert load_discriminator(demo_assets / manifest["discriminator"]).version == "v2"
    pretrained = load_pretrained_base(demo_assets / manifest["pretrained"])  # enc_q included, config from shapes
    served = read_rvc_checkpoint(demo_assets / manifest["model"])
    assert pretrained.fingerprint == served.fingerprint  # an adapter trained on one fits the other
    assert set(manifest["adapters"]) == {"demo-voice-a", "demo-voice-b"}
    again = write_demo_assets(tmp_path)  # a second copy: byte-identical
    for rel in [again[k] for k in ("model", "hubert", "input")] + list(again["adapters"].values()):
        digest = [hashlib.sha256((d / rel).read_bytes()).hexdigest() for d in (demo_assets, tmp_path)]
        assert digest[0] == digest[1], rel


def test_demo_command_converts_with_base_and_adapters(demo_assets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = ensure_demo_assets(demo_assets)
    src = demo_assets / manifest["input"]
    short = demo_assets / "short.wav"  # the full 6 s input takes minutes on a loaded 2-core CI machine
    audio, sr = sf.read(src)
    sf.write(short, audio[: sr // 2], sr)
    manifest["input"] = "short.wav"
    (demo_assets / "manifest.json").write_text(json.dumps(manifest))
    assert main(["demo", str(demo_assets), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("base", "demo-voice-a", "demo-voice-b"):
        assert name in out
        assert sf.info(demo_assets / f"converted-{name}.wav").samplerate == 40000
    a, b = (sf.read(demo_assets / f"converted-demo-voice-{v}.wav")[0] for v in "ab")
    assert not np.allclose(a, b)


def test_extract_writes_an_adapter_and_prints_the_report(files: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from rvc_lora.checkpoint import load_rvc_checkpoint
    from rvc_lora.extract import make_synthetic_voice

    voice = make_synthetic_voice(load_rvc_checkpoint(files["model"]).model, rank=2, seed=1)
    voice_path = save_rvc_checkpoint(tmp_path / "voice.pth", voice)
    out = tmp_path / "voice.safetensors"
    assert main(["extract", "--base", str(files["model"]), "--voice", str(voice_path), "--rank", "4",
                 "--targets", "all", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SNR" in text and out.is_file() and "kept in its metadata" in text
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "adapter" and info["full_deltas"] > 0
    snr = re.search(r"waveform SNR, base\+adapter vs voice: ([\d.]+) dB", text)
    assert snr and round(info["extraction_snr_db"], 1) == float(snr.group(1))  # the report travels with the file


def test_extract_takes_a_voice_zip_and_writes_its_index_beside(files: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import zipfile

    from rvc_lora.checkpoint import load_rvc_checkpoint
    from rvc_lora.extract import make_synthetic_voice

    voice = make_synthetic_voice(load_rvc_checkpoint(files["model"]).model, rank=2, seed=1)
    voice_path = save_rvc_checkpoint(tmp_path / "voice.pth", voice)
    package = tmp_path / "voice.zip"
    with zipfile.ZipFile(package, "w") as zf:
        zf.write(voice_path, "Voice/Voice.pth")
        zf.writestr("Voice/added_IVF1_Flat.index", b"index bytes")
    out = tmp_path / "voice.safetensors"
    assert main(["extract", "--base", str(files["model"]), "--voice", str(package), "--rank", "4",
                 "--out", str(out)]) == 0
    assert out.is_file() and (tmp_path / "voice.index").read_bytes() == b"index bytes"
    assert "the voice's index, from the zip" in capsys.readouterr().out
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../x.pth", b"x")
    assert main(["extract", "--base", str(files["model"]), "--voice", str(bad), "--out", str(out)]) == 2
    assert "bad_voice_package" in capsys.readouterr().err


@pytest.mark.parametrize(("snr", "targets", "rank", "expected"), [
    (35.0, "dec", 8, None), (None, "dec", 8, None), (12.0, "dec", 8, "--targets all"), (12.0, "all", 8, "--rank 32")])
def test_extract_warns_when_far_from_the_voice(snr: float | None, targets: str, rank: int,
                                               expected: str | None) -> None:
    from types import SimpleNamespace

    from rvc_lora.cli import extraction_advice

    advice = extraction_advice(SimpleNamespace(snr_db=snr, targets=targets, rank=rank))
    assert advice is None if expected is None else (expected in advice and f"{snr:.1f} dB" in advice)
