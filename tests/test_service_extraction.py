"""POST /adapters with a full RVC voice model (.pth): extracted into an adapter over the resident base, on the
extraction thread, told apart from a safetensors adapter by content. End to end on tiny real models."""

from __future__ import annotations

import io
import pickle
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from fastapi.testclient import TestClient

from rvc_lora.checkpoint import load_rvc_checkpoint, save_rvc_checkpoint
from rvc_lora.extract import make_synthetic_voice, snr_db
from rvc_lora.pipeline.converter import VoiceConverter
from rvc_lora.pipeline.params import ConvertParams
from service.engine import Extracted
from service.rvc_engine import load_engine
from tests.conftest import tiny_model
from tests.test_service_engine import FAKE_FINGERPRINT, FakeEngine, adapter_bytes, running_app, sine_wav, upload


def stored_files(tmp_path: Path) -> list[str]:
    root = tmp_path / "store"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def upload_voice(client: TestClient, data: bytes, filename: str = "voice.pth", **fields: str) -> Any:
    return client.post("/adapters", files={"file": (filename, data)}, data=fields)


@pytest.fixture(scope="module")
def synthetic_voice(tiny_service_assets: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base + rank-8 deltas on every layer + 1% noise (issue 7's synthetic voice), as an RVC .pth."""
    base = load_rvc_checkpoint(tiny_service_assets["model"]).model
    path = tmp_path_factory.mktemp("voice") / "voice.pth"
    return save_rvc_checkpoint(path, make_synthetic_voice(base, rank=8, seed=3), info="synthetic voice")


@pytest.fixture
def real_client(tmp_path: Path, tiny_service_assets: dict[str, Any]) -> Iterator[TestClient]:
    with running_app(tmp_path, factory=load_engine, model=tiny_service_assets["model"],
                     hubert=tiny_service_assets["hubert"], max_rank=8) as client:
        yield client


def test_voice_model_upload_converts_like_the_voice_model(real_client: TestClient, synthetic_voice: Path,
                                                          tiny_service_assets: dict[str, Any], tmp_path: Path) -> None:
    # a misleading file name: the kind is decided by content
    r = upload_voice(real_client, synthetic_voice.read_bytes(), "voice.safetensors", name="synth", rank="8")
    assert r.status_code == 201, r.text
    info = r.json()
    report = info["extraction"]
    assert (info["name"], info["label"], info["rank"]) == ("synth", "synth", 8)
    assert report["targets"] == "all" and report["requested_rank"] == 8 and report["layer_count"] > 8
    assert report["full_delta_count"] > 0 and len(report["worst_layers"]) == 8  # the worst 8 of them, worst first
    errors = [x["rel_error"] for x in report["worst_layers"]]
    assert errors == sorted(errors, reverse=True) and errors[0] == report["max_rel_error"] >= report["mean_rel_error"]
    assert report["snr_db"] > 30 and report["snr_db"] > report["base_snr_db"] + 10
    assert report["voice_bytes"] == synthetic_voice.stat().st_size and info["size_bytes"] == report["adapter_bytes"]
    assert report["seconds"] > 0 and report["eval_seconds"] > 0
    assert str(tmp_path) not in r.text and "base" not in report and "voice" not in report  # no server paths
    # the report is kept with the adapter (the run's timings are not)
    stored = real_client.get(f"/adapters/{info['id']}").json()
    assert stored == {**info, "extraction": {**report, "seconds": None, "eval_seconds": None}}

    wav = sine_wav(0.6, freq=150.0)
    served = real_client.post("/convert", data={"adapter": "synth", "seed": "5", "format": "wav"},
                              files={"audio": ("a.wav", wav)})
    assert served.status_code == 200, served.text
    got, sr = sf.read(io.BytesIO(served.content), dtype="float32")

    full = VoiceConverter.from_files(model=synthetic_voice, hubert=tiny_service_assets["hubert"], device="cpu")
    audio16k, _ = sf.read(io.BytesIO(wav), dtype="float32")
    want = full.convert(audio16k, 16000, ConvertParams(seed=5)).audio
    base_only = real_client.post("/convert", data={"seed": "5"}, files={"audio": ("a.wav", wav)})
    base_audio, _ = sf.read(io.BytesIO(base_only.content), dtype="float32")
    assert sr == full.sr and len(got) == len(want)
    assert snr_db(torch.from_numpy(want), torch.from_numpy(got)) > 25  # int16 output, fp16 adapter
    assert snr_db(torch.from_numpy(want), torch.from_numpy(base_audio)) < 20  # the voice differs from the base

    again = upload_voice(real_client, synthetic_voice.read_bytes(), name="synth", rank="8")
    assert (again.status_code, again.json()["id"]) == (200, info["id"])  # deterministic extraction, same bytes


def test_the_report_is_kept_with_the_adapter(tiny_service_assets: dict[str, Any], synthetic_voice: Path,
                                            tmp_path: Path) -> None:
    from rvc_lora.adapters import load_adapter
    from rvc_lora.cli import main
    from tests.test_adapters import _rewrite

    model = tiny_service_assets["model"]
    app = {"factory": load_engine, "model": model, "hubert": tiny_service_assets["hubert"], "max_rank": 8}
    with running_app(tmp_path, **app) as client:
        info = upload_voice(client, synthetic_voice.read_bytes(), name="synth", rank="4").json()
    with running_app(tmp_path, **app) as client:  # a restart: read back from the store's records
        stored = client.get("/adapters/synth").json()
        assert stored["extraction"] == {**info["extraction"], "seconds": None, "eval_seconds": None}
        assert stored["extraction"]["snr_db"] > 20

        cli = tmp_path / "cli.safetensors"  # `rvc-lora extract` keeps its report in the file, for a later upload
        assert main(["extract", "--base", str(model), "--voice", str(synthetic_voice), "--rank", "2",
                     "--out", str(cli)]) == 0
        r = upload(client, cli.read_bytes(), name="from-cli")
        assert r.status_code == 201, r.text
        kept = load_adapter(cli).info.report()
        assert kept is not None and r.json()["extraction"]["snr_db"] == kept["snr_db"]
        assert r.json()["extraction"]["rank"] == 2 and r.json()["extraction"]["adapter_bytes"] == cli.stat().st_size

        forged = _rewrite(cli, tmp_path / "forged.safetensors", meta={"extraction": '{"snr_db": 99}'})
        r = upload(client, forged.read_bytes())
        assert r.status_code == 422 and "not an extraction report" in r.json()["error"]["message"]


def test_default_layout_adapters_still_load(real_client: TestClient, tiny_service_assets: dict[str, Any]) -> None:
    model = real_client.get("/model").json()
    assert {"dec.ups", "dec.resblocks", "flow", "enc_p.encoder"} <= set(model["target_modules"])
    r = upload(real_client, tiny_service_assets["adapters"][0].read_bytes())  # r=4 on ups + resblocks
    assert r.status_code == 201 and r.json()["extraction"] is None
    converted = real_client.post("/convert", data={"adapter": r.json()["id"], "seed": "1"},
                                 files={"audio": ("a.wav", sine_wav(0.3))})
    assert converted.status_code == 200


def test_voice_model_of_another_architecture_is_422(real_client: TestClient, tmp_path: Path) -> None:
    other = save_rvc_checkpoint(tmp_path / "other.pth", tiny_model("v2", True, resblock="2", seed=3))
    r = upload_voice(real_client, other.read_bytes())
    assert (r.status_code, r.json()["error"]["code"]) == (422, "adapter_mismatch")
    message = r.json()["error"]["message"]
    assert "voice model" in message and "version" in message and str(tmp_path) not in message
    assert stored_files(tmp_path) == [] and real_client.get("/adapters").json()["adapters"] == []


def test_the_base_itself_is_422(real_client: TestClient, tiny_service_assets: dict[str, Any],
                                tmp_path: Path) -> None:
    r = upload_voice(real_client, tiny_service_assets["model"].read_bytes())
    assert (r.status_code, r.json()["error"]["code"]) == (422, "bad_adapter")
    assert "nothing to extract" in r.json()["error"]["message"] and stored_files(tmp_path) == []


class _Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(MARKER[0]),))


