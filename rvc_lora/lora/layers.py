"""LoRA wrappers for Conv1d, ConvTranspose1d, Linear and Embedding.

Every wrapper holds the frozen `base` layer and two adapter tensors allocated once, at `max_rank`:
with W = `base.weight`, `lora_B` is `[W.shape[0], max_rank]`, `lora_A` is `[max_rank, W[0].numel()]`
and the weight update is `delta_weight() = (lora_B[:, :rank] @ lora_A[:rank]).view_as(W)`, where `rank` is the
rank currently written (slots past it are zero; 0: the slot is empty and the layer runs its base layer
alone). The SVD extractor writes the same layout. The tensors hold *effective* values (alpha/r already
folded into B), so a swap is two `copy_()`s into memory that never moves: a `torch.compile`d model or
captured CUDA graph stays valid (a compiled graph does not depend on `rank`: it sees every slot).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rvc_lora.convs import conv_transpose1d
from rvc_lora.errors import AdapterError, AdapterMismatchError, ConfigError

AdaptableLayer = nn.Conv1d | nn.ConvTranspose1d | nn.Linear | nn.Embedding
SUPPORTED = (nn.Conv1d, nn.ConvTranspose1d, nn.Linear, nn.Embedding)
Which = Literal["lora_A", "lora_B"]


def tensor_problem(t: object) -> str | None:
    """What makes `t` unusable as adapter data (not a tensor, not floating point), or None.

    Finiteness is checked separately: on a GPU it costs a device sync, so callers batch it."""
    if not isinstance(t, Tensor):
        return f"is a {type(t).__name__}, not a tensor"
    if not t.is_floating_point():
        return f"has dtype {t.dtype}, expected a floating point dtype"
    return None


def check_alpha(alpha: float) -> None:
    """Raise `AdapterError` unless `alpha` is a finite number > 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"alpha must be a finite number > 0, got {alpha!r}")


def adapt_problem(module: nn.Module) -> str | None:
    """Why `module` cannot be wrapped (type or geometry), or None. The weight itself is not checked."""
    if not isinstance(module, SUPPORTED):
        return f"{type(module).__name__} is not one of Conv1d, ConvTranspose1d, Linear, Embedding"
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)) and (module.groups != 1 or module.padding_mode != "zeros"):
        return f"groups={module.groups}, padding_mode={module.padding_mode!r} (only 1 and 'zeros' are supported)"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return f"max_norm={module.max_norm} renormalises the weight in place on lookup (unsupported)"
    return None


