"""The voice model core: slot layouts, adapters prepared once, swapped by one fused in-place copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rvc_lora import AdapterError, AdapterMismatchError, load_adapter, save_rvc_checkpoint
from rvc_lora.adapters import Adapter
from rvc_lora.extract import extract_adapter, make_synthetic_voice
from rvc_lora.lora import LoRAConfig
from rvc_lora.voice import (
    LIBRARY_LAYOUT,
    SlotLayout,
    SynthesizerLoRA,
    adapter_layout,
    layout_holding,
    save_adapter,
    serving_layout,
)
from tests.conftest import run_infer, tiny_inputs, tiny_model


def _random_adapter(model: SynthesizerLoRA, seed: int, path: Path) -> Adapter:
    """A rank-`lora_config.r` adapter written and read back as a file (as `rvc-lora train` writes one)."""
    gen = torch.Generator().manual_seed(seed)
    r = model.lora_config.r
    state = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in model.get_lora_state_dict(rank=r).items()}
    model.load_lora_weights(state)
    save_adapter(path, model)
    model.reset_adapter()
    return load_adapter(path)


def _pointers(model: torch.nn.Module) -> dict[str, int]:
    return {n: t.data_ptr() for n, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny base in the serving layout (rank 8) and two extracted adapters (all layers + full deltas)."""
    d = tmp_path_factory.mktemp("voice")
    base = tiny_model(seed=3)
    base_path = save_rvc_checkpoint(d / "base.pth", base)
    voices = []
    for seed in (1, 2):
        voice_path = save_rvc_checkpoint(d / f"v{seed}.pth", make_synthetic_voice(tiny_model(seed=3), rank=3,
                                                                                    seed=seed))
        result = extract_adapter(base_path, voice_path, rank=4, targets="all", dtype=torch.float32, evaluate=False,
                                 progress=False)
        voices.append(result.adapter)
    return {"base": base_path, "voices": voices}


def _serving(base_path: Path, rank: int = 8) -> SynthesizerLoRA:
    from rvc_lora.voice import load_voice_model

    model = load_voice_model(base_path)
    return load_voice_model(base_path, serving_layout(model.cfg, rank))


def test_prepared_swap_equals_the_checked_copy_bit_exactly_and_in_place(served: dict, tmp_path: Path) -> None:
    model = _serving(served["base"])
    reference = _serving(served["base"])
    inputs = tiny_inputs(model.base)
    base_out = run_infer(model, inputs)[0]
    ptrs = _pointers(model)
    for adapter in served["voices"]:
        prepared = model.prepare(adapter)
        model.swap(prepared)
        reference.load_lora_weights(adapter.tensors, alpha=adapter.info.lora_alpha)  # raw path: every check
        assert _pointers(model) == ptrs
        for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
            assert torch.equal(got, want), name
        torch.testing.assert_close(run_infer(model, inputs)[0], run_infer(reference, inputs)[0], rtol=0, atol=0)
    model.reset_adapter()  # the same fused path, nothing to copy but the base values
    assert _pointers(model) == ptrs
    assert torch.equal(run_infer(model, inputs)[0], base_out)
    assert all(not t.any() for k, t in model.get_lora_state_dict().items())


