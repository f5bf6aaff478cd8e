"""The seed's model-integration tests plus the hot swap: LoRA on the generator and the synthesizer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from rvc_lora import (
    AdapterError,
    AdapterMismatchError,
    GeneratorLoRA,
    LoRAConfig,
    ResBlock1,
    ResBlock2,
    SynthesizerLoRA,
    create_synthesizer_lora_from_pretrained,
    load_synthesizer_with_lora,
    save_rvc_checkpoint,
)
from tests.conftest import randomize_, run_infer, tiny_inputs, tiny_model

GEN_ARGS = dict(initial_channel=6, resblock="1", resblock_kernel_sizes=[3, 7, 11],
                resblock_dilation_sizes=[[1, 3, 5]] * 3, upsample_rates=[10, 10, 2, 2], upsample_initial_channel=32,
                upsample_kernel_sizes=[16, 16, 4, 4], gin_channels=8)
CFG = LoRAConfig(r=4, lora_alpha=8, target_modules=["ups", "resblocks"])


def _perturb_lora(model: SynthesizerLoRA, seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * scale for k, v in model.get_lora_state_dict().items()}
    model.load_lora_weights(state)
    return state


def test_resblock1_seed() -> None:
    block = ResBlock1(16, 3, (1, 3, 5))
    x = torch.randn(1, 16, 50)
    mask = torch.ones(1, 1, 50)
    mask[..., 40:] = 0
    assert block(x).shape == (1, 16, 50) and torch.all(block(x, mask)[..., 40:] == 0)
    block.remove_weight_norm()
    assert block(x).shape == (1, 16, 50)


def test_resblock2_seed() -> None:
    block = ResBlock2(16, 3, (1, 3))
    assert len(block.convs) == 2 and block(torch.randn(1, 16, 20)).shape == (1, 16, 20)
    block.remove_weight_norm()
    assert "convs.0.weight" in block.state_dict()


def test_generator_lora_creation_without_lora() -> None:
    gen = GeneratorLoRA(**GEN_ARGS)  # type: ignore[arg-type]
    assert not any("lora" in k for k in gen.state_dict())
    assert gen(torch.randn(1, 6, 5), torch.randn(1, 8, 1)).shape == (1, 1, 5 * 400)


def test_generator_lora_with_lora_counts_and_identity() -> None:
    plain = randomize_(GeneratorLoRA(**GEN_ARGS))  # type: ignore[arg-type]
    gen = GeneratorLoRA(**GEN_ARGS, lora_config=CFG)  # type: ignore[arg-type]
    gen.load_state_dict({k: v for k, v in _base_names(plain).items()}, strict=False)
    x, g = torch.randn(1, 6, 5), torch.randn(1, 8, 1)
    n_lora = sum(p.numel() for n, p in gen.named_parameters() if "lora_" in n)
    assert n_lora > 0 and sum(1 for n, _ in gen.named_parameters() if n.endswith("lora_A")) == 4 + 12 * 6
    torch.testing.assert_close(gen(x, g), plain(x, g), atol=1e-5, rtol=1e-4)  # zero B: base output


def _base_names(plain: torch.nn.Module) -> dict[str, torch.Tensor]:
    plain.remove_weight_norm()  # type: ignore[operator]
    out = {}
    for k, v in plain.state_dict().items():
        stem, leaf = k.rsplit(".", 1)
        out[f"{stem}.base.{leaf}" if stem.startswith(("ups", "resblocks")) else k] = v
    return out


def test_synthesizer_lora_wrapper_forward_and_infer() -> None:
    base = tiny_model(with_posterior=True)
    inputs = tiny_inputs(base)
    reference = run_infer(base, inputs)[0]
    model = SynthesizerLoRA(base, CFG)
    torch.testing.assert_close(run_infer(model, inputs)[0], reference, atol=0, rtol=0)
    _perturb_lora(model)
    assert not torch.allclose(run_infer(model, inputs)[0], reference)
    model.train()
    model.base.segment_size = 4
    out = model(inputs["phone"], inputs["phone_lengths"], inputs["pitch"], inputs["nsff0"], torch.randn(1, 17, 12),
                torch.tensor([12]), inputs["sid"])
    out[0].sum().backward()
    assert all(p.grad is not None for p in model.get_lora_parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("resblock", ["1", "2"])
def test_generator_resblock_types_with_lora(resblock: str) -> None:
    args = GEN_ARGS | {"resblock": resblock}
    if resblock == "2":
        args |= {"resblock_kernel_sizes": [3, 5], "resblock_dilation_sizes": [[1, 3], [1, 3]]}
    gen = GeneratorLoRA(**args, lora_config=CFG)  # type: ignore[arg-type]
    assert gen(torch.randn(1, 6, 4), torch.randn(1, 8, 1)).shape == (1, 1, 1600)


def test_lora_parameter_freezing_and_summary() -> None:
    model = SynthesizerLoRA(tiny_model(), CFG)
    summary = model.parameter_summary()
    assert summary["trainable"] == summary["lora"] > 0
    assert summary["total"] == summary["lora"] + summary["frozen"]
    model.unfreeze_all()
    assert model.parameter_summary()["frozen"] == 0
    model.freeze_base_model()
    assert model.parameter_summary() == summary
    assert "LoRA parameters" in model.describe_parameters()


def test_full_size_lora_share_is_about_two_percent() -> None:
    from rvc_lora.models.synthesizer import build_synthesizer
    from tests.test_models import full_config
    model = SynthesizerLoRA(build_synthesizer(full_config("v2", "40k"), with_posterior=False),
                            LoRAConfig(r=8, lora_alpha=16, target_modules=["ups", "resblocks"]))
    s = model.parameter_summary()
    assert 0.01 < s["lora"] / s["total"] < 0.03


def test_hot_swap_is_in_place_and_exact() -> None:
    model = SynthesizerLoRA(tiny_model(seed=2), CFG, max_rank=8)
    inputs = tiny_inputs(model.base)
    base_out = run_infer(model, inputs)[0]
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    first = _perturb_lora(model, seed=1)
    out1 = run_infer(model, inputs)[0]
    _perturb_lora(model, seed=2)
    assert not torch.allclose(run_infer(model, inputs)[0], out1)
    model.load_lora_weights(first)
    torch.testing.assert_close(run_infer(model, inputs)[0], out1, atol=0, rtol=0)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    # a lower-rank adapter is zero-padded into the rank-8 slots; alpha/r is folded in
    low = {k: (v[:2] if k.endswith("lora_A") else v[:, :2]) for k, v in first.items()}
    model.load_lora_weights(low, alpha=4.0)
    layer_a = model.get_lora_state_dict()["dec.ups.0.lora_A"]
    assert torch.equal(layer_a[2:], torch.zeros_like(layer_a[2:]))
    torch.testing.assert_close(model.get_lora_state_dict()["dec.ups.0.lora_B"][:, :2], low["dec.ups.0.lora_B"] * 2)
    model.load_lora_weights({})  # empty adapter: exactly the base
    torch.testing.assert_close(run_infer(model, inputs)[0], base_out, atol=0, rtol=0)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs


def test_bad_adapter_leaves_resident_weights_untouched() -> None:
    model = SynthesizerLoRA(tiny_model(seed=3), CFG)
    good = _perturb_lora(model)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    bad_cases = [
        good | {"dec.ups.0.lora_A": torch.randn(4, 7)},  # wrong shape
        good | {"enc_p.proj.lora_A": torch.randn(4, 8), "enc_p.proj.lora_B": torch.randn(12, 4)},  # no slot
        good | {"dec.ups.1.lora_B": torch.full_like(good["dec.ups.1.lora_B"], float("nan"))},
        {k: v for k, v in good.items() if k != "dec.ups.0.lora_B"},  # pair incomplete
        {k: (torch.randn(9, v.shape[1]) if k.endswith("lora_A") else torch.randn(v.shape[0], 9))
         for k, v in good.items()},  # rank above the slots
    ]
    for bad in bad_cases:
        with pytest.raises(AdapterError):
            model.load_lora_weights(bad)
        for k, v in model.state_dict().items():
            assert torch.equal(v, snapshot[k]), k
    with pytest.raises(AdapterMismatchError):
        model.load_lora_weights(bad_cases[1])


def test_merge_unmerge_are_inverses() -> None:
    model = SynthesizerLoRA(tiny_model(seed=4), CFG)
    inputs = tiny_inputs(model.base)
    _perturb_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = run_infer(model, inputs)[0]
    model.merge()
    torch.testing.assert_close(run_infer(model, inputs)[0], unmerged, atol=1e-5, rtol=1e-4)
    model.unmerge()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_load_with_lora_from_checkpoint_and_pretrained(tmp_path: Path) -> None:
    base = tiny_model("v1", False, seed=5)
    path = save_rvc_checkpoint(tmp_path / "b.pth", base)
    model = load_synthesizer_with_lora(path, CFG)
    assert (model.cfg.version, model.cfg.f0) == ("v1", False)
    with pytest.raises(Exception, match="v2"):
        load_synthesizer_with_lora(path, CFG, version="v2")
    wrapped = create_synthesizer_lora_from_pretrained(tiny_model(seed=5), CFG)
    assert set(wrapped.slot_ranks()) == set(model.slot_ranks())


def _imports(root: Path) -> list[tuple[Path, str, list[str]]]:
    """(file, module, names) of every import statement under `root`, function bodies included (parsed, not run)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [(path, a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.append((path, node.module, [a.name for a in node.names]))
    return out


REPO = Path(__file__).resolve().parents[1]


def test_library_never_imports_the_service() -> None:
    server = ("fastapi", "uvicorn", "service", "starlette")
    bad = [f"{p.relative_to(REPO)}: {m}" for p, m, _ in _imports(REPO / "rvc_lora") if m.split(".")[0] in server]
    assert not bad


def test_no_private_name_crosses_modules() -> None:
    bad = [f"{p.relative_to(REPO)}: from {m} import {n}" for root in ("rvc_lora", "service")
           for p, m, names in _imports(REPO / root) for n in names
           if n.startswith("_") and m.split(".")[0] in ("rvc_lora", "service")]
    assert not bad


def test_compiled_decoder_follows_swaps_without_recompiling() -> None:
    """A `torch.compile`d decoder keeps its compiled graph across swaps (no guard fails, no recompilation)
    and computes with whichever adapter was copied in last. (That the weights' addresses never move, which a
    captured CUDA graph also needs, is `test_hot_swap_is_in_place_and_exact`.)"""
    model = SynthesizerLoRA(tiny_model(f0=False, seed=3), CFG, max_rank=8).eval()
    dec = model.base.dec
    graphs: list[int] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        graphs.append(len(gm.graph.nodes))
        return gm.forward  # run the captured graph as traced

    torch._dynamo.reset()
    compiled = torch.compile(dec, backend=counting_backend, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, dec.conv_pre.in_channels, 12, generator=gen)
    g = torch.randn(1, dec.cond.in_channels, 1, generator=gen)
    with torch.no_grad():
        compiled(x, g)  # compile with the base weights
        compiled_graphs = len(graphs)
        outputs = []
        for seed in (1, 2, 1, None):
            if seed is None:
                model.load_lora_weights({})
            else:
                _perturb_lora(model, seed=seed)
            got = compiled(x, g)
            torch.testing.assert_close(got, dec(x, g), atol=0, rtol=0)  # = eager with the adapter now resident
            outputs.append(got)
    assert compiled_graphs >= 1 and len(graphs) == compiled_graphs  # four swaps, no recompilation
    assert not torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    torch._dynamo.reset()