class LoRALayer(nn.Module):
    """Shared slots, loading and merging; subclasses add the forward.

    Conv wrappers run, in eval mode, one conv with `W + B @ A` (the delta costs O(weights), a few
    microseconds, where the factorised branch would add a conv over every time step: up to r/C of
    the layer's cost, 25% for the 32-channel last stage at r=8). In training mode they run the
    factorised branch, whose backward is cheaper than a full weight gradient. Both leave the base
    weight untouched, so a swap is still a copy into the slots.

    `rank`: how many leading rank slots may be non-zero (the rest are zero). Every write through this class
    (`assign_`, `reset_`, `init_for_training_`, `load_state_dict`) and `ResidentSlots.swap` keep it true; code
    writing `lora_A`/`lora_B` by other means must set it (`max_rank` is always safe). In eval mode an empty slot
    (rank 0) costs nothing and the delta's matmul runs at the written rank, not the allocated one.

    `merged`: the delta has been added into `base.weight` and forward runs the base layer only (no
    gradient reaches the LoRA tensors then). The pre-merge weight is kept in `_base_backup` while
    merged so that `unmerge()` restores it bit-exactly: `(W + D) - D` is not always `W` in floating
    point (the price is one extra copy of the targeted weights while merged). Loading or resetting
    while merged is supported: the base weight is restored from the backup, the new adapter copied
    in, and the new delta added, so the layer stays merged. While merged, `state_dict()` holds the
    merged weight under `base.weight`; `base_weight()` (and `inject.base_state_dict`) give the base.
    """

    layer_type: ClassVar[type[nn.Module]]
    base: AdaptableLayer
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    _base_backup: Tensor | None

    def __init__(self, base: AdaptableLayer, max_rank: int, dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
            raise ConfigError(f"max_rank must be an int >= 1, got {max_rank!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(base, self.layer_type):
            raise AdapterError(f"{type(self).__name__} wraps {self.layer_type.__name__}, got {type(base).__name__}")
        if (problem := adapt_problem(base)) is not None:
            raise AdapterError(f"cannot adapt {base}: {problem}")
        if "weight" not in dict(base.named_parameters(recurse=False)):
            # weight norm / parametrizations recompute .weight each forward: merge would be overwritten
            raise AdapterError(f"cannot adapt {base}: its weight is computed (weight norm?); fold_weight_norm first")
        self.base = base.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.zeros(max_rank, w[0].numel(), device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], max_rank, device=w.device, dtype=w.dtype))
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.rank = 0
        self.register_buffer("_base_backup", None, persistent=False)

    @property
    def max_rank(self) -> int:
        """Number of rank slots allocated (rows of `lora_A`)."""
        return int(self.lora_A.shape[0])

    def delta_weight(self) -> Tensor:
        """`lora_B @ lora_A` shaped like `base.weight` (e.g. `[C_out, C_in, k]` for Conv1d), at the written rank."""
        r = self.active_rank()
        return (self.lora_B[:, :r] @ self.lora_A[:r]).view_as(self.base.weight)

    def active_rank(self) -> int:
        """The rank slots forward uses: `rank`, or every slot under `torch.compile` (a graph that branched on
        `rank` would be recompiled whenever an adapter of another rank is swapped in)."""
        return self.max_rank if torch.compiler.is_compiling() else self.rank

    def is_empty(self) -> bool:
        """Eval mode, no slot written, not compiling: forward can run the base layer alone."""
        return not self.training and self.active_rank() == 0

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.rank = self.max_rank  # values unknown: every slot may be set

    def adapter_problem(self, a: object, b: object) -> tuple[Which, AdapterError] | None:
        """The first structural problem of adapter `a` `[r, cols]`, `b` `[rows, r]` (type, dtype, shape,
        rank) as (offending tensor, unraised error), or None. Values are not inspected. Shapes that
        cannot come from this base are `AdapterMismatchError`s."""
        if (problem := tensor_problem(a)) is not None:
            return "lora_A", AdapterError(problem)
        if (problem := tensor_problem(b)) is not None:
            return "lora_B", AdapterError(problem)
        assert isinstance(a, Tensor) and isinstance(b, Tensor)
        rows, cols = self.lora_B.shape[0], self.lora_A.shape[1]
        if a.dim() != 2 or a.shape[1] != cols or a.shape[0] < 1:
            return "lora_A", AdapterMismatchError(f"has shape {tuple(a.shape)}, expected [r, {cols}]")
        if a.shape[0] > self.max_rank:
            return "lora_A", AdapterError(f"has rank {a.shape[0]}, more than the {self.max_rank} slots allocated")
        if tuple(b.shape) != (rows, a.shape[0]):
            return "lora_B", AdapterMismatchError(f"has shape {tuple(b.shape)}, expected [{rows}, {a.shape[0]}]")
        return None

    @torch.no_grad()
    def load_(self, a: Tensor, b: Tensor, alpha: float | None = None) -> None:
        """Validate, then copy a rank-r adapter `a` `[r, cols]`, `b` `[rows, r]` in place.

        Slots past r are zeroed; `alpha / r` is folded into B (alpha None = r: values taken as
        effective). Raises `AdapterError` before touching anything if the adapter does not fit."""
        problem = self.adapter_problem(a, b)
        if problem is None and not bool(torch.isfinite(a).all()):
            problem = "lora_A", AdapterError("has non-finite values")
        if problem is None and not bool(torch.isfinite(b).all()):
            problem = "lora_B", AdapterError("has non-finite values")
        if problem is not None:
            which, err = problem
            raise type(err)(f"{type(self).__name__} over {self.base}: {which} {err}")
        if alpha is not None:
            check_alpha(alpha)
        self.assign_(a, b, 1.0 if alpha is None else alpha / a.shape[0])

    @torch.no_grad()
    def assign_(self, a: Tensor, b: Tensor, scale: float) -> None:
        """Unchecked in-place copy behind `load_` (callers validate first): A <- a, B <- scale * b,
        remaining slots zero. No tensor is reallocated."""
        r = a.shape[0]
        if self.merged:
            self._restore_base()
        self.lora_A[:r].copy_(a)
        self.lora_A[r:].zero_()
        self.lora_B[:, :r].copy_(b)
        self.lora_B[:, r:].zero_()
        self.rank = r
        if scale != 1.0:  # skipped at 1 so effective values round-trip bit-exactly
            self.lora_B[:, :r].mul_(scale)
        if self.merged:
            self.base.weight.add_(self.delta_weight())

    @torch.no_grad()
    def reset_(self) -> None:
        """Zero every slot: the layer then computes exactly what `base` computes."""
        if self.merged:
            self._restore_base()
        self.lora_A.zero_()
        self.lora_B.zero_()
        self.rank = 0

    @torch.no_grad()
    def init_for_training_(self, rank: int | None = None) -> None:
        """Start training from scratch at `rank` (default all slots): A kaiming-uniform, B zero, so the
        output still equals the base output. Slots past `rank` stay zero and get zero gradients."""
        r = self.max_rank if rank is None else rank
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= self.max_rank:
            raise ConfigError(f"rank must be an int in [1, {self.max_rank}], got {rank!r}")
        self.reset_()
        self.rank = r
        nn.init.kaiming_uniform_(self.lora_A[:r], a=math.sqrt(5))  # same init as nn.Linear's weight

    @torch.no_grad()
    def merge(self) -> None:
        """Add `delta_weight()` into `base.weight` in place (one matmul); no-op if already merged."""
        if self.merged:
            return
        self._base_backup = self.base.weight.detach().clone()
        self.base.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact pre-merge `base.weight`; no-op if not merged."""
        if not self.merged:
            return
        self._restore_base()
        self._base_backup = None
        self.merged = False

    def base_weight(self) -> Tensor:
        """The unadapted base weight, also while merged (then the kept backup), detached."""
        w = self._base_backup if self.merged else self.base.weight
        assert w is not None
        return w.detach()

    def _restore_base(self) -> None:
        assert self._base_backup is not None
        self.base.weight.copy_(self._base_backup)

    def extra_repr(self) -> str:
        return f"max_rank={self.max_rank}, merged={self.merged}"


class LoRAConv1d(LoRALayer):
    """`base(x) + B(A(x))`: A is a conv with the base geometry and r output channels, B a 1x1 conv.
    `lora_A` `[r, C_in * k]`, `lora_B` `[C_out, r]`."""

    layer_type = nn.Conv1d
    base: nn.Conv1d

    def forward(self, x: Tensor) -> Tensor:
        """`[B, C_in, T] -> [B, C_out, T']`, with T' exactly as `base` produces it."""
        if self.merged or self.is_empty():  # the base layer alone
            return self.base(x)  # type: ignore[no-any-return]
        base = self.base  # stride/padding/dilation from base: dilated ResBlock convs line up
        if not self.training:  # one conv with W + BA: O(weights) extra, not O(T) (see LoRALayer)
            fused: Tensor = base._conv_forward(x, base.weight + self.delta_weight(), base.bias)
            return fused
        y: Tensor = base(x)
        a = self.lora_A.view(-1, base.in_channels, base.kernel_size[0])  # [r, C_in, k]
        h = F.conv1d(self.lora_dropout(x), a, None, base.stride, base.padding, base.dilation)  # [B, r, T']
        return y + F.conv1d(h, self.lora_B.unsqueeze(-1))  # [C_out, r, 1]


