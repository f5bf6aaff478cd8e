"""LoRAConfig, weight-norm folding, injection by name pattern, in-place adapter loading, full deltas."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rvc_lora.errors import AdapterError, AdapterMismatchError, ConfigError
from rvc_lora.lora import (
    FULL_DELTA_PREFIX,
    LoRAConfig,
    LoRAConv1d,
    LoRAConvTranspose1d,
    LoRAEmbedding,
    LoRALinear,
    base_state_dict,
    fold_weight_norm,
    full_delta_slots,
    inject_lora,
    load_lora_weights,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    name_matches,
    reset_lora,
    unmerge_lora,
)

WN: dict[str, Callable[[nn.Module], nn.Module]] = {
    "old": nn.utils.weight_norm,
    "new": nn.utils.parametrizations.weight_norm,
}


class LayerNorm(nn.Module):
    """Channel LayerNorm with RVC's `gamma`/`beta` names. `[B, C, T] -> [B, C, T]`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.transpose(1, -1), self.gamma.shape, self.gamma, self.beta).transpose(1, -1)


class Attn(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv_q, self.conv_k = nn.Conv1d(ch, ch, 1), nn.Conv1d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        q: Tensor = self.conv_q(x)
        k: Tensor = self.conv_k(x)
        return x + torch.tanh(q) * k


class Enc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb_phone = nn.Linear(5, 8)
        self.attn_layers = nn.ModuleList([Attn(8), Attn(8)])
        self.norm = LayerNorm(8)

    def forward(self, phone: Tensor) -> Tensor:
        x: Tensor = self.emb_phone(phone).transpose(1, 2)  # [B, 8, T]
        for layer in self.attn_layers:
            x = layer(x)
        out: Tensor = self.norm(x)
        return out


class Block(nn.Module):
    def __init__(self, ch: int, wn: Callable[[nn.Module], nn.Module]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList([wn(nn.Conv1d(ch, ch, 3, dilation=d, padding=d)) for d in (1, 3)])
        self.convs2 = nn.ModuleList([wn(nn.Conv1d(ch, ch, 3, padding=1)) for _ in (1, 3)])

    def forward(self, x: Tensor) -> Tensor:
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, 0.1)), 0.1))
        return x


class Dec(nn.Module):
    def __init__(self, wn: Callable[[nn.Module], nn.Module]) -> None:
        super().__init__()
        self.conv_pre = nn.Conv1d(8, 8, 3, padding=1)
        self.cond = nn.Conv1d(4, 8, 1)
        self.ups = nn.ModuleList([wn(nn.ConvTranspose1d(8, 6, 4, stride=2, padding=1))])
        self.resblocks = nn.ModuleList([Block(6, wn)])
        self.conv_post = wn(nn.Conv1d(6, 1, 3, padding=1, bias=False))

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        x = self.conv_pre(x) + self.cond(g)
        for up, block in zip(self.ups, self.resblocks, strict=True):
            x = block(up(F.leaky_relu(x, 0.1)))
        return torch.tanh(self.conv_post(x))


class Toy(nn.Module):
    """phone `[B, T, 5]`, sid `[B]` -> `[B, 1, 2T]`; attribute names follow RVC's."""

    def __init__(self, api: str = "old") -> None:
        super().__init__()
        wn = WN[api]
        self.enc_p = Enc()
        self.emb_g = nn.Embedding(3, 4)
        self.dec = Dec(wn)
        with torch.no_grad():  # every parameter random, so every one of them matters
            for p in self.parameters():
                p.normal_(0.0, 0.4)

    def forward(self, phone: Tensor, sid: Tensor) -> Tensor:
        out: Tensor = self.dec(self.enc_p(phone), self.emb_g(sid).unsqueeze(-1))
        return out


