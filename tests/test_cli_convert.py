"""`rvc-lora convert`: output format from the suffix or --format (real MP3/M4A/Opus bytes), input checks
before any model loads, folder batches with one model load and a failure summary; --version and help."""

from __future__ import annotations

import argparse
import io
import re
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rvc_lora.cli import build_parser, main
from rvc_lora.cli_progress import step
from rvc_lora.demo import speech_like
from rvc_lora.pipeline.audio import decode_audio
from rvc_lora.pipeline.audio_av import probe as av_probe
from rvc_lora.pipeline.converter import VoiceConverter
from tests.test_audio_formats import av_encode
from tests.test_cli import files  # noqa: F401  # the tiny model, content encoder and input (module fixture)


def models(files: dict[str, Path]) -> list[str]:  # noqa: F811
    return ["--model", str(files["model"]), "--hubert", str(files["hubert"]), "--seed", "3", "--device", "cpu"]


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model load fails the test: the checks under test must come first."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(VoiceConverter, "from_files", refuse)


@pytest.mark.parametrize(("name", "fmt", "codec", "sr"), [
    ("out.mp3", None, "mp3", 44100), ("out.m4a", None, "aac", 44100), ("out.opus", None, "opus", 48000),
    ("out.ogg", None, "vorbis", 40000), ("out", "mp3", "mp3", 44100),  # the tiny model is 40 kHz
])
def test_output_format_follows_the_suffix_or_format(files: dict[str, Path], tmp_path: Path,  # noqa: F811
                                                    capsys: pytest.CaptureFixture[str], name: str, fmt: str | None,
                                                    codec: str, sr: int) -> None:
    out = tmp_path / name
    extra = ["--format", fmt] if fmt else []
    assert main(["convert", str(files["input"]), str(out), *models(files), *extra]) == 0
    assert av_probe(out.read_bytes()).codec.startswith(codec)  # real MP3 bytes, not a WAV named .mp3
    audio, got_sr = decode_audio(out)
    assert got_sr == sr and abs(len(audio) / sr - 1.5) < 0.06
    text = capsys.readouterr()
    assert "model loading" in text.out and "not included" in text.out
    assert "loading models" in text.err and "converting" in text.err  # progress on stderr


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize(("setup", "output", "extra", "message"), [
    ("missing", "o.wav", [], "does not exist"),
    ("folder-as-file", "o.wav", [], None),  # a folder INPUT means a batch: OUTPUT o.wav then is a new folder...
    ("text", "o.wav", [], "not a decodable audio file"),
    ("input", "o.wav", ["--format", "mp3"], "ends in '.wav' but --format is mp3"),
    ("input", "o.aac", [], ".aac is not an output format"),
    ("input", "o.mp3", ["--float"], "--float applies to wav output only"),
    ("input", "nowhere/o.wav", [], "output folder"),
])
def test_bad_requests_fail_before_any_model_loads(files: dict[str, Path], tmp_path: Path,  # noqa: F811
                                                  capsys: pytest.CaptureFixture[str], setup: str, output: str,
                                                  extra: list[str], message: str | None) -> None:
    src = {"missing": tmp_path / "missing.wav", "folder-as-file": tmp_path / "empty-folder",
           "text": tmp_path / "notes.wav", "input": files["input"]}[setup]
    if setup == "folder-as-file":
        src.mkdir()
        message = "holds no audio files"  # ... and an empty folder is refused by name, not as 'does not exist'
    if setup == "text":
        src.write_text("not audio at all\n" * 10)
    assert main(["convert", str(src), str(tmp_path / output), *models(files), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err
    if setup == "folder-as-file":
        assert "does not exist" not in err


@pytest.mark.usefixtures("no_model_load")
def test_one_file_options_refuse_a_folder(files: dict[str, Path], tmp_path: Path,  # noqa: F811
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in").mkdir()
    assert main(["convert", str(tmp_path / "in"), str(tmp_path / "out"), *models(files), "--realtime"]) == 2
    assert "--realtime applies to one file" in capsys.readouterr().err


def test_a_directory_input_file_is_not_called_missing(tmp_path: Path) -> None:
    from rvc_lora.cli_convert import plan_single
    from rvc_lora.errors import AudioError

    args = argparse.Namespace(format=None)
    with pytest.raises(AudioError, match="is a directory"):
        plan_single(tmp_path, tmp_path / "o.wav", args)


@pytest.mark.usefixtures("no_model_load")
def test_missing_model_file_fails_before_loading(files: dict[str, Path], tmp_path: Path,  # noqa: F811
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model", str(tmp_path / "nope.pth"), "--hubert", str(files["hubert"])]
    assert main(["convert", str(files["input"]), str(tmp_path / "o.wav"), *args]) == 2
    assert "--model" in capsys.readouterr().err


def test_folder_batch_converts_everything_with_one_model_load(files: dict[str, Path], tmp_path: Path,  # noqa: F811
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    sf.write(src / "a.wav", speech_like(0.6, 16000, seed=1), 16000)
    (src / "sub" / "b.m4a").write_bytes(av_encode(speech_like(0.6, 44100, seed=2)[None], 44100, "ipod", "aac"))
    sf.write(src / "silent.flac", np.zeros(16000, np.float32), 16000)  # decodes, but fails the conversion
    (src / "broken.mp3").write_bytes(b"ID3" + bytes(100))  # refused by its header, before the model loads
    (src / "notes.txt").write_text("not audio: ignored")
    loads = []
    real = VoiceConverter.from_files
    monkeypatch.setattr(VoiceConverter, "from_files", lambda *a, **k: loads.append(1) or real(*a, **k))
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), *models(files), "--format", "flac"]) == 1  # some failed
    assert loads == [1]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.flac")) == ["a.flac", "sub/b.flac"]
    assert sf.info(out / "sub" / "b.flac").samplerate == 40000
    text = capsys.readouterr().out
    assert "converted 2 of 4 files" in text and "2 failed" in text
    assert "silent.flac: [bad_audio]" in text and "broken.mp3: [" in text


def test_folder_batch_without_failures_exits_0(files: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "a.wav", speech_like(0.5, 16000, seed=1), 16000)
    assert main(["convert", str(src), str(tmp_path / "out"), *models(files)]) == 0
    assert sf.info(tmp_path / "out" / "a.wav").format == "WAV"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("rvc-lora ")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_shows_its_default() -> None:
    parser = build_parser()
    commands = _subparsers(parser)
    assert {"convert", "inspect", "demo", "demo-assets", "extract", "prepare", "train", "serve"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest}: no help"
            if action.option_strings:
                line = sub._get_formatter()._get_help_string(action)
                assert "default" in line or "(required)" in line, f"{name} {action.option_strings[0]}: {line}"
        assert "default: 20" in text if name == "train" else True


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_redrawn_on_a_terminal_and_listed_elsewhere() -> None:
    tty, log = _Terminal(), io.StringIO()
    with step("loading models", tty) as s:
        s.note("content encoder")
        time.sleep(1.2)
    redraws = tty.getvalue().split("\r")
    assert sum("loading models: content encoder ..." in r for r in redraws) >= 2  # at least one tick in 1.2 s
    assert re.fullmatch(r"\x1b\[Kloading models: done in \d+\.\d s\n", redraws[-1])
    with pytest.raises(KeyError), step("converting x.wav", log) as s:
        s.note("chunk 1/2")
        raise KeyError("boom")
    assert log.getvalue().splitlines() == ["converting x.wav ...", "  converting x.wav: chunk 1/2",
                                           log.getvalue().splitlines()[-1]]
    assert re.fullmatch(r"converting x\.wav: stopped after \d+\.\d s", log.getvalue().splitlines()[-1])


@pytest.fixture
def voice_zip(files: dict[str, Path], tmp_path: Path) -> dict[str, Path]:  # noqa: F811
    """A full voice fine-tuned (synthetically) from the tiny base: its .pth, and a zip of it with an index."""
    import zipfile

    from rvc_lora.checkpoint import load_rvc_checkpoint, save_rvc_checkpoint
    from rvc_lora.extract import make_synthetic_voice

    voice = make_synthetic_voice(load_rvc_checkpoint(files["model"]).model, rank=2, seed=4)
    pth = save_rvc_checkpoint(tmp_path / "voice.pth", voice)
    package = tmp_path / "voice.zip"
    with zipfile.ZipFile(package, "w") as zf:
        zf.write(pth, "My Voice/My Voice.pth")
        zf.write(files["index"], "My Voice/added_IVF1_Flat.index")
    return {"pth": pth, "zip": package}


def test_convert_with_a_voice_pth_or_zip_runs_that_voice(files: dict[str, Path], voice_zip: dict[str, Path],  # noqa: F811
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--hubert", str(files["hubert"]), "--seed", "3", "--device", "cpu", "--f0-method", "pm"]

    def run(name: str, *extra: str) -> bytes:
        out = tmp_path / name
        assert main(["convert", str(files["input"]), str(out), *common, *extra]) == 0
        return out.read_bytes()

    as_model = run("model.wav", "--model", str(voice_zip["pth"]))
    assert run("voice.wav", "--voice", str(voice_zip["pth"])) == as_model  # the voice itself, not an extraction
    assert as_model != run("base.wav", "--model", str(files["model"]))
    with_index = run("indexed.wav", "--model", str(voice_zip["pth"]), "--index", str(files["index"]),
                     "--index-rate", "1")
    assert with_index != as_model
    assert run("zip.wav", "--voice", str(voice_zip["zip"]), "--index-rate", "1") == with_index  # the zip's index
    assert "loading models (voice.zip" in capsys.readouterr().err


@pytest.mark.usefixtures("no_model_load")
def test_convert_voice_refusals_come_before_any_model_loads(files: dict[str, Path],  # noqa: F811
                                                            voice_zip: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    def run(*extra: str) -> str:
        assert main(["convert", str(files["input"]), str(tmp_path / "o.wav"), "--hubert", str(files["hubert"]),
                     *extra]) == 2
        return capsys.readouterr().err

    assert "holds an index already" in run("--voice", str(voice_zip["zip"]), "--index", str(files["index"]))
    assert "--voice" in run("--voice", str(tmp_path / "missing.zip"))
    import zipfile

    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../voice.pth", b"x")
    assert "[bad_voice_package]" in run("--voice", str(tmp_path / "evil.zip"))
    with pytest.raises(SystemExit):  # argparse: one model, the base or a voice
        main(["convert", "in.wav", "o.wav", "--hubert", "h.pt", "--model", "a.pth", "--voice", "b.zip"])
    assert "not allowed with argument" in capsys.readouterr().err