MARKER: list[str] = [""]


def test_pickled_code_is_never_run(real_client: TestClient, tmp_path: Path) -> None:
    MARKER[0] = str(tmp_path / "pwned")
    evil = tmp_path / "evil.pth"
    torch.save({"weight": {"x": _Exploit()}, "config": []}, evil)
    for data in (evil.read_bytes(), pickle.dumps(_Exploit())):
        r = upload_voice(real_client, data)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "bad_checkpoint")
        assert str(tmp_path) not in r.json()["error"]["message"]
    assert not (tmp_path / "pwned").exists() and stored_files(tmp_path) == []


def _voice_bytes(cpt: dict[str, Any], *, deflate: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(cpt, buf)
    if not deflate:
        return buf.getvalue()
    with zipfile.ZipFile(buf) as src:  # every record deflated: torch.load inflates each to its declared size
        records = [(info.filename, src.read(info.filename)) for info in src.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for name, data in records:
            dst.writestr(name, data)
    return out.getvalue()


def test_hostile_voice_models_are_422_at_once(real_client: TestClient, tiny_service_assets: dict[str, Any],
                                              tmp_path: Path) -> None:
    cpt = torch.load(tiny_service_assets["model"], weights_only=True)
    weights, config = cpt["weight"], cpt["config"]
    cases = {  # before: 64 MB inflated / the extraction thread stuck for minutes growing by GBs / 500 / 500
        "zip bomb": _voice_bytes(cpt | {"weight": weights | {"pad": torch.zeros(16 << 20)}}, deflate=True),
        "a million layers": _voice_bytes(cpt | {"config": config[:6] + [10**6] + config[7:]}),
        "sizes past int64": _voice_bytes(cpt | {"config": config[:12] + [[10**18] * len(config[12])] + config[13:]}),
        "float8 weights": _voice_bytes(cpt | {"weight": weights | {
            "emb_g.weight": weights["emb_g.weight"].to(torch.float8_e4m3fn)}}),
    }
    assert len(cases["zip bomb"]) < 1 << 20
    for label, data in cases.items():
        r = upload_voice(real_client, data)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "bad_checkpoint"), (label, r.text[:300])
        assert str(tmp_path) not in r.json()["error"]["message"]
    assert stored_files(tmp_path) == [] and real_client.get("/healthz").status_code == 200


def test_rank_and_size_limits(real_client: TestClient, synthetic_voice: Path, tmp_path: Path) -> None:
    r = upload_voice(real_client, synthetic_voice.read_bytes(), rank="16")  # the server's max_rank is 8
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request") and "rank" in r.text
    assert upload_voice(real_client, synthetic_voice.read_bytes(), rank="0").status_code == 422
    r = upload_voice(real_client, synthetic_voice.read_bytes())  # no rank: min(32, max_rank)
    assert r.status_code == 201 and r.json()["extraction"]["requested_rank"] == 8
    assert stored_files(tmp_path) == [f"meta/{r.json()['id']}.json", f"objects/{r.json()['id']}.safetensors"]


def test_voice_size_limit(tmp_path: Path) -> None:
    with running_app(tmp_path, max_voice_bytes=1000) as c:
        big = io.BytesIO()
        torch.save({"fake_voice_seed": 1, "fingerprint": FAKE_FINGERPRINT, "pad": torch.zeros(1000)}, big)
        r = upload_voice(c, big.getvalue())
        assert (r.status_code, r.json()["error"]["code"]) == (413, "payload_too_large")
        assert "voice model" in r.json()["error"]["message"] and stored_files(tmp_path) == []


class BlockingExtraction(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.started = threading.Event(), threading.Event()

    def extract_voice(self, voice: Path, *, rank: int, name: str, evaluate: bool) -> Extracted:
        self.started.set()
        self.gate.wait(timeout=20)
        return super().extract_voice(voice, rank=rank, name=name, evaluate=evaluate)


def _fake_voice(seed: int) -> bytes:
    buf = io.BytesIO()
    torch.save({"fake_voice_seed": seed, "fingerprint": FAKE_FINGERPRINT}, buf)
    return buf.getvalue()


def test_extraction_blocks_neither_conversions_nor_the_event_loop(tmp_path: Path) -> None:
    engine = BlockingExtraction()
    with running_app(tmp_path, engine, max_waiting_extractions=0) as c:
        results: list[Any] = []
        uploader = threading.Thread(target=lambda: results.append(upload_voice(c, _fake_voice(1), name="slow")))
        uploader.start()
        try:
            assert engine.started.wait(10)
            assert c.get("/healthz").status_code == 200
            converted = c.post("/convert", data={"seed": "1"}, files={"audio": ("a.wav", sine_wav())})
            assert converted.status_code == 200  # the device worker is free meanwhile
            busy = upload_voice(c, _fake_voice(2))
            assert (busy.status_code, busy.json()["error"]["code"]) == (503, "queue_full")
            assert int(busy.headers["Retry-After"]) >= 1
            assert upload(c, adapter_bytes(tmp_path, 3)).status_code == 201  # plain adapters do not wait
        finally:
            engine.gate.set()
        uploader.join(20)
        assert results[0].status_code == 201 and results[0].json()["name"] == "slow"
        assert np.isclose(c.app.state.extractor.in_flight, 0)  # type: ignore[attr-defined]