TARGETS = ["ups", "resblocks", "enc_p.emb_phone", "enc_p.attn_layers.*.conv_q", "emb_g"]
WRAPPED = {
    "dec.ups.0": LoRAConvTranspose1d,
    **{f"dec.resblocks.0.convs{i}.{j}": LoRAConv1d for i in (1, 2) for j in (0, 1)},
    "enc_p.emb_phone": LoRALinear,
    "enc_p.attn_layers.0.conv_q": LoRAConv1d,
    "enc_p.attn_layers.1.conv_q": LoRAConv1d,
    "emb_g": LoRAEmbedding,
}
FULL = ["*.bias", "*.gamma", "enc_p.norm.beta"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors here are tiny: intra-op threads cost more time than they save
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def inputs() -> tuple[Tensor, Tensor]:
    return torch.randn(2, 7, 5), torch.tensor([0, 2])


def injected(max_rank: int = 4, full: list[str] | None = None, api: str = "old") -> tuple[Toy, Toy]:
    """(untouched original, injected copy)."""
    model, lora = Toy(api), Toy(api)
    lora.load_state_dict(model.state_dict())  # not deepcopy: old-API weight norm cannot be deep-copied
    inject_lora(lora, LoRAConfig(r=2, lora_alpha=4, target_modules=TARGETS, full_delta_modules=full or FULL), max_rank)
    return model, lora


def random_state(model: nn.Module, rank: int = 4, scale: float = 0.2) -> dict[str, Tensor]:
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A"] = scale * torch.randn(rank, layer.lora_A.shape[1])
        state[f"{name}.lora_B"] = scale * torch.randn(layer.lora_B.shape[0], rank)
    if (slots := full_delta_slots(model)) is not None:
        state.update(
            {FULL_DELTA_PREFIX + n: scale * torch.randn_like(slots.base(i)) for i, n in enumerate(slots.names)}
        )
    return state


def all_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer (non-persistent ones too), by name, as clones."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {n: t.detach().clone() for n, t in named}


def ptrs(model: nn.Module) -> dict[str, int]:
    return {n: t.data_ptr() for n, t in [*model.named_parameters(), *model.named_buffers()]}


# ---- LoRAConfig ----------------------------------------------------------------------------------

BAD_CONFIGS: list[tuple[dict[str, Any], str]] = [  # (change to a good config, message)
    ({"r": 0}, "LoRAConfig.r must be an int >= 1, got 0"),
    ({"r": 2.0}, "LoRAConfig.r must be an int >= 1, got 2.0"),
    ({"r": True}, "LoRAConfig.r must be an int >= 1, got True"),
    ({"lora_alpha": 0}, "LoRAConfig.lora_alpha must be a finite number > 0, got 0"),
    ({"lora_alpha": float("inf")}, "LoRAConfig.lora_alpha must be a finite number > 0, got inf"),
    ({"lora_alpha": "16"}, "LoRAConfig.lora_alpha must be a finite number > 0, got '16'"),
    ({"target_modules": []}, "LoRAConfig.target_modules must name at least one module, got []"),
    ({"target_modules": "ups"}, "LoRAConfig.target_modules must be a list of name patterns, got 'ups'"),
    ({"target_modules": ["ups", ""]}, "LoRAConfig.target_modules entries must be non-empty str, got ''"),
    ({"target_modules": ["dec..ups"]}, "LoRAConfig.target_modules entry 'dec..ups' has an empty dotted component"),
    ({"target_modules": [3]}, "LoRAConfig.target_modules entries must be non-empty str, got 3"),
    ({"lora_dropout": 1.0}, "LoRAConfig.lora_dropout must be in [0, 1), got 1.0"),
    ({"lora_dropout": -0.1}, "LoRAConfig.lora_dropout must be in [0, 1), got -0.1"),
    ({"full_delta_modules": "bias"}, "LoRAConfig.full_delta_modules must be a list of name patterns, got 'bias'"),
    ({"full_delta_modules": [""]}, "LoRAConfig.full_delta_modules entries must be non-empty str, got ''"),
]


@pytest.mark.parametrize(("change", "message"), BAD_CONFIGS)
def test_config_rejects_bad_values_naming_the_field(change: dict[str, Any], message: str) -> None:
    kwargs: dict[str, Any] = {"r": 8, "lora_alpha": 16, "target_modules": ["ups"], **change}
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        LoRAConfig(**kwargs)


def test_config_normalises_and_round_trips() -> None:
    cfg = LoRAConfig(r=8, lora_alpha=16, target_modules=["ups", "resblocks"], full_delta_modules=["*.bias"])
    assert cfg.target_modules == ("ups", "resblocks") and cfg.full_delta_modules == ("*.bias",)
    assert cfg.scaling == 2.0 and hash(cfg) == hash(LoRAConfig.from_dict(cfg.to_dict()))
    assert LoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="rank"):
        LoRAConfig.from_dict({**cfg.to_dict(), "rank": 3})


