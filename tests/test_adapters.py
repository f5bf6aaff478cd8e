"""Adapter files: safetensors round trip, metadata, validation against the base, hostile files."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rvc_lora import (
    AdapterError,
    AdapterMismatchError,
    LoRAConfig,
    SynthesizerLoRA,
    load_adapter,
    load_synthesizer_with_lora,
    save_adapter,
    save_rvc_checkpoint,
)
from tests.conftest import run_infer, tiny_inputs, tiny_model

CFG = LoRAConfig(r=4, lora_alpha=8, target_modules=["ups", "resblocks"])


@pytest.fixture
def voiced(tmp_path: Path) -> tuple[Path, SynthesizerLoRA, Path]:
    base_path = save_rvc_checkpoint(tmp_path / "base.pth", tiny_model(seed=7))
    model = load_synthesizer_with_lora(base_path, CFG)
    gen = torch.Generator().manual_seed(0)
    model.load_lora_weights({k: torch.randn(v.shape, generator=gen) * 0.05
                             for k, v in model.get_lora_state_dict().items()})
    adapter_path = save_adapter(tmp_path / "voice.safetensors", model, name="demo voice")
    return base_path, model, adapter_path


def test_round_trip_reproduces_the_voice(voiced: tuple[Path, SynthesizerLoRA, Path]) -> None:
    base_path, model, adapter_path = voiced
    inputs = tiny_inputs(model.base)
    expected = run_infer(model, inputs)[0]
    adapter = load_adapter(adapter_path)
    assert (adapter.info.name, adapter.info.r, adapter.info.version, adapter.info.f0) == ("demo voice", 4, "v2", True)
    assert adapter.info.base_fingerprint == model.fingerprint
    fresh = load_synthesizer_with_lora(base_path, CFG, max_rank=8)  # wider slots: zero-padded
    fresh.load_adapter(adapter_path)  # zero-padded slots change the summation order only
    torch.testing.assert_close(run_infer(fresh, inputs)[0], expected, atol=1e-6, rtol=0)
    built = SynthesizerLoRA.from_adapter(base_path, adapter_path)
    torch.testing.assert_close(run_infer(built, inputs)[0], expected, atol=0, rtol=0)


def test_adapter_for_another_base_is_refused_before_copying(tmp_path: Path,
                                                            voiced: tuple[Path, SynthesizerLoRA, Path]) -> None:
    _, _, adapter_path = voiced
    other = load_synthesizer_with_lora(save_rvc_checkpoint(tmp_path / "other.pth", tiny_model(seed=8)), CFG)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match="made for base"):
        other.load_adapter(adapter_path)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    narrow = load_synthesizer_with_lora(voiced[0], LoRAConfig(r=4, lora_alpha=4, target_modules=["ups"]))
    with pytest.raises(AdapterMismatchError, match="no LoRA slot"):
        narrow.load_adapter(adapter_path)
    small = load_synthesizer_with_lora(voiced[0], LoRAConfig(r=2, lora_alpha=2, target_modules=["ups", "resblocks"]))
    with pytest.raises(AdapterMismatchError, match="rank 4"):
        small.load_adapter(adapter_path)


def _rewrite(src: Path, dst: Path, *, tensors: dict | None = None, meta: dict | None = None) -> Path:
    adapter = load_adapter(src)
    data = dict(adapter.tensors) if tensors is None else tensors
    metadata = adapter.info.to_metadata() | (meta or {})
    save_file(data, str(dst), metadata=metadata)
    return dst


def test_hostile_and_malformed_files(tmp_path: Path, voiced: tuple[Path, SynthesizerLoRA, Path]) -> None:
    _, _, good = voiced
    tensors = dict(load_adapter(good).tensors)
    first_a = next(k for k in tensors if k.endswith("lora_A"))
    pickled = tmp_path / "pickle.safetensors"
    pickled.write_bytes(pickle.dumps({"x": 1}))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + b'{"a": 1}')
    cases = {
        "pickle": (pickled, "not a safetensors"),
        "huge header": (huge, "header"),
        "empty": (tmp_path / "empty.safetensors", "too short"),
        "missing file": (tmp_path / "absent.safetensors", "no such"),
        "lying rank": (_rewrite(good, tmp_path / "r.safetensors", meta={"r": "8"}), "metadata says r=8"),
        "nan": (_rewrite(good, tmp_path / "nan.safetensors",
                         tensors=tensors | {first_a: torch.full_like(tensors[first_a], float("nan"))}), "NaN"),
        "int dtype": (_rewrite(good, tmp_path / "int.safetensors",
                               tensors=tensors | {first_a: tensors[first_a].to(torch.int32)}), "dtype"),
        "extra key": (_rewrite(good, tmp_path / "x.safetensors", tensors=tensors | {"evil": torch.zeros(1)}),
                      "unexpected tensor"),
        "missing pair": (_rewrite(good, tmp_path / "p.safetensors",
                                  tensors={k: v for k, v in tensors.items() if k != first_a}), "needs both"),
        "no metadata": (_rewrite(good, tmp_path / "m.safetensors", meta={"format": "other"}), "format"),
        "bad targets": (_rewrite(good, tmp_path / "t.safetensors", meta={"target_modules": json.dumps("ups")}),
                        "JSON list"),
    }
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for label, (path, needle) in cases.items():
        with pytest.raises(AdapterError) as info:
            load_adapter(path)
        assert needle in str(info.value), (label, str(info.value))


def _named_twice(src: Path, dst: Path, key: str) -> Path:
    """`src` with a second header entry for `key` (same offsets): safetensors would keep one silently."""
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header)[:-1] + f", {json.dumps(key)}: {json.dumps(header[key])}}}"
    text += " " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data[8 + n :])
    return dst


def test_files_that_would_fail_later_or_cost_too_much_are_refused(tmp_path: Path,
                                                                  voiced: tuple[Path, SynthesizerLoRA, Path]) -> None:
    _, _, good = voiced
    tensors = dict(load_adapter(good).tensors)
    first_a = next(k for k in tensors if k.endswith("lora_A"))
    first_b = first_a.replace("lora_A", "lora_B")
    empty = {f"layer{i}.lora_{ab}": torch.zeros((4, 0) if ab == "A" else (0, 4)) for i in range(4097) for ab in "AB"}
    cases = {  # each was: NotImplementedError (500) / stored, then NaN output / stored / seconds and memory
        "float8": (_rewrite(good, tmp_path / "f8.safetensors",
                            tensors=tensors | {first_a: tensors[first_a].to(torch.float8_e4m3fn)}), "float8"),
        "alpha folds past fp16": (_rewrite(good, tmp_path / "alpha.safetensors", meta={"lora_alpha": "1e300"}),
                                  "once lora_alpha/r"),
        "value past fp16": (_rewrite(good, tmp_path / "big.safetensors",
                                     tensors=tensors | {first_b: tensors[first_b] + 1e5}), "float16 range"),
        "named twice": (_named_twice(good, tmp_path / "twice.safetensors", first_a), "more than once"),
        "format_version 0": (_rewrite(good, tmp_path / "v0.safetensors", meta={"format_version": "0"}),
                             "format_version 0"),
        "long name": (_rewrite(good, tmp_path / "name.safetensors", meta={"name": "x" * 300}), "300 characters"),
        "8194 tensors": (_rewrite(good, tmp_path / "many.safetensors", tensors=empty), "8194 tensors"),
        "report not JSON": (_rewrite(good, tmp_path / "rj.safetensors", meta={"extraction": "{snr"}),
                            "extraction is not JSON"),
        "report nested deep": (_rewrite(good, tmp_path / "rd.safetensors", meta={"extraction": "[" * 100_000}),
                               "extraction is not JSON"),
        "report a list": (_rewrite(good, tmp_path / "rl.safetensors", meta={"extraction": "[1]"}), "JSON object"),
        "report too long": (_rewrite(good, tmp_path / "rb.safetensors",
                                     meta={"extraction": json.dumps({"notes": ["x" * 1_000_001]})}), "at most"),
    }
    for label, (path, needle) in cases.items():
        with pytest.raises(AdapterError) as info:
            load_adapter(path)
        assert needle in str(info.value), (label, str(info.value))


def test_fp16_adapter_files_are_half_the_size(tmp_path: Path, voiced: tuple[Path, SynthesizerLoRA, Path]) -> None:
    _, model, full = voiced
    half = save_adapter(tmp_path / "half.safetensors", model, dtype=torch.float16)
    assert half.stat().st_size < full.stat().st_size
    assert 2 * load_adapter(half).nbytes() == load_adapter(full).nbytes()
    assert all(t.dtype == torch.float16 for t in load_adapter(half).tensors.values())