def test_a_prepared_adapter_is_bound_to_its_slots(served: dict) -> None:
    model = _serving(served["base"])
    other = _serving(served["base"], rank=6)  # same base, another layout
    prepared = other.prepare(served["voices"][0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match="prepare it with this model"):
        model.swap(prepared)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    half = _serving(served["base"]).half()  # same layout, other dtype: the slots' key changed with .half()
    with pytest.raises(AdapterMismatchError, match="dtype"):
        half.swap(model.prepare(served["voices"][0]))


def test_a_failed_load_leaves_the_resident_adapter_untouched(served: dict) -> None:
    model = _serving(served["base"])
    model.load_adapter(served["voices"][0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = served["voices"][1]
    key = next(k for k in good.tensors if k.endswith("lora_A"))
    bad_shape = Adapter(good.info, {**good.tensors, key: torch.zeros(good.info.r, 3)})
    with pytest.raises(AdapterMismatchError, match=key):
        model.load_adapter(bad_shape)
    missing = Adapter(good.info, {k: v for k, v in good.tensors.items() if k != key})
    with pytest.raises(AdapterError, match=key):
        model.load_adapter(missing)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_mismatch_errors_name_the_setting_to_change(served: dict, tmp_path: Path) -> None:
    model = _serving(served["base"])
    library = SynthesizerLoRA(tiny_model(seed=3), layout=LIBRARY_LAYOUT, fingerprint=model.fingerprint)
    with pytest.raises(AdapterMismatchError, match="no LoRA slot .* library default .* adapters="):
        library.load_adapter(served["voices"][0])
    rank2 = SlotLayout("tiny", LoRAConfig(r=2, lora_alpha=2, target_modules=["flow", "dec", "enc_p"]), 2,
                       setting="raise MAX")
    small = SynthesizerLoRA(tiny_model(seed=3), layout=rank2, fingerprint=model.fingerprint)
    with pytest.raises(AdapterMismatchError, match="rank 4 exceeds .* raise MAX"):
        small.load_adapter(served["voices"][0])
    # the layout that holds it loads it
    holding = SynthesizerLoRA(tiny_model(seed=3), layout=layout_holding([served["voices"][0].info], LIBRARY_LAYOUT),
                              fingerprint=model.fingerprint)
    holding.load_adapter(served["voices"][0])


def test_merged_swaps_keep_the_merge_and_unmerge_bit_exactly(served: dict, tmp_path: Path) -> None:
    model = _serving(served["base"])
    inputs = tiny_inputs(model.base)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and "full_delta" not in k}
    model.load_adapter(served["voices"][0])
    model.merge()
    first = model.prepare(served["voices"][1])
    model.swap(first)  # while merged: the new adapter is merged in its place
    fresh = _serving(served["base"])
    fresh.load_adapter(served["voices"][1])
    torch.testing.assert_close(run_infer(model, inputs)[0], run_infer(fresh, inputs)[0], rtol=1e-5, atol=1e-6)
    model.reset_adapter()
    model.unmerge()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_library_layout_adapter_round_trips_through_a_file(tmp_path: Path) -> None:
    model = SynthesizerLoRA(tiny_model(seed=4), layout=SlotLayout("r4", LoRAConfig(r=4, lora_alpha=8,
                            target_modules=["ups", "resblocks"]), 4))
    adapter = _random_adapter(model, 1, tmp_path / "a.safetensors")
    exact = SynthesizerLoRA(tiny_model(seed=4), layout=adapter_layout(adapter.info))
    model.load_adapter(adapter)
    exact.load_adapter(tmp_path / "a.safetensors")
    inputs = tiny_inputs(model.base)
    assert torch.equal(run_infer(model, inputs)[0], run_infer(exact, inputs)[0])


def test_a_swap_copies_the_adapters_rank_and_zeroes_only_what_the_last_one_left(served: dict,
                                                                                tmp_path: Path) -> None:
    model = _serving(served["base"])  # slots at rank 8
    wide = model.prepare(_random_adapter(model, 5, tmp_path / "wide.safetensors"))  # rank 8, every slot
    narrow = model.prepare(served["voices"][0])  # rank 4
    assert set(wide.ranks) == {8} and set(narrow.ranks) == {4}
    assert narrow.nbytes() < wide.nbytes()  # held at its own rank, not padded to the slots'
    reference = _serving(served["base"])
    inputs = tiny_inputs(model.base)
    for prepared, adapter in ((wide, None), (narrow, served["voices"][0]), (wide, None), (None, None)):
        model.swap(prepared)
        if adapter is not None:
            reference.load_lora_weights(adapter.tensors, alpha=adapter.info.lora_alpha)
            for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
                assert torch.equal(got, want), name  # rows/columns 4..8 of the wide adapter are zero again
        written = {layer.rank for layer in model.slots.layers}
        assert written == ({0} if prepared is None else set(prepared.ranks))
    assert all(not t.any() for t in model.get_lora_state_dict().values())
    assert torch.equal(run_infer(model, inputs)[0], run_infer(_serving(served["base"]), inputs)[0])


def test_an_empty_slot_runs_the_base_layer_alone(served: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from rvc_lora.lora import LoRALayer

    model = _serving(served["base"])
    inputs = tiny_inputs(model.base)
    model.load_adapter(served["voices"][0])
    adapted = run_infer(model, inputs)[0]
    model.reset_adapter()

    def no_delta(self: LoRALayer) -> torch.Tensor:
        raise AssertionError("an empty slot computed a delta")

    monkeypatch.setattr(LoRALayer, "delta_weight", no_delta)
    base_out = run_infer(model, inputs)[0]
    monkeypatch.undo()
    model.load_adapter(served["voices"][0])
    assert torch.equal(run_infer(model, inputs)[0], adapted)
    assert not torch.equal(base_out, adapted)


def test_slots_filled_by_load_state_dict_are_used(served: dict) -> None:
    model, copy = _serving(served["base"]), _serving(served["base"])  # copy's slots start empty (rank 0)
    model.load_adapter(served["voices"][1])
    copy.load_state_dict(model.state_dict())
    inputs = tiny_inputs(model.base)
    assert torch.equal(run_infer(copy, inputs)[0], run_infer(model, inputs)[0])