# ---- patterns and folding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("ups", "dec.ups.0", True),
        ("resblocks", "dec.resblocks.3.convs1.0", True),
        ("enc_p.emb_phone", "enc_p.emb_phone", True),
        ("dec.ups", "dec.ups.1", True),
        ("ups", "dec.upsample.0", False),
        ("ups.0", "dec.ups.01", False),
        ("dec.resblocks", "dec.convs.resblocks", False),
        ("emb_g", "emb_g.weight", True),
        ("enc_p.encoder.attn_layers.*.conv_q", "enc_p.encoder.attn_layers.3.conv_q", True),
        ("enc_p.encoder.attn_layers.*.conv_q", "enc_p.encoder.attn_layers.3.conv_k", False),
        ("*.bias", "dec.ups.0.bias", True),
        ("*.bias", "dec.ups.0.weight", False),
        ("dec.ups.?", "dec.ups.1", True),
        ("dec.ups.?", "dec.ups.12", False),
    ],
)
def test_name_matches(pattern: str, name: str, expected: bool) -> None:
    assert name_matches(pattern, name) is expected


@pytest.mark.parametrize("api", WN)
def test_fold_weight_norm_keeps_values_and_output(api: str, inputs: tuple[Tensor, Tensor]) -> None:
    model = Toy(api)
    out = model(*inputs)
    folded = fold_weight_norm(model)
    assert sorted(folded) == sorted(
        ["dec.ups.0.weight", "dec.conv_post.weight"]
        + [f"dec.resblocks.0.convs{i}.{j}.weight" for i in (1, 2) for j in (0, 1)]
    )
    keys = model.state_dict().keys()
    assert not [k for k in keys if "weight_g" in k or "weight_v" in k or "parametrizations" in k]
    assert isinstance(dict(model.dec.ups[0].named_parameters(recurse=False))["weight"], nn.Parameter)
    assert torch.equal(model(*inputs), out)
    assert fold_weight_norm(model) == []  # nothing left to fold


# ---- injection -----------------------------------------------------------------------------------


@pytest.mark.parametrize("api", WN)
def test_inject_wraps_matches_and_keeps_output(api: str, inputs: tuple[Tensor, Tensor]) -> None:
    model = Toy(api)
    out = model(*inputs)
    wrapped = inject_lora(model, LoRAConfig(r=2, lora_alpha=4, target_modules=TARGETS), max_rank=4)
    assert {n: type(m) for n, m in wrapped.items()} == WRAPPED
    assert lora_layers(model) == wrapped and all(m.max_rank == 4 for m in wrapped.values())
    keys = model.state_dict().keys()
    assert {"dec.ups.0.base.weight", "dec.ups.0.base.bias", "dec.ups.0.lora_A", "dec.ups.0.lora_B"} <= keys
    assert "dec.conv_post.weight_g" in keys or "dec.conv_post.parametrizations.weight.original0" in keys  # untargeted
    assert torch.equal(model(*inputs), out)


def test_lora_parameters_are_the_only_trainable_ones_in_wrappers() -> None:
    _, model = injected()
    params = lora_parameters(model)
    assert len(params) == 2 * len(WRAPPED) and all(p.requires_grad for p in params)
    ids = {id(p) for p in params}
    for layer in lora_layers(model).values():
        assert {id(layer.lora_A), id(layer.lora_B)} <= ids
        assert not any(p.requires_grad for p in layer.base.parameters())


