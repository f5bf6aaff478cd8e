"""Content encoder: RVC's layer choice (§3.5), fairseq and HF loading, safe unpickling, typed errors."""

from __future__ import annotations

import argparse
import collections
import enum
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import HubertConfig, HubertModel

from rvc_lora.convs import use_fast_convolutions
from rvc_lora.errors import AudioError, CheckpointError, ModelUnavailableError, ParameterError
from rvc_lora.pipeline.content import ContentEncoder, build_random_hubert, save_fairseq_hubert, save_hf_hubert

FIXTURES = Path(__file__).parents[1] / ".." / "shared" / "fixtures"
MAKE_HUBERT = FIXTURES / "rvc-pipeline-reference" / "make_hubert.py"

# HuBERT base's conv kernels/strides and 12 layers, tiny widths. hidden / pos-conv kernel = 6 as in base
# (768 / 128), so make_hubert.py's hard-coded weight-norm magnitude applies to it too.
TINY: dict[str, Any] = {
    "hidden_size": 48,
    "num_hidden_layers": 12,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": (8,) * 7,
    "num_conv_pos_embeddings": 8,
    "num_conv_pos_embedding_groups": 2,
    "classifier_proj_size": 8,
}
AUDIO = 0.1 * torch.randn(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # 12 frames


@pytest.fixture(scope="module")
def encoder() -> ContentEncoder:
    return build_random_hubert(TINY, seed=0)


@pytest.fixture(scope="module")
def fairseq_file(encoder: ContentEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_fairseq_hubert(encoder, tmp_path_factory.mktemp("fairseq") / "hubert_base.pt")


def hidden_states(model: HubertModel, audio: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """HF semantics as make_hubert.py's reference used them: hidden_states[k] = output of layer k."""
    with torch.inference_mode():
        return tuple(model(audio.float()[None], output_hidden_states=True).hidden_states)


def rewrite(path: Path, edit: Callable[[dict[str, Any]], object]) -> Path:
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    out = path.with_name("edited.pt")
    torch.save(ckpt, out)
    return out


def test_features_are_rvc_layers(encoder: ContentEncoder) -> None:
    hs = hidden_states(encoder.hubert, AUDIO)
    v1, v2 = encoder.extract(AUDIO, "v1"), encoder.extract(AUDIO, "v2")
    assert len(hs) == 13 and v1.shape == (1, 12, 8) and v2.shape == (1, 12, 48)
    assert torch.equal(v2, hs[12])  # v2: output of layer 12
    with torch.inference_mode():
        assert torch.equal(v1, encoder.final_proj(hs[9]))  # type: ignore[misc]  # v1: layer 9 -> final_proj
    assert not torch.allclose(v2, hs[11]) and (encoder.feature_dim("v1"), encoder.feature_dim("v2")) == (8, 48)


@pytest.mark.parametrize(("length", "frames"), [(400, 1), (719, 1), (720, 2), (4000, 12), (16000, 49)])
def test_frame_count(encoder: ContentEncoder, length: int, frames: int) -> None:
    assert frames == (length - 400) // 320 + 1  # spec §3.5
    assert encoder.num_frames(length) == frames
    assert encoder.extract(torch.zeros(length), "v2").shape[1] == frames


def test_input_shapes_and_dtypes(encoder: ContentEncoder) -> None:
    ref = encoder.extract(AUDIO, "v2")  # float64 [T], cast once to the model dtype like RVC's .float()
    assert torch.equal(encoder.extract(AUDIO.float()[None], "v2"), ref)
    assert not torch.equal(encoder.extract(AUDIO * 2, "v2"), ref)  # no waveform normalisation
    with pytest.raises(AudioError, match="399 samples"):
        encoder.extract(torch.zeros(399), "v2")
    with pytest.raises(AudioError, match=r"\(2, 4000\)"):
        encoder.extract(torch.zeros(2, 4000), "v2")
    with pytest.raises(ParameterError, match="v3"):
        encoder.extract(AUDIO, "v3")  # type: ignore[arg-type]


def test_extract_leaves_global_rng_alone(encoder: ContentEncoder) -> None:
    draws: list[float] = []  # stands in for transformers 4.x, which drew torch.rand([]) per layer even in eval
    hook = encoder.hubert.encoder.layers[0].register_forward_pre_hook(lambda *_: draws.append(float(torch.rand(1))))
    try:
        torch.manual_seed(0)
        before = torch.get_rng_state()
        encoder.extract(AUDIO, "v2")
    finally:
        hook.remove()
    assert draws and torch.equal(torch.get_rng_state(), before)


def test_fairseq_and_hf_files_give_identical_features(
    encoder: ContentEncoder, fairseq_file: Path, tmp_path: Path
) -> None:
    from_fairseq = ContentEncoder.from_path(fairseq_file)
    from_hf = ContentEncoder.from_path(save_hf_hubert(encoder, tmp_path / "hf"))
    for version in ("v1", "v2"):
        ref = encoder.extract(AUDIO, version)
        assert torch.equal(from_fairseq.extract(AUDIO, version), ref)
        assert torch.equal(from_hf.extract(AUDIO, version), ref)


def test_fairseq_file_has_hubert_base_layout(fairseq_file: Path) -> None:
    ckpt = torch.load(fairseq_file, weights_only=True)
    keys = set(ckpt["model"])
    for key in [
        "feature_extractor.conv_layers.0.0.weight",
        "feature_extractor.conv_layers.0.2.weight",
        "feature_extractor.conv_layers.6.0.weight",
        "layer_norm.bias",
        "post_extract_proj.weight",
        "mask_emb",
        "encoder.pos_conv.0.weight_g",
        "encoder.pos_conv.0.weight_v",
        "encoder.pos_conv.0.bias",
        "encoder.layer_norm.weight",
        "encoder.layers.11.self_attn.q_proj.weight",
        "encoder.layers.11.self_attn.out_proj.bias",
        "encoder.layers.11.self_attn_layer_norm.weight",
        "encoder.layers.11.fc1.weight",
        "encoder.layers.11.fc2.bias",
        "encoder.layers.11.final_layer_norm.weight",
        "final_proj.weight",
    ]:
        assert key in keys, key
    assert not any("attention" in k or "parametrizations" in k or "feature_projection" in k for k in keys)
    assert tuple(ckpt["model"]["encoder.pos_conv.0.weight_g"].shape) == (1, 1, 8)
    assert ckpt["cfg"]["model"]["encoder_attention_heads"] == 2 and ckpt["cfg"]["task"]["normalize"] is False
    assert (
        fairseq_file.read_bytes() == save_fairseq_hubert(build_random_hubert(TINY, seed=0), fairseq_file).read_bytes()
    )


def test_hf_save_pretrained_folder_loads(encoder: ContentEncoder, tmp_path: Path) -> None:
    encoder.hubert.save_pretrained(tmp_path)  # transformers' own writer: no final_proj
    loaded = ContentEncoder.from_path(tmp_path)
    assert torch.equal(loaded.extract(AUDIO, "v2"), encoder.extract(AUDIO, "v2"))
    with pytest.raises(CheckpointError, match="final_proj"):
        loaded.extract(AUDIO, "v1")


def test_transformers_reads_our_hf_folder(encoder: ContentEncoder, tmp_path: Path) -> None:
    model = use_fast_convolutions(HubertModel.from_pretrained(save_hf_hubert(encoder, tmp_path)))  # eval, our convs
    assert torch.equal(hidden_states(model, AUDIO)[12], encoder.extract(AUDIO, "v2"))


def test_hf_bin_with_prefix_and_old_weight_norm_names(encoder: ContentEncoder, tmp_path: Path) -> None:
    save_hf_hubert(encoder, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    old = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    state = {}
    for key, value in encoder.hubert.state_dict().items():
        for new, legacy in old.items():
            key = key.replace(new, legacy)
        state["hubert." + key] = value
    state.update({f"final_proj.{k}": v for k, v in encoder.final_proj.state_dict().items()})  # type: ignore[union-attr]
    state["lm_head.weight"] = torch.zeros(3, 48)  # a task head beside the encoder is ignored
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = ContentEncoder.from_path(tmp_path)
    assert any(k.endswith("weight_g") for k in state)
    assert torch.equal(loaded.extract(AUDIO, "v1"), encoder.extract(AUDIO, "v1"))


@pytest.fixture
def fake_fairseq(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """Classes and functions under fairseq/omegaconf names, as a real hubert_base.pt pickles them. `fired` records
    every call of the trap function, which a plain (unsafe) unpickler would make."""
    fired: list[str] = []

    def module(name: str, **attrs: Any) -> None:
        mod = types.ModuleType(name)
        for attr, value in attrs.items():
            value.__module__, value.__qualname__ = name, attr
            setattr(mod, attr, value)
        monkeypatch.setitem(sys.modules, name, mod)

    def fire(what: str) -> str:
        fired.append(what)
        return what

    class Trap:
        def __reduce__(self) -> tuple[Callable[[str], str], tuple[str]]:
            return fire, ("fired",)

    class Dictionary:
        def __init__(self) -> None:
            self.symbols, self.indices = ["<s>", "<pad>"], {"<s>": 0, "<pad>": 1}

    class DictConfig:  # omegaconf keeps container items in _content and scalars in value nodes' _val
        def __init__(self, content: dict[str, Any]) -> None:
            self._content, self._parent = content, None

    class AnyNode:
        def __init__(self, value: Any) -> None:
            self._val, self._parent = value, None

    Choices = enum.Enum("Choices", {"default": "default", "layer_norm": "layer_norm"})
    for name in ["fairseq", "fairseq.data", "omegaconf"]:
        module(name)
    module("fairseq.data.dictionary", Dictionary=Dictionary)
    module("fairseq.trap", fire=fire, Trap=Trap)
    module("fairseq.dataclass.constants", Choices=Choices)
    module("omegaconf.dictconfig", DictConfig=DictConfig)
    module("omegaconf.nodes", AnyNode=AnyNode)
    kinds = {"Trap": Trap, "Dictionary": Dictionary, "DictConfig": DictConfig, "AnyNode": AnyNode, "Choices": Choices}
    yield kinds, fired


@pytest.mark.parametrize("config_form", ["dict", "namespace", "omegaconf"])
def test_fairseq_foreign_objects_load_inert(
    fairseq_file: Path, encoder: ContentEncoder, fake_fairseq: tuple[dict[str, Any], list[str]], config_form: str
) -> None:
    kinds, fired = fake_fairseq

    def edit(ckpt: dict[str, Any]) -> None:
        model_cfg = dict(ckpt["cfg"]["model"], extractor_mode=kinds["Choices"]("default"))
        if config_form == "namespace":
            ckpt["args"], ckpt["cfg"] = argparse.Namespace(**model_cfg), None
        elif config_form == "omegaconf":
            nodes = {k: kinds["AnyNode"](v) for k, v in model_cfg.items()}
            ckpt["cfg"] = kinds["DictConfig"]({"model": kinds["DictConfig"](nodes)})
        else:
            ckpt["cfg"]["model"] = model_cfg
        ckpt["task_state"] = {"dictionaries": [kinds["Dictionary"]()]}
        ckpt["extra_state"] = {"hook": kinds["Trap"]()}
        ckpt["model"]["label_embs_concat"] = torch.zeros(504, 8)

    path = rewrite(fairseq_file, edit)
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(path, weights_only=True)  # the file really holds non-tensor globals
    torch.load(path, weights_only=False)
    assert fired == ["fired"]  # ... and an unsafe load really runs the trap
    loaded = ContentEncoder.from_path(path)
    assert fired == ["fired"]  # ours did not
    assert loaded.hubert.config.num_attention_heads == 2  # read from the config (48 // 64 would be 0)
    assert torch.equal(loaded.extract(AUDIO, "v1"), encoder.extract(AUDIO, "v1"))


def test_fairseq_without_config_uses_base_defaults(tmp_path: Path) -> None:
    wide = build_random_hubert(dict(TINY, hidden_size=128, num_conv_pos_embeddings=16), seed=1)  # 128 / 64 = 2 heads
    path = save_fairseq_hubert(wide, tmp_path / "h.pt")
    loaded = ContentEncoder.from_path(rewrite(path, lambda c: c.update(cfg=None)))
    assert torch.equal(loaded.extract(AUDIO, "v2"), wide.extract(AUDIO, "v2"))


@pytest.mark.parametrize(
    ("layers", "error"),
    [
        ("[(8, 10, 5)] + [(8, 3, 2)] * 4 + [(8, 2, 2)] * 2", None),  # fairseq's own spelling
        ("__import__('pathlib').Path('{marker}').touch()", "conv_feature_layers"),
        ("[(8, 10, 5)] * 100000", "conv_feature_layers"),
        ("[(8, 10, 5)] + [(8, 3, 2)] * 6", "kernels"),
    ],
)
def test_fairseq_conv_layers_parsed_as_literals(
    fairseq_file: Path, tmp_path: Path, layers: str, error: str | None
) -> None:
    marker = tmp_path / "executed"
    path = rewrite(fairseq_file, lambda c: c["cfg"]["model"].update(conv_feature_layers=layers.format(marker=marker)))
    if error is None:
        assert ContentEncoder.from_path(path).extract(AUDIO, "v2").shape == (1, 12, 48)
    else:
        with pytest.raises(CheckpointError, match=error):
            ContentEncoder.from_path(path)
    assert not marker.exists()


def _drop(key: str) -> Callable[[dict[str, Any]], object]:
    return lambda c: c["model"].pop(key)


def _put(key: str, value: torch.Tensor) -> Callable[[dict[str, Any]], object]:
    return lambda c: c["model"].__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop("encoder.layers.3.fc1.weight"), "missing key 'encoder.layers.3.fc1.weight'"),
        (_drop("encoder.pos_conv.0.weight_v"), "missing key 'encoder.pos_conv.0.weight_v'"),
        (_put("encoder.layers.3.fc1.weight", torch.zeros(64, 40)), r"encoder.layers.3.fc1.weight has shape \(64, 40\)"),
        (_put("encoder.layers.0.self_attn.rel_bias", torch.zeros(3)), "unexpected key 'encoder.layers.0.self_attn.rel"),
        (_put("final_proj.weight", torch.zeros(8, 40)), "final_proj"),
        (lambda c: c.update(model={"weight": {}}), "no fairseq HuBERT state dict"),
        (lambda c: c["cfg"]["model"].update(layer_norm_first=True), "post-norm"),
    ],
)
def test_fairseq_checkpoint_errors(fairseq_file: Path, edit: Callable[[dict[str, Any]], object], message: str) -> None:
    path = rewrite(fairseq_file, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        ContentEncoder.from_path(path)
    assert str(path) in str(info.value)


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="nope.pt"):
        ContentEncoder.from_path(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        ContentEncoder.from_path(garbage)
    torch.save({"weight": {"emb_g.weight": torch.zeros(1, 2)}, "config": [1, 2]}, tmp_path / "voice.pth")
    with pytest.raises(CheckpointError, match="voice.pth.*'model'"):
        ContentEncoder.from_path(tmp_path / "voice.pth")
    with pytest.raises(CheckpointError, match="config.json"):
        ContentEncoder.from_path(tmp_path)  # a folder, but not a HF model folder


def test_version_needs_its_layer_and_projection(tmp_path: Path) -> None:
    shallow = build_random_hubert(dict(TINY, num_hidden_layers=10), seed=2)
    assert shallow.extract(AUDIO, "v1").shape == (1, 12, 8)
    with pytest.raises(CheckpointError, match="layer 12.*only 10 layers"):
        shallow.extract(AUDIO, "v2")
    path = rewrite(
        save_fairseq_hubert(shallow, tmp_path / "s.pt"),
        lambda c: [c["model"].pop(f"final_proj.{k}") for k in ("weight", "bias")],
    )
    no_proj = ContentEncoder.from_path(path)
    with pytest.raises(CheckpointError, match=f"{path}.*final_proj"):
        no_proj.extract(AUDIO, "v1")


def test_dtype_and_device(fairseq_file: Path, encoder: ContentEncoder) -> None:
    half = ContentEncoder.from_path(fairseq_file, dtype=torch.bfloat16)
    out = half.extract(AUDIO, "v2")
    assert out.dtype == torch.bfloat16 and half.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), encoder.extract(AUDIO, "v2"), atol=0.1, rtol=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_matches_cpu_fp32(fairseq_file: Path, encoder: ContentEncoder) -> None:
    gpu = ContentEncoder.from_path(fairseq_file, device="cuda", dtype=torch.float16)
    torch.manual_seed(0)
    before = torch.cuda.get_rng_state()
    out = gpu.extract(AUDIO, "v1")
    assert out.device.type == "cuda" and out.dtype == torch.float16
    assert torch.equal(torch.cuda.get_rng_state(), before)
    torch.testing.assert_close(out.float().cpu(), encoder.extract(AUDIO, "v1"), atol=2e-2, rtol=2e-2)


def test_random_encoder_is_seeded(encoder: ContentEncoder) -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    again, other = build_random_hubert(TINY, seed=0), build_random_hubert(TINY, seed=1)
    assert torch.equal(torch.get_rng_state(), before)  # numpy draws only
    assert torch.equal(again.extract(AUDIO, "v1"), encoder.extract(AUDIO, "v1"))
    assert not torch.equal(other.extract(AUDIO, "v1"), encoder.extract(AUDIO, "v1"))


@pytest.mark.skipif(not MAKE_HUBERT.is_file(), reason="shared fixtures (../shared/fixtures) not present")
def test_random_encoder_matches_make_hubert(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("make_hubert", MAKE_HUBERT)
    assert spec is not None and spec.loader is not None
    make_hubert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_hubert)
    tiny_transformers = types.ModuleType("transformers")  # make_hubert.py imports inside build(): full size takes 8 s
    tiny_transformers.HubertConfig, tiny_transformers.HubertModel = lambda: HubertConfig(**TINY), HubertModel  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transformers", tiny_transformers)
    reference = make_hubert.build(1234).state_dict()
    ours = build_random_hubert(TINY, seed=1234).hubert.state_dict()
    assert list(reference) == list(ours)
    for key, value in reference.items():
        assert torch.equal(value, ours[key]), key


# --- hubert_base.pt as fairseq pickles it (spec §3.5): every global inert, every config form read --------------------

# fairseq's own spelling of HuBERT base's conv stack, with the tiny widths
FAIRSEQ_CONV_LAYERS = "[(8,10,5)] + [(8,3,2)] * 4 + [(8,2,2)] * 2"


@pytest.fixture
def omegaconf_like() -> Iterator[dict[str, Any]]:
    """Classes under the omegaconf/fairseq module names a real hubert_base.pt can name, pickling as the real ones do
    (omegaconf keeps `_metadata`/`_parent`/`_content` resp. `_val`, drops `_flags_cache`, holds `typing` objects and a
    `defaultdict` resolver cache; fairseq's ChoiceEnum is a str Enum). Registered only while the file is written."""
    added: list[str] = []

    def module(name: str, **attrs: Any) -> None:
        mod = types.ModuleType(name)
        for attr, value in attrs.items():
            value.__module__, value.__qualname__ = name, attr
            setattr(mod, attr, value)
        sys.modules[name] = mod
        added.append(name)

    class Metadata:
        def __init__(self, key: Any, ref_type: Any = Any, object_type: Any = None) -> None:
            self.ref_type, self.object_type, self.optional, self.key = ref_type, object_type, True, key
            self.flags: dict[str, bool] = {}

    class ContainerMetadata(Metadata):
        def __init__(self, key: Any, object_type: Any) -> None:
            super().__init__(key, Any, object_type)
            self.key_type, self.element_type = Any, Any
            self.resolver_cache: collections.defaultdict[str, dict[str, Any]] = collections.defaultdict(dict)
            self.resolver_cache["oc.env"]["HOME"] = "/root"  # SETITEMS into the defaultdict

    class Node:
        def __init__(self, value: Any, parent: Any, key: Any) -> None:
            self._val, self._parent, self._metadata, self._flags_cache = value, parent, Metadata(key), {"x": 1}

        def __getstate__(self) -> dict[str, Any]:
            return {k: v for k, v in self.__dict__.items() if k != "_flags_cache"}

    class DictConfig:
        def __init__(self, content: dict[str, Any], parent: Any = None, key: Any = None) -> None:
            self._parent, self._flags_cache = parent, {}
            self._metadata = ContainerMetadata(key, dict[str, Any])
            self._content = {k: wrap(v, self, k) for k, v in content.items()}

        __getstate__ = Node.__getstate__

    class ListConfig(DictConfig):
        def __init__(self, content: list[Any], parent: Any = None, key: Any = None) -> None:
            self._parent, self._flags_cache, self._metadata = parent, {}, ContainerMetadata(key, list)
            self._content = [wrap(v, self, i) for i, v in enumerate(content)]  # type: ignore[assignment]

    class StrEnum(str, enum.Enum):
        pass

    Choices = StrEnum("Choices", {"default": "default", "layer_norm": "layer_norm"})  # type: ignore[call-overload]
    nodes = {
        name: type(name, (Node,), {})
        for name in ["AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode"]
    }

    def wrap(value: Any, parent: Any, key: Any) -> Any:
        if isinstance(value, dict):
            return DictConfig(value, parent, key)
        if isinstance(value, list):
            return ListConfig(value, parent, key)
        kind = {bool: "BooleanNode", int: "IntegerNode", float: "FloatNode", str: "StringNode", Choices: "EnumNode"}
        return nodes[kind.get(type(value), "AnyNode")](value, parent, key)

    class Dictionary:  # fairseq.data.dictionary.Dictionary: what made torch 2.6 refuse RVC's hubert_base.pt
        def __init__(self) -> None:
            self.bos_word, self.symbols, self.count = "<s>", ["<s>", "<pad>", "</s>", "<unk>", "0"], [1, 1, 1, 1, 9]
            self.indices, self.nspecial = {s: i for i, s in enumerate(self.symbols)}, 4

    for name in ["omegaconf", "fairseq", "fairseq.data", "fairseq.dataclass"]:
        module(name)
    module("omegaconf.base", Metadata=Metadata, ContainerMetadata=ContainerMetadata)
    module("omegaconf.dictconfig", DictConfig=DictConfig)
    module("omegaconf.listconfig", ListConfig=ListConfig)
    module("omegaconf.nodes", **nodes)
    module("fairseq.dataclass.constants", Choices=Choices)
    module("fairseq.data.dictionary", Dictionary=Dictionary)
    try:
        yield {"DictConfig": DictConfig, "Choices": Choices, "Dictionary": Dictionary}
    finally:
        for name in added:
            sys.modules.pop(name, None)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
@pytest.mark.parametrize(
    "form", ["cfg-dict", "cfg-omegaconf", "args-namespace", "args-and-cfg-omegaconf", "args-and-cfg-dict"]
)
def test_fairseq_checkpoint_as_fairseq_pickles_it(
    fairseq_file: Path, encoder: ContentEncoder, omegaconf_like: dict[str, Any], tmp_path: Path, form: str, legacy: bool
) -> None:
    ckpt = torch.load(fairseq_file, weights_only=True)
    model_cfg = dict(
        ckpt["cfg"]["model"],
        extractor_mode=omegaconf_like["Choices"]("default"),
        conv_feature_layers=FAIRSEQ_CONV_LAYERS,
        layer_norm_first=False,
        feature_grad_mult=0.1,
        layerdrop=0.05,
        encoder_attention_heads=2,  # 48 hidden // 64 would give 0: proves the value is read through the stand-ins
        label_rate=50.0,
    )
    task_cfg = {"_name": "hubert_pretraining", "normalize": False, "sample_rate": 16000, "labels": ["km"]}
    cfg = {"_name": None, "model": model_cfg, "task": task_cfg, "common": {"fp16": True, "seed": 1337}}
    if form.startswith("args"):
        ckpt["args"] = argparse.Namespace(**dict(model_cfg, extractor_mode="default", arch="hubert"))
    ckpt["cfg"] = {
        "cfg-dict": cfg,
        "args-and-cfg-dict": cfg,
        "cfg-omegaconf": omegaconf_like["DictConfig"](cfg),
        "args-and-cfg-omegaconf": omegaconf_like["DictConfig"](cfg),
        "args-namespace": None,
    }[form]
    ckpt["model"]["label_embs_concat"] = torch.zeros(504, 8, dtype=torch.float16)
    ckpt["model"] = collections.OrderedDict((k, v.half()) for k, v in ckpt["model"].items())  # fp16 as distributed
    ckpt["criterion"] = None
    ckpt["optimizer_history"] = [{"criterion_name": "HubertCriterion", "num_updates": 400000, "lr_scheduler_state": {}}]
    ckpt["task_state"] = {"dictionaries": [omegaconf_like["Dictionary"]()]}
    ckpt["extra_state"] = {
        "metrics": collections.OrderedDict(train=[("loss", "AverageMeter", {"val": np.float64(1.5), "count": 3})]),
        "best": np.float32(0.25),
        "recent": collections.deque([1, 2], maxlen=4),
        "train_iterator": {"epoch": 12, "iterations_in_epoch": 0, "shuffle": True},
    }
    path = tmp_path / "hubert_base.pt"
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    for name in [n for n in sys.modules if n.split(".")[0] in ("omegaconf", "fairseq")]:
        del sys.modules[name]  # from here on the file names modules that do not exist, as on a machine without them

    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(path, weights_only=True)
    loaded = ContentEncoder.from_path(path)
    assert not [n for n in sys.modules if n.split(".")[0] in ("omegaconf", "fairseq")]  # nothing imported
    assert loaded.hubert.config.num_attention_heads == 2
    assert list(loaded.hubert.config.conv_stride) == [5, 2, 2, 2, 2, 2, 2]
    rounded = rewrite(fairseq_file, lambda c: c.update(model={k: v.half().float() for k, v in c["model"].items()}))
    expected = ContentEncoder.from_path(rounded)
    for version in ("v1", "v2"):
        assert torch.equal(loaded.extract(AUDIO, version), expected.extract(AUDIO, version))
    assert not torch.equal(expected.extract(AUDIO, "v2"), encoder.extract(AUDIO, "v2"))  # fp16 storage is visible


@pytest.mark.parametrize(
    ("setting", "value", "loads"),
    [
        ("layer_norm_first", True, False),
        ("layer_norm_first", "true", False),
        ("layer_norm_first", None, True),  # unreadable value: the weights decide
        ("extractor_mode", "layer_norm", False),
        ("extractor_mode", None, True),
        ("encoder_attention_heads", None, False),  # falls back to hidden // 64 = 0 heads: refused with a message
        ("conv_feature_layers", None, True),  # base strides from the kernels
    ],
)
def test_fairseq_config_values_that_cannot_be_read(fairseq_file: Path, setting: str, value: Any, loads: bool) -> None:
    path = rewrite(fairseq_file, lambda c: c["cfg"]["model"].update({setting: value}))
    if loads:
        assert ContentEncoder.from_path(path).extract(AUDIO, "v2").shape == (1, 12, 48)
    else:
        with pytest.raises(CheckpointError, match=str(path)):
            ContentEncoder.from_path(path)


# HuBERT base / ContentVec state dict as the spec's key table lists it (fairseq names, shapes)
HUBERT_BASE_KEYS: dict[str, tuple[int, ...]] = {
    "feature_extractor.conv_layers.0.0.weight": (512, 1, 10),
    **{f"feature_extractor.conv_layers.{i}.0.weight": (512, 512, 3) for i in range(1, 5)},
    **{f"feature_extractor.conv_layers.{i}.0.weight": (512, 512, 2) for i in (5, 6)},
    "feature_extractor.conv_layers.0.2.weight": (512,),
    "feature_extractor.conv_layers.0.2.bias": (512,),
    "layer_norm.weight": (512,),
    "layer_norm.bias": (512,),
    "post_extract_proj.weight": (768, 512),
    "post_extract_proj.bias": (768,),
    "mask_emb": (768,),
    "encoder.pos_conv.0.weight_g": (1, 1, 128),
    "encoder.pos_conv.0.weight_v": (768, 48, 128),
    "encoder.pos_conv.0.bias": (768,),
    "encoder.layer_norm.weight": (768,),
    "encoder.layer_norm.bias": (768,),
    **{
        f"encoder.layers.{n}.{name}.{p}": shape if p == "weight" else shape[:1]
        for n in range(12)
        for name, shape in [
            *[(f"self_attn.{x}_proj", (768, 768)) for x in "kvq"],
            ("self_attn.out_proj", (768, 768)),
            ("self_attn_layer_norm", (768,)),
            ("fc1", (3072, 768)),
            ("fc2", (768, 3072)),
            ("final_layer_norm", (768,)),
        ]
        for p in ("weight", "bias")
    },
    "final_proj.weight": (256, 768),
    "final_proj.bias": (256,),
    "label_embs_concat": (504, 256),
}


def test_hubert_base_keys_map_onto_hubert_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every key of the real file maps to a HubertModel key of the same shape (or is dropped: label_embs_concat), and
    the config built from the shapes is the spec's required HF config."""
    from rvc_lora.pipeline import content

    state = {k: torch.empty(shape, device="meta") for k, shape in HUBERT_BASE_KEYS.items()}
    assert len(state) == 7 + 2 + 2 + 2 + 1 + 3 + 2 + 12 * 16 + 2 + 1
    monkeypatch.setattr(content, "_torch_load_weights_only", lambda _: {"args": None, "cfg": None, "model": state})
    config, weights = content._read_fairseq(tmp_path / "hubert_base.pt")
    assert "label_embs_concat" not in weights and "masked_spec_embed" in weights
    required = {
        "feat_extract_norm": "group",
        "conv_bias": False,
        "feat_proj_layer_norm": True,
        "do_stable_layer_norm": False,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "hidden_act": "gelu",
        "num_conv_pos_embeddings": 128,
        "num_conv_pos_embedding_groups": 16,
        "layer_norm_eps": 1e-5,
        "classifier_proj_size": 256,
        "conv_dim": [512] * 7,
        "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    }
    assert {
        k: getattr(config, k) if not isinstance(getattr(config, k), tuple) else list(getattr(config, k))
        for k in required
    } == required
    with torch.device("meta"):
        model = HubertModel(config)
    expected = {content._canonical_weight_norm(k): tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items() if not k.startswith("final_proj.")}
    assert got == expected


def test_fp16_group_norm_runs_in_fp32_as_fairseq(fairseq_file: Path) -> None:
    """fairseq's Fp32GroupNorm: the conv-0 norm of a half model computes in fp32 and rounds once."""
    half = ContentEncoder.from_path(fairseq_file, dtype=torch.bfloat16)
    norm = half.hubert.feature_extractor.conv_layers[0].layer_norm
    x = torch.randn(1, 8, 50, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16) * 30
    expected = torch.nn.functional.group_norm(x.float(), 8, norm.weight.float(), norm.bias.float(), 1e-5)
    assert torch.equal(norm(x), expected.to(torch.bfloat16))
    assert half.hubert.state_dict().keys() == ContentEncoder.from_path(fairseq_file).hubert.state_dict().keys()
