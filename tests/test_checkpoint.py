"""Checkpoint reading: RVC's format and its variants round-trip; every bad file is a typed error."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from rvc_lora.checkpoint import base_fingerprint, load_rvc_checkpoint, rvc_state_dict, save_rvc_checkpoint
from rvc_lora.errors import CheckpointError
from tests.conftest import run_infer, tiny_inputs, tiny_model


def _rvc_dict(model: torch.nn.Module, **overrides: Any) -> dict[str, Any]:
    cfg = model.cfg  # type: ignore[union-attr]
    cpt: dict[str, Any] = {"weight": rvc_state_dict(model), "config": cfg.to_list(), "info": "10epoch",
                           "sr": "40k", "f0": int(cfg.f0), "version": cfg.version}
    cpt.update(overrides)
    return {k: v for k, v in cpt.items() if v is not None}


@pytest.mark.parametrize(("version", "f0"), [("v1", True), ("v2", True), ("v1", False), ("v2", False)])
def test_round_trip_fp16_matches_fp16_rounded_model(tmp_path: Path, version: str, f0: bool) -> None:
    model = tiny_model(version, f0, seed=1)
    path = save_rvc_checkpoint(tmp_path / "voice.pth", model, info="test voice")
    ckpt = load_rvc_checkpoint(path)
    assert (ckpt.version, ckpt.f0, ckpt.sr, ckpt.info) == (version, f0, 40000, "test voice")
    assert not any(k.startswith("enc_q") for k in ckpt.model.state_dict())
    stored = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in stored["weight"].values())
    model.load_state_dict({k: v.float() for k, v in stored["weight"].items()}, strict=True)  # fp16-rounded copy
    inputs = tiny_inputs(model)
    torch.testing.assert_close(run_infer(ckpt.model, inputs)[0], run_infer(model, inputs)[0], atol=0, rtol=0)


def test_parametrization_names_and_missing_version_f0_keys(tmp_path: Path) -> None:
    model = tiny_model("v1", True, seed=2)
    weights = {k.replace(".weight_g", ".parametrizations.weight.original0")
               .replace(".weight_v", ".parametrizations.weight.original1"): v
               for k, v in rvc_state_dict(model).items()}
    torch.save(_rvc_dict(model, weight=weights, version=None, f0=None), tmp_path / "new_api.pth")
    torch.save(_rvc_dict(model), tmp_path / "old_api.pth")
    new, old = load_rvc_checkpoint(tmp_path / "new_api.pth"), load_rvc_checkpoint(tmp_path / "old_api.pth")
    assert (new.version, new.f0) == ("v1", True)  # RVC's defaults for absent keys
    assert new.fingerprint == old.fingerprint
    inputs = tiny_inputs(model)
    torch.testing.assert_close(run_infer(new.model, inputs)[0], run_infer(old.model, inputs)[0], atol=0, rtol=0)


def test_fused_weights_load_and_speaker_count_comes_from_emb_g(tmp_path: Path) -> None:
    model = tiny_model(seed=3)
    reference = run_infer(model, tiny_inputs(model))[0]
    model.remove_weight_norm()
    cfg_list = model.cfg.to_list()
    cfg_list[15] = 109  # stale, as in real files: emb_g has 3 rows
    torch.save(_rvc_dict(model, weight={k: v.float() for k, v in model.state_dict().items()}, config=cfg_list),
               tmp_path / "fused.pth")
    ckpt = load_rvc_checkpoint(tmp_path / "fused.pth")
    assert ckpt.config.spk_embed_dim == 3
    torch.testing.assert_close(run_infer(ckpt.model, tiny_inputs(model))[0], reference, atol=1e-5, rtol=1e-4)


def test_fingerprint_ignores_posterior_and_precision_but_not_values(tmp_path: Path) -> None:
    model = tiny_model(seed=4, with_posterior=True)
    full = {k: v.float() for k, v in model.state_dict().items()}
    served = rvc_state_dict(model)
    assert base_fingerprint(full) == base_fingerprint(served)
    served["emb_g.weight"] = served["emb_g.weight"] + 1
    assert base_fingerprint(full) != base_fingerprint(served)


def _bad(tmp_path: Path, name: str, obj: Any) -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_bad_files_are_typed_errors_naming_file_and_key(tmp_path: Path) -> None:
    model = tiny_model(seed=5)
    good = _rvc_dict(model)
    weights = dict(good["weight"])
    cases: dict[str, tuple[Path, str]] = {}
    (tmp_path / "text.pth").write_text("hello")
    cases["not a checkpoint"] = (tmp_path / "text.pth", "not a readable")
    data = (tmp_path / "full.pth")
    torch.save(good, data)
    (tmp_path / "trunc.pth").write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    cases["truncated"] = (tmp_path / "trunc.pth", "not a readable")
    cases["training state"] = (_bad(tmp_path, "G_100.pth", {"model": weights, "iteration": 3, "optimizer": {},
                                                             "learning_rate": 1e-4}), "training state")
    cases["list"] = (_bad(tmp_path, "list.pth", [1, 2]), "expected a dict")
    cases["no weight"] = (_bad(tmp_path, "nw.pth", {"config": good["config"]}), "'weight'")
    cases["no config"] = (_bad(tmp_path, "nc.pth", {"weight": weights}), "'config'")
    cases["bad version"] = (_bad(tmp_path, "v3.pth", good | {"version": "v3"}), "unknown version 'v3'")
    missing = {k: v for k, v in weights.items() if k != "dec.conv_pre.bias"}
    cases["missing"] = (_bad(tmp_path, "miss.pth", good | {"weight": missing}), "dec.conv_pre.bias")
    shaped = weights | {"flow.flows.0.pre.weight": torch.zeros(3, 3, 1)}
    cases["misshaped"] = (_bad(tmp_path, "shape.pth", good | {"weight": shaped}), "flow.flows.0.pre.weight")
    extra = weights | {"dec.conv_post.bias": torch.zeros(1)}
    cases["unexpected"] = (_bad(tmp_path, "extra.pth", good | {"weight": extra}), "dec.conv_post.bias")
    nan = weights | {"emb_g.weight": torch.full_like(weights["emb_g.weight"], float("nan"))}
    cases["nan"] = (_bad(tmp_path, "nan.pth", good | {"weight": nan}), "NaN")
    as_int = weights | {"dec.cond.bias": torch.zeros(16, dtype=torch.int64)}
    cases["int dtype"] = (_bad(tmp_path, "int.pth", good | {"weight": as_int}), "dtype")
    cases["v1 weights as v2"] = (_bad(tmp_path, "ver.pth", good | {"version": "v1"}), "enc_p.emb_phone.weight")
    cases["short config"] = (_bad(tmp_path, "cfg.pth", good | {"config": good["config"][:10]}), "10 entries")
    cases["absent"] = (tmp_path / "nope.pth", "no such file")
    for label, (path, needle) in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_rvc_checkpoint(path)
        assert path.name in str(info.value), label
        assert needle in str(info.value), (label, str(info.value))


def _deflated(path: Path) -> Path:
    """The same checkpoint with every zip record deflated: torch.load inflates each into a buffer of its
    declared size, so zeros make a zip bomb."""
    with zipfile.ZipFile(path) as src:
        records = [(info.filename, src.read(info.filename)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for name, data in records:
            out.writestr(name, data)
    return path


def test_hostile_checkpoints_are_refused_before_they_cost_memory_or_time(tmp_path: Path) -> None:
    good = _rvc_dict(tiny_model(seed=5))
    weights, config = dict(good["weight"]), list(good["config"])
    bomb = _deflated(_bad(tmp_path, "bomb.pth", good | {"weight": weights | {"pad": torch.zeros(4 << 20)}}))
    assert bomb.stat().st_size < 1 << 20  # 16 MB of zeros in well under 1 MB
    cases = {  # each was: memory as declared / minutes building 10^6 layers / RuntimeError / NotImplementedError
        "zip bomb": (bomb, "inflate to"),
        "a million layers": (_bad(tmp_path, "layers.pth", good | {"config": config[:6] + [10**6] + config[7:]}),
                             "n_layers"),
        "sizes past int64": (_bad(tmp_path, "ups.pth", good | {
            "config": config[:12] + [[10**18] * len(config[12])] + config[13:]}), "buildable"),
        "float8 weights": (_bad(tmp_path, "f8.pth", good | {"weight": weights | {
            "emb_g.weight": weights["emb_g.weight"].to(torch.float8_e4m3fn)}}), "float8"),
    }
    for label, (path, needle) in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_rvc_checkpoint(path)
        assert needle in str(info.value), (label, str(info.value))
    stored = _bad(tmp_path, "stored.pth", good)  # torch.save stores records raw: the bound never bites
    assert load_rvc_checkpoint(stored).config.n_layers == config[6]


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("pwned",))


def test_pickled_code_is_never_executed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"weight": {}, "config": [], "x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_rvc_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out