@pytest.mark.parametrize(
    ("targets", "full", "words"),
    [
        (["ups", "nope"], [], "'nope' matches nothing"),
        (["dec.ups.*", "enc_p.norm"], [], "'enc_p.norm' matches no Conv1d"),
        (["ups"], ["*.nothing"], r"full_delta_modules pattern '\*.nothing'"),
        (["emb_g"], ["emb_g"], "emb_g.weight is matched by both"),
    ],
)
def test_inject_config_errors_leave_model_unchanged(targets: list[str], full: list[str], words: str) -> None:
    model = Toy()
    before = all_tensors(model)
    with pytest.raises(ConfigError, match=words):
        inject_lora(model, LoRAConfig(r=2, lora_alpha=2, target_modules=targets, full_delta_modules=full))
    assert not lora_layers(model) and full_delta_slots(model) is None
    assert before.keys() == all_tensors(model).keys()


def test_inject_rejects_unsupported_geometry_before_changing_anything() -> None:
    model = Toy()
    setattr(model.get_submodule("dec.resblocks.0.convs2"), "1", nn.Conv1d(6, 6, 3, padding=1, groups=2))
    keys = model.state_dict().keys()
    with pytest.raises(AdapterError, match=r"dec\.resblocks\.0\.convs2\.1.*groups=2"):
        inject_lora(model, LoRAConfig(r=2, lora_alpha=2, target_modules=["ups", "resblocks"]))
    assert not lora_layers(model) and model.state_dict().keys() == keys


def test_inject_twice_or_below_config_rank_raises() -> None:
    _, model = injected()
    with pytest.raises(AdapterError, match="already"):
        inject_lora(model, LoRAConfig(r=2, lora_alpha=2, target_modules=["conv_post"]))
    with pytest.raises(ConfigError, match="max_rank"):
        inject_lora(Toy(), LoRAConfig(r=4, lora_alpha=2, target_modules=["ups"]), max_rank=2)


# ---- loading -------------------------------------------------------------------------------------


def test_state_dict_round_trips_bit_exactly(inputs: tuple[Tensor, Tensor]) -> None:
    original, model = injected()
    load_lora_weights(model, random_state(model))
    out, state = model(*inputs), lora_state_dict(model)
    assert set(state) == {f"{n}.{t}" for n in WRAPPED for t in ("lora_A", "lora_B")} | {
        FULL_DELTA_PREFIX + n
        for n in full_delta_slots(model).names  # type: ignore[union-attr]
    }
    assert (out - original(*inputs)).abs().max() > 1e-3
    reset_lora(model)
    assert torch.equal(model(*inputs), original(*inputs))
    load_lora_weights(model, state)
    assert torch.equal(model(*inputs), out)


def test_lower_rank_and_alpha_at_model_level() -> None:
    _, model = injected(max_rank=4)
    state = random_state(model, rank=2)
    load_lora_weights(model, state, alpha=4.0)  # 4 / 2 = 2
    layer = lora_layers(model)["dec.ups.0"]
    assert torch.equal(layer.lora_A[:2], state["dec.ups.0.lora_A"]) and not layer.lora_A[2:].any()
    torch.testing.assert_close(layer.lora_B[:, :2], 2 * state["dec.ups.0.lora_B"])
    assert not layer.lora_B[:, 2:].any()
    trimmed = lora_state_dict(model, rank=2)
    assert trimmed["dec.ups.0.lora_A"].shape == (2, layer.lora_A.shape[1])
    with pytest.raises(AdapterError, match="more than 1 rank slots"):
        lora_state_dict(model, rank=1)