class LoRAConvTranspose1d(LoRALayer):
    """`base(x) + A^T(B^T x)`: a 1x1 projection to r channels, then a transposed conv with the base
    geometry. The base weight is `[C_in, C_out, k]`, so `lora_B` is `[C_in, r]`, `lora_A` `[r, C_out * k]`."""

    layer_type = nn.ConvTranspose1d
    base: nn.ConvTranspose1d

    def forward(self, x: Tensor) -> Tensor:
        """`[B, C_in, T] -> [B, C_out, (T - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1]`."""
        if self.merged or self.is_empty():  # the base layer alone
            return self.base(x)  # type: ignore[no-any-return]
        base = self.base
        padding = base.padding
        assert not isinstance(padding, str)  # ConvTranspose1d only takes int padding
        if not self.training:  # one transposed conv with W + BA (see LoRALayer); channels-last on the CPU
            return conv_transpose1d(x, base.weight + self.delta_weight(), base.bias, base)
        y: Tensor = base(x)
        h = F.conv1d(self.lora_dropout(x), self.lora_B.t().unsqueeze(-1))  # [r, C_in, 1] -> h [B, r, T]
        a = self.lora_A.view(-1, base.out_channels, base.kernel_size[0])  # [r, C_out, k]
        return y + F.conv_transpose1d(h, a, None, base.stride, padding, base.output_padding, 1, base.dilation)


