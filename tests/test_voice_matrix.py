"""Every adapter the project writes loads everywhere the README says it does.

Writers: `rvc-lora extract` with each `--targets` (and the defaults), an extraction at a rank below the slots',
the trainer's save path (`save_adapter` of a library-layout model), and a `.pth` uploaded over HTTP (the stored
adapter read back). Loaders: the library (`VoiceConverter.from_files(adapters=...)`), `rvc-lora convert` and
the server (upload, then `/convert`). All on one tiny v1 base.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from rvc_lora.checkpoint import save_rvc_checkpoint
from rvc_lora.cli import main
from rvc_lora.extract import make_synthetic_voice
from rvc_lora.pipeline.converter import VoiceConverter
from rvc_lora.pipeline.params import ConvertParams
from tests.conftest import tiny_model
from tests.test_service_engine import running_app, sine_wav, upload

WRITERS = ("extract-dec", "extract-defaults", "extract-low-rank", "train", "http-pth")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_service_assets: dict[str, Any]) -> Iterator[Any]:
    from service.rvc_engine import load_engine

    with running_app(tmp_path_factory.mktemp("matrix-server"), factory=load_engine,
                     model=tiny_service_assets["model"], hubert=tiny_service_assets["hubert"]) as client:
        yield client


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, tiny_service_assets: dict[str, Any], server: Any
            ) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("matrix")
    base = tiny_service_assets["model"]
    voice = save_rvc_checkpoint(d / "voice.pth", make_synthetic_voice(tiny_model("v1", True, resblock="2", seed=0),
                                                                      rank=3, seed=4))
    out = {"train": tiny_service_assets["adapters"][0]}  # what the trainer's save_adapter writes (r=4, ups+resblocks)
    for writer, flags in (("extract-dec", ["--targets", "dec", "--rank", "4"]), ("extract-defaults", []),
                          ("extract-low-rank", ["--targets", "all", "--rank", "1"])):
        out[writer] = d / f"{writer}.safetensors"
        assert main(["extract", "--base", str(base), "--voice", str(voice), "--out", str(out[writer]), *flags]) == 0
    r = server.post("/adapters", files={"file": ("voice.pth", voice.read_bytes())}, data={"name": "from-pth"})
    assert r.status_code == 201, r.text
    stored = next((Path(server.app.state.settings.adapter_dir) / "objects").glob(f"{r.json()['id']}*.safetensors"))
    out["http-pth"] = d / "http-pth.safetensors"
    out["http-pth"].write_bytes(stored.read_bytes())
    return out


@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("matrix-audio") / "in.wav"
    path.write_bytes(sine_wav(0.3, freq=150.0))
    return path


@pytest.mark.parametrize("writer", WRITERS)
def test_library_loads_it(writer: str, written: dict[str, Path], tiny_service_assets: dict[str, Any],
                          audio: Path) -> None:
    adapter = written[writer]
    vc = VoiceConverter.from_files(tiny_service_assets["model"], tiny_service_assets["hubert"], device="cpu",
                                   adapters=[adapter])
    wav, sr = sf.read(audio, dtype="float32")
    params = ConvertParams(seed=0)
    voiced = vc.convert(wav, sr, params, adapter=adapter)
    plain = vc.convert(wav, sr, params)
    assert voiced.adapter_swapped and not np.array_equal(voiced.audio, plain.audio)


@pytest.mark.parametrize("writer", WRITERS)
def test_cli_convert_loads_it(writer: str, written: dict[str, Path], tiny_service_assets: dict[str, Any],
                              audio: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    assert main(["convert", str(audio), str(out), "--model", str(tiny_service_assets["model"]), "--hubert",
                 str(tiny_service_assets["hubert"]), "--adapter", str(written[writer]), "--device", "cpu",
                 "--seed", "0"]) == 0
    assert sf.info(out).frames > 0


@pytest.mark.parametrize("writer", WRITERS)
def test_server_loads_it(writer: str, written: dict[str, Path], server: Any, audio: Path) -> None:
    r = upload(server, written[writer].read_bytes())
    assert r.status_code in (200, 201), r.text
    converted = server.post("/convert", data={"seed": "0", "adapter": r.json()["id"]},
                            files={"audio": ("a.wav", audio.read_bytes())})
    assert converted.status_code == 200, converted.text
    assert sf.read(io.BytesIO(converted.content))[0].size > 0