def test_absent_layers_and_full_deltas_reset_to_base(inputs: tuple[Tensor, Tensor]) -> None:
    original, model = injected()
    load_lora_weights(model, random_state(model))
    only = {k: v for k, v in random_state(model).items() if k.startswith("emb_g.")}
    load_lora_weights(model, only)
    layers = lora_layers(model)
    assert layers["emb_g"].lora_A.any()
    assert not any(m.lora_A.any() or m.lora_B.any() for n, m in layers.items() if n != "emb_g")
    assert not any(t.any() for k, t in lora_state_dict(model).items() if k.startswith(FULL_DELTA_PREFIX))
    load_lora_weights(model, {})  # an empty adapter is exactly the base model
    assert torch.equal(model(*inputs), original(*inputs))


def test_swaps_keep_every_tensor_in_place() -> None:
    _, model = injected()
    before = ptrs(model)
    load_lora_weights(model, random_state(model))
    load_lora_weights(model, random_state(model, rank=1), alpha=3.0)
    merge_lora(model)
    load_lora_weights(model, random_state(model, rank=3))
    unmerge_lora(model)
    reset_lora(model)
    assert ptrs(model) == before


NAN, INF = float("nan"), float("inf")
BAD_STATES: dict[str, tuple[dict[str, Tensor | None], type[AdapterError], str]] = {
    # name -> (entries replacing those of a good rank-4 state, None = removed; error; offending key)
    "unknown": ({"dec.conv_pre.lora_A": torch.ones(2, 24)}, AdapterMismatchError, "dec.conv_pre.lora_A"),
    "missing-b": ({"dec.ups.0.lora_B": None}, AdapterError, "dec.ups.0.lora_A"),
    "cols": ({"emb_g.lora_A": torch.ones(4, 5)}, AdapterMismatchError, "emb_g.lora_A"),
    "rows": ({"emb_g.lora_B": torch.ones(4, 4)}, AdapterMismatchError, "emb_g.lora_B"),
    "rank": ({"emb_g.lora_A": torch.ones(5, 4), "emb_g.lora_B": torch.ones(3, 5)}, AdapterError, "emb_g.lora_A"),
    "nan": ({"dec.ups.0.lora_B": torch.full((8, 4), NAN)}, AdapterError, "dec.ups.0.lora_B"),
    "int": ({"emb_g.lora_B": torch.ones(3, 4, dtype=torch.int32)}, AdapterError, "emb_g.lora_B"),
    "delta-shape": ({"full_delta.dec.ups.0.bias": torch.ones(7)}, AdapterMismatchError, "full_delta.dec.ups.0.bias"),
    "delta-inf": ({"full_delta.enc_p.norm.beta": torch.full((8,), INF)}, AdapterError, "full_delta.enc_p.norm.beta"),
    "delta-unknown": (
        {"full_delta.dec.conv_post.weight": torch.ones(1)},
        AdapterMismatchError,
        "full_delta.dec.conv_post",
    ),
}