class LoRALinear(LoRALayer):
    """`base(x) + x A^T B^T`. `lora_A` `[r, in]`, `lora_B` `[out, r]`."""

    layer_type = nn.Linear
    base: nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        """`[*, in] -> [*, out]`."""
        y: Tensor = self.base(x)
        if self.merged or self.is_empty():  # the base layer alone
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # via [*, r]


class LoRAEmbedding(LoRALayer):
    """`base(ids) + B[ids] A`. `lora_B` `[num_embeddings, r]`, `lora_A` `[r, dim]`. Dropout, having no
    float input to act on, applies to the rank-r code `B[ids]`."""

    layer_type = nn.Embedding
    base: nn.Embedding

    def forward(self, x: Tensor) -> Tensor:
        """ids `[*]` (int) -> `[*, dim]`."""
        y: Tensor = self.base(x)
        if self.merged or self.is_empty():  # the base layer alone
            return y
        base = self.base  # padding_idx: the padding row of B gets no gradient, as in the base layer
        code = F.embedding(x, self.lora_B, base.padding_idx, None, 2.0, base.scale_grad_by_freq, False)  # [*, r]
        h: Tensor = self.lora_dropout(code)
        return y + h @ self.lora_A


@contextmanager
def every_slot_active(layers: Iterable[LoRALayer]) -> Iterator[None]:
    """Forward through every rank slot inside the block: for callers that substitute the slot tensors
    (`functional_call` over an adapter bank), whose values the layers' own `rank` does not describe."""
    layers = list(layers)
    ranks = [layer.rank for layer in layers]
    for layer in layers:
        layer.rank = layer.max_rank
    try:
        yield
    finally:
        for layer, r in zip(layers, ranks, strict=True):
            layer.rank = r


def wrap_layer(module: nn.Module, max_rank: int, dropout: float = 0.0) -> LoRALayer:
    """The LoRA wrapper for a supported layer (`AdapterError` for anything else)."""
    for cls in (LoRAConv1d, LoRAConvTranspose1d, LoRALinear, LoRAEmbedding):
        if isinstance(module, cls.layer_type):
            return cls(module, max_rank, dropout)
    raise AdapterError(f"cannot adapt {module}: {adapt_problem(module)}")
