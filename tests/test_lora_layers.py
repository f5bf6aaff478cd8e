"""LoRA layer wrappers: every layer kind x geometry, loading, merging, failure atomicity."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from rvc_lora.errors import AdapterError, AdapterMismatchError, ConfigError
from rvc_lora.lora import LoRAConv1d, LoRAConvTranspose1d, LoRAEmbedding, LoRALayer, LoRALinear, wrap_layer

MAX_RANK = 4

Layer = nn.Conv1d | nn.ConvTranspose1d | nn.Linear | nn.Embedding
# id -> factory of a base layer; channel counts differ (in != out) so a transposed layout shows up
CASES: dict[str, Callable[[], Layer]] = {
    "conv-k1": lambda: nn.Conv1d(4, 6, 1),
    "conv-k3-p1-nobias": lambda: nn.Conv1d(4, 6, 3, padding=1, bias=False),
    "conv-k3-d3": lambda: nn.Conv1d(4, 6, 3, padding=3, dilation=3),
    "conv-k5-s2": lambda: nn.Conv1d(4, 6, 5, stride=2, padding=2),
    "conv-k7-d5-same": lambda: nn.Conv1d(4, 6, 7, dilation=5, padding="same", bias=False),
    "convT-k4-s2-p1": lambda: nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1),
    "convT-k20-s10-p5-nobias": lambda: nn.ConvTranspose1d(6, 4, 20, stride=10, padding=5, bias=False),
    "convT-k3-s2-op1": lambda: nn.ConvTranspose1d(6, 4, 3, stride=2, padding=1, output_padding=1),
    "convT-k3-s3-d2-op2": lambda: nn.ConvTranspose1d(6, 4, 3, stride=3, dilation=2, output_padding=2),
    "linear": lambda: nn.Linear(5, 7),
    "linear-nobias": lambda: nn.Linear(5, 7, bias=False),
    "embedding": lambda: nn.Embedding(9, 6),
    "embedding-padidx": lambda: nn.Embedding(9, 6, padding_idx=0),
}
KINDS = {nn.Conv1d: LoRAConv1d, nn.ConvTranspose1d: LoRAConvTranspose1d, nn.Linear: LoRALinear}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors here are tiny: intra-op threads cost more time than they save
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make(case: str) -> tuple[Layer, LoRALayer, Tensor]:
    """(untouched copy of the base, wrapper around the base, an input for both)."""
    base = CASES[case]()
    x: Tensor
    if isinstance(base, nn.Embedding):
        x = torch.randint(0, base.num_embeddings, (2, 7))
        x[0, 0] = 0  # hits padding_idx when there is one
    elif isinstance(base, nn.Linear):
        x = torch.randn(2, 3, base.in_features)
    else:
        assert isinstance(base, (nn.Conv1d, nn.ConvTranspose1d))
        x = torch.randn(2, base.in_channels, 11)
    return copy.deepcopy(base), wrap_layer(base, MAX_RANK), x


def adapter(lora: LoRALayer, r: int, scale: float = 0.3) -> tuple[Tensor, Tensor]:
    return scale * torch.randn(r, lora.lora_A.shape[1]), scale * torch.randn(lora.lora_B.shape[0], r)


def with_weight(layer: Layer, delta: Tensor) -> Layer:
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        ref.weight.add_(delta)
    return ref


def snapshot(lora: LoRALayer) -> list[Tensor]:
    return [t.detach().clone() for t in (lora.lora_A, lora.lora_B, lora.base.weight)]


@pytest.mark.parametrize("case", CASES)
def test_wrapper_kind_and_slot_layout(case: str) -> None:
    base, lora, _ = make(case)
    expected = KINDS.get(type(base), LoRAEmbedding)
    w = base.weight
    assert type(lora) is expected
    assert lora.lora_A.shape == (MAX_RANK, w[0].numel())
    assert lora.lora_B.shape == (w.shape[0], MAX_RANK)
    assert not any(p.requires_grad for p in lora.base.parameters())
    assert lora.lora_A.requires_grad and lora.lora_B.requires_grad


@pytest.mark.parametrize("case", CASES)
def test_zero_slots_give_exact_base_output(case: str) -> None:
    base, lora, x = make(case)
    assert torch.equal(lora(x), base(x))
    lora.load_(*adapter(lora, 3))
    lora.reset_()
    assert torch.equal(lora(x), base(x))


@pytest.mark.parametrize("case", CASES)
def test_nonzero_adapter_changes_output(case: str) -> None:
    base, lora, x = make(case)
    lora.load_(*adapter(lora, 2))
    assert (lora(x) - base(x)).abs().max() > 1e-3


@pytest.mark.parametrize("case", CASES)
def test_unmerged_forward_equals_base_with_delta_weight(case: str) -> None:
    base, lora, x = make(case)
    a, b = adapter(lora, MAX_RANK)
    lora.load_(a, b)
    delta = lora.delta_weight()
    assert delta.shape == base.weight.shape
    torch.testing.assert_close(delta.flatten(1), b @ a)  # the layout the SVD extractor writes
    torch.testing.assert_close(lora(x), with_weight(base, delta)(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_merged_equals_unmerged_and_unmerge_is_exact(case: str) -> None:
    base, lora, x = make(case)
    lora.load_(*adapter(lora, 3))
    unmerged = lora(x)
    lora.merge()
    assert lora.merged and not torch.equal(lora.base.weight, base.weight)
    torch.testing.assert_close(lora(x), unmerged, atol=1e-5, rtol=1e-5)
    lora.merge()  # idempotent: the delta is not added twice
    torch.testing.assert_close(lora(x), unmerged, atol=1e-5, rtol=1e-5)
    lora.unmerge()
    assert not lora.merged
    assert torch.equal(lora.base.weight, base.weight)
    assert torch.equal(lora(x), unmerged)


@pytest.mark.parametrize("case", CASES)
def test_load_and_reset_while_merged(case: str) -> None:
    base, lora, x = make(case)
    lora.load_(*adapter(lora, 3))
    lora.merge()
    a, b = adapter(lora, 2)
    lora.load_(a, b)  # unmerge old, copy, merge new
    assert lora.merged
    torch.testing.assert_close(lora(x), with_weight(base, (b @ a).view_as(base.weight))(x), atol=1e-5, rtol=1e-5)
    lora.reset_()
    assert torch.equal(lora.base.weight, base.weight)
    lora.unmerge()
    assert torch.equal(lora.base.weight, base.weight) and torch.equal(lora(x), base(x))


@pytest.mark.parametrize("case", CASES)
def test_lower_rank_load_zero_pads(case: str) -> None:
    base, lora, x = make(case)
    lora.load_(*adapter(lora, MAX_RANK))
    a, b = adapter(lora, 2)
    lora.load_(a, b)
    assert torch.equal(lora.lora_A[:2], a) and torch.equal(lora.lora_B[:, :2], b)
    assert not lora.lora_A[2:].any() and not lora.lora_B[:, 2:].any()
    small = wrap_layer(base, max_rank=2)
    small.load_(a, b)
    torch.testing.assert_close(lora(x), small(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_alpha_over_r_is_folded_into_b(case: str) -> None:
    _, lora, x = make(case)
    a, b = adapter(lora, 3)
    lora.load_(a, b, alpha=6.0)  # scale 6 / 3 = 2
    assert torch.equal(lora.lora_A[:3], a)
    torch.testing.assert_close(lora.lora_B[:, :3], 2 * b)
    scaled = lora(x)
    lora.load_(a, 2 * b)  # alpha None: taken as effective values
    torch.testing.assert_close(lora(x), scaled)


@pytest.mark.parametrize("case", CASES)
def test_swaps_never_reallocate(case: str) -> None:
    _, lora, _ = make(case)
    ptrs = [t.data_ptr() for t in (lora.lora_A, lora.lora_B, lora.base.weight)]
    lora.load_(*adapter(lora, 4))
    lora.load_(*adapter(lora, 1), alpha=2.0)
    lora.merge()
    lora.load_(*adapter(lora, 3))
    lora.unmerge()
    lora.reset_()
    lora.init_for_training_(2)
    assert [t.data_ptr() for t in (lora.lora_A, lora.lora_B, lora.base.weight)] == ptrs


BAD_ADAPTERS: dict[str, tuple[Callable[[int, int], tuple[Tensor, Tensor]], type[AdapterError], str]] = {
    # name -> (make (a, b) from (rows, cols), expected error, offending tensor in the message)
    "cols": (lambda rows, cols: (torch.ones(2, cols + 1), torch.ones(rows, 2)), AdapterMismatchError, "lora_A"),
    "rows": (lambda rows, cols: (torch.ones(2, cols), torch.ones(rows + 1, 2)), AdapterMismatchError, "lora_B"),
    "rank-pair": (lambda rows, cols: (torch.ones(2, cols), torch.ones(rows, 3)), AdapterMismatchError, "lora_B"),
    "rank-too-big": (lambda rows, cols: (torch.ones(5, cols), torch.ones(rows, 5)), AdapterError, "more than"),
    "rank-0": (lambda rows, cols: (torch.ones(0, cols), torch.ones(rows, 0)), AdapterError, "lora_A"),
    "1d": (lambda rows, cols: (torch.ones(cols), torch.ones(rows, 1)), AdapterError, "lora_A"),
    "nan": (lambda rows, cols: (torch.full((2, cols), float("nan")), torch.ones(rows, 2)), AdapterError, "lora_A"),
    "inf": (lambda rows, cols: (torch.ones(2, cols), torch.full((rows, 2), float("inf"))), AdapterError, "lora_B"),
    "int": (lambda rows, cols: (torch.ones(2, cols, dtype=torch.long), torch.ones(rows, 2)), AdapterError, "dtype"),
}


@pytest.mark.parametrize("bad", BAD_ADAPTERS)
@pytest.mark.parametrize("case", ["conv-k3-d3", "convT-k4-s2-p1", "linear", "embedding"])
def test_failed_load_leaves_layer_untouched(case: str, bad: str) -> None:
    _, lora, _ = make(case)
    lora.load_(*adapter(lora, 3))
    lora.merge()
    before = snapshot(lora)
    maker, error, words = BAD_ADAPTERS[bad]
    a, b = maker(lora.lora_B.shape[0], lora.lora_A.shape[1])
    with pytest.raises(error, match=words):
        lora.load_(a, b)
    assert all(torch.equal(x, y) for x, y in zip(snapshot(lora), before, strict=True))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_alpha_raises_before_copy(alpha: float) -> None:
    _, lora, _ = make("linear")
    before = snapshot(lora)
    with pytest.raises(AdapterError, match="alpha"):
        lora.load_(*adapter(lora, 2), alpha=alpha)
    assert all(torch.equal(x, y) for x, y in zip(snapshot(lora), before, strict=True))


@pytest.mark.parametrize("case", CASES)
def test_init_for_training_starts_at_base_and_trains(case: str) -> None:
    base, lora, x = make(case)
    lora.init_for_training_(rank=2)
    assert lora.lora_A[:2].abs().sum() > 0 and not lora.lora_A[2:].any() and not lora.lora_B.any()
    out = lora(x)
    assert torch.equal(out, base(x))
    out.square().sum().backward()
    assert lora.lora_B.grad is not None and lora.lora_B.grad[:, :2].abs().sum() > 0
    assert not lora.lora_B.grad[:, 2:].any()  # unused slots stay at zero under gradient descent
    assert all(p.grad is None for p in lora.base.parameters())


def test_init_for_training_rejects_bad_rank() -> None:
    _, lora, _ = make("linear")
    with pytest.raises(ConfigError, match="rank"):
        lora.init_for_training_(MAX_RANK + 1)


@pytest.mark.parametrize("case", ["conv-k3-d3", "convT-k4-s2-p1", "linear", "embedding"])
def test_dropout_acts_on_lora_branch_in_train_mode_only(case: str) -> None:
    base, plain, x = make(case)
    dropped = wrap_layer(copy.deepcopy(base), MAX_RANK, dropout=0.5)
    a, b = adapter(plain, MAX_RANK)
    plain.load_(a, b)
    dropped.load_(a, b)
    assert torch.equal(dropped.eval()(x), plain.eval()(x))
    train_out = dropped.train()(x)
    assert not torch.allclose(train_out, plain.train()(x))
    dropped.reset_()
    assert torch.equal(dropped(x), base(x))  # dropout never touches the base path


UNSUPPORTED: dict[str, Callable[[], tuple[type[LoRALayer], nn.Module]]] = {
    "conv-groups": lambda: (LoRAConv1d, nn.Conv1d(4, 6, 3, groups=2)),
    "conv-reflect": lambda: (LoRAConv1d, nn.Conv1d(4, 6, 3, padding=1, padding_mode="reflect")),
    "convT-groups": lambda: (LoRAConvTranspose1d, nn.ConvTranspose1d(4, 6, 3, groups=2)),
    "embedding-max-norm": lambda: (LoRAEmbedding, nn.Embedding(9, 6, max_norm=1.0)),
    "weight-norm-unfolded": lambda: (LoRAConv1d, nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 6, 3))),
    "wrong-kind": lambda: (LoRAConv1d, nn.Linear(4, 6)),
}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_layers_raise_naming_the_layer(name: str) -> None:
    cls, base = UNSUPPORTED[name]()
    with pytest.raises(AdapterError, match=type(base).__name__):
        cls(base, MAX_RANK)  # type: ignore[arg-type]


def test_wrap_layer_rejects_other_modules() -> None:
    with pytest.raises(AdapterError, match="LayerNorm"):
        wrap_layer(nn.LayerNorm(4), MAX_RANK)


@pytest.mark.parametrize(("max_rank", "dropout"), [(0, 0.0), (True, 0.0), (2.0, 0.0), (2, 1.0), (2, -0.1)])
def test_bad_construction_values_raise(max_rank: int, dropout: float) -> None:
    with pytest.raises(ConfigError):
        LoRALinear(nn.Linear(4, 6), max_rank, dropout)


def test_padding_idx_row_of_b_gets_no_gradient() -> None:
    _, lora, x = make("embedding-padidx")
    lora.load_(*adapter(lora, MAX_RANK))
    lora(x).sum().backward()
    assert lora.lora_B.grad is not None
    assert not lora.lora_B.grad[0].any() and lora.lora_B.grad[1:].abs().sum() > 0