@pytest.mark.parametrize("bad", BAD_STATES)
def test_bad_adapter_raises_and_leaves_model_untouched(bad: str) -> None:
    _, model = injected()
    load_lora_weights(model, random_state(model))
    merge_lora(model)  # the merged path must be left alone too
    before = all_tensors(model)
    state = random_state(model)
    changes, error, key = BAD_STATES[bad]
    for k, v in changes.items():
        if v is None:
            del state[k]
        else:
            state[k] = v
    with pytest.raises(error, match=rf"^adapter key '{re.escape(key)}"):
        load_lora_weights(model, state)
    after = all_tensors(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_first_offending_key_is_reported_and_non_strict_ignores_unknown() -> None:
    _, model = injected()
    state = {"zzz.unknown": torch.ones(1), **random_state(model)}
    state["emb_g.lora_A"] = torch.full_like(state["emb_g.lora_A"], float("nan"))
    with pytest.raises(AdapterMismatchError, match="'zzz.unknown'"):
        load_lora_weights(model, state)
    with pytest.raises(AdapterError, match="'emb_g.lora_A' has non-finite"):
        load_lora_weights(model, state, strict=False)
    del state["emb_g.lora_A"], state["emb_g.lora_B"]
    load_lora_weights(model, state, strict=False)
    assert lora_layers(model)["dec.ups.0"].lora_A.any()


# ---- full deltas ---------------------------------------------------------------------------------


def test_full_deltas_apply_in_place_and_reset_exactly(inputs: tuple[Tensor, Tensor]) -> None:
    original, model = injected()
    slots = full_delta_slots(model)
    assert slots is not None
    attn = [f"enc_p.attn_layers.{i}.conv_{c}.bias" for i in (0, 1) for c in "qk"]
    convs = [f"dec.resblocks.0.convs{i}.{j}.bias" for i in (1, 2) for j in (0, 1)]
    others = ["enc_p.emb_phone.bias", "enc_p.norm.gamma", "enc_p.norm.beta", "dec.conv_pre.bias", "dec.cond.bias"]
    assert set(slots.names) == {*attn, *convs, *others, "dec.ups.0.bias"}  # conv_post has no bias
    i = slots.index["dec.ups.0.bias"]
    assert slots.paths[i] == "dec.ups.0.base.bias"  # inside the LoRA wrapper, under its base name
    delta = torch.randn(6)
    load_lora_weights(model, {"full_delta.dec.ups.0.bias": delta})
    bias = model.get_parameter("dec.ups.0.base.bias")
    base_bias = original.get_parameter("dec.ups.0.bias")
    assert torch.equal(bias, base_bias + delta)
    assert (model(*inputs) - original(*inputs)).abs().max() > 1e-3
    load_lora_weights(model, {})
    assert torch.equal(bias, base_bias) and torch.equal(model(*inputs), original(*inputs))


@pytest.mark.parametrize("api", WN)
def test_full_delta_on_weight_normed_weight_folds_it(api: str, inputs: tuple[Tensor, Tensor]) -> None:
    original, model = injected(full=["dec.conv_post"], api=api)
    slots = full_delta_slots(model)
    assert slots is not None and slots.names == ("dec.conv_post.weight",)
    assert torch.equal(model(*inputs), original(*inputs))
    load_lora_weights(model, {"full_delta.dec.conv_post.weight": torch.randn(1, 6, 3)})
    assert (model(*inputs) - original(*inputs)).abs().max() > 1e-3


# ---- merge and base state ------------------------------------------------------------------------


def test_merge_matches_unmerged_and_unmerge_restores_base(inputs: tuple[Tensor, Tensor]) -> None:
    original, model = injected()
    load_lora_weights(model, random_state(model))
    base_before = {k: v.clone() for k, v in base_state_dict(model).items()}
    out = model(*inputs)
    merge_lora(model)
    assert all(m.merged for m in lora_layers(model).values())
    torch.testing.assert_close(model(*inputs), out, atol=1e-5, rtol=1e-5)
    merged_base = base_state_dict(model)  # still the pre-merge weights
    assert all(torch.equal(merged_base[k], v) for k, v in base_before.items())
    unmerge_lora(model)
    assert torch.equal(model(*inputs), out)
    assert all(torch.equal(base_state_dict(model)[k], v) for k, v in base_before.items())


def test_base_state_dict_has_the_original_names_and_values() -> None:
    original, model = injected()
    load_lora_weights(model, random_state(model))
    fold_weight_norm(original)  # inject folded the targeted layers; compare like with like
    expected = original.state_dict()
    got = base_state_dict(model)
    untargeted = {"dec.conv_post.weight_g", "dec.conv_post.weight_v"}  # not a target: still weight-normed
    assert set(got) == (set(expected) - {"dec.conv_post.weight"}) | untargeted
    assert all(torch.equal(got[k], expected[k]) for k in set(got) & set(expected))


def test_model_to_moves_full_delta_buffers() -> None:
    _, model = injected()
    model.double()
    slots = full_delta_slots(model)
    assert slots is not None and all(b.dtype == torch.float64 for b in slots.buffers())
    load_lora_weights(model, random_state(model))  # float32 adapter into float64 slots
    assert lora_layers(model)["emb_g"].lora_A.dtype == torch.float64
