"""Adapters validated once, swapped by one fused copy.

`ResidentSlots` lists a voice model's adapter memory in one fixed order: `lora_A` of every wrapper, their
`lora_B`, then for every full-delta slot the parameter itself and its delta buffer. `ResidentSlots.prepare`
checks an `Adapter` against the model once (base fingerprint, sr/version/f0, layers, ranks, shapes) and
returns a `PreparedAdapter`: the tensors as the slots will hold them (zero-padded to the slot rank, `alpha/r`
folded into B, base + delta for full deltas, in the model's dtype). `ResidentSlots.swap` then copies them
in with one `torch._foreach_copy_` and zeroes the slots the adapter does not use with one `_foreach_zero_`,
after an identity check of the slot key only: no per-tensor validation, no allocation, no host sync.
`swap(None)` (back to the base voice) is the same path with nothing to copy but the base values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rvc_lora.adapters import Adapter, AdapterInfo
from rvc_lora.config import SynthConfig
from rvc_lora.errors import AdapterError, AdapterMismatchError
from rvc_lora.lora import FULL_DELTA_PREFIX, LoRALayer, full_delta_slots, lora_layers
from rvc_lora.voice.layout import SlotLayout


@dataclass(frozen=True)
class SlotKey:
    """What a prepared adapter is bound to: the base weights, the slot layout and the slots' dtype."""

    fingerprint: str
    layout: SlotLayout
    dtype: torch.dtype


@dataclass(frozen=True, eq=False)
class PreparedAdapter:
    """An adapter checked against one model's slots and laid out as they hold it (immutable; share it).

    layers: indices (into `ResidentSlots.layers`) of the LoRA pairs it sets; deltas: indices of the full-delta
    slots it sets; tensors: A of each layer `[max_rank, cols]`, then B `[rows, max_rank]` (scale folded in),
    then base + delta per full delta, then the delta, all in `key.dtype`."""

    info: AdapterInfo
    key: SlotKey
    layers: tuple[int, ...]
    deltas: tuple[int, ...]
    tensors: tuple[Tensor, ...] = field(repr=False)

    @property
    def device(self) -> torch.device | None:
        return self.tensors[0].device if self.tensors else None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def to(self, device: str | torch.device, *, non_blocking: bool = False) -> PreparedAdapter:
        """The same adapter on another device (values unchanged: the dtype is already the model's)."""
        moved = tuple(t.to(device, non_blocking=non_blocking) for t in self.tensors)
        return PreparedAdapter(self.info, self.key, self.layers, self.deltas, moved)

    def pin_memory(self) -> PreparedAdapter:
        """Page-locked host copies: the host -> device copy in `to(..., non_blocking=True)` is then a plain DMA."""
        pinned = tuple(t.pin_memory() for t in self.tensors)
        return PreparedAdapter(self.info, self.key, self.layers, self.deltas, pinned)


@dataclass(frozen=True)
class _Plan:
    """For one (layers, deltas) pattern: where the prepared tensors go (`dst`, in their order, then the base
    values of the unset full-delta parameters from `extra_src`) and what is zeroed. `delta_dst`/`delta_zero`
    are the full-delta part alone, for a model with merged layers (whose pairs go one by one)."""

    dst: list[Tensor]
    extra_src: list[Tensor]
    zero: list[Tensor]
    delta_dst: list[Tensor]
    delta_zero: list[Tensor]


class ResidentSlots:
    """The adapter memory of one injected model (rebuild after `.to()`: tensors may have moved).

    cfg and fingerprint describe the base; layout is what the slots were allocated for."""

    def __init__(self, model: nn.Module, cfg: SynthConfig, fingerprint: str, layout: SlotLayout) -> None:
        layers = lora_layers(model)
        self.cfg = cfg
        self.layer_names = tuple(layers)
        self.layers: tuple[LoRALayer, ...] = tuple(layers.values())
        self._layer_index = {name: i for i, name in enumerate(self.layer_names)}
        full = full_delta_slots(model)
        self.delta_names: tuple[str, ...] = () if full is None else full.names
        self._delta_index = {name: i for i, name in enumerate(self.delta_names)}
        n = len(self.delta_names)
        self.params = tuple(model.get_parameter(full.paths[i]) for i in range(n)) if full is not None else ()
        self.bases = tuple(full.base(i) for i in range(n)) if full is not None else ()
        self.deltas = tuple(full.delta(i) for i in range(n)) if full is not None else ()
        first = self.layers[0].lora_A if self.layers else self.params[0] if self.params else None
        self.key = SlotKey(fingerprint, layout, torch.float32 if first is None else first.dtype)
        self._plans: dict[tuple[tuple[int, ...], tuple[int, ...]], _Plan] = {}
        self.resident: PreparedAdapter | None = None  # what the last swap loaded (None: the base voice)

    # --- checks, once per adapter -------------------------------------------------------------------------------
    def check(self, adapter: Adapter, source: str | None = None) -> None:
        """Raise `AdapterMismatchError` (`AdapterError` for a malformed in-memory adapter) unless `adapter`
        was made for this base and fits these slots; nothing is copied."""
        info, layout = adapter.info, self.key.layout
        source = source or info.name
        if info.base_fingerprint != self.key.fingerprint:
            raise AdapterMismatchError(f"{source}: made for base {info.base_fingerprint[:16]}, this model's base is "
                                       f"{self.key.fingerprint[:16]}")
        cfg = self.cfg
        if (info.sr, info.version, info.f0) != (cfg.sr, cfg.version, cfg.f0):
            raise AdapterMismatchError(f"{source}: for a {info.version} {info.sr} Hz f0={info.f0} model, this model "
                                       f"is {cfg.version} {cfg.sr} Hz f0={cfg.f0}")
        for name in info.target_modules:
            if (i := self._layer_index.get(name)) is None:
                raise AdapterMismatchError(f"{source}: adapts layer {name!r}, which has no LoRA slot in this model's "
                                           f"{layout.name} layout; to load it: {layout.setting}")
            if info.r > self.layers[i].max_rank:
                raise AdapterMismatchError(f"{source}: rank {info.r} exceeds this model's slot rank "
                                           f"{self.layers[i].max_rank} ({layout.name} layout); to load it: "
                                           f"{layout.setting}")
            pair = [adapter.tensors.get(f"{name}.{leaf}") for leaf in ("lora_A", "lora_B")]
            if (problem := self.layers[i].adapter_problem(*pair)) is not None:
                leaf, error = problem
                raise type(error)(f"{source}: adapter key '{name}.{leaf}' {error}")
        for name in info.full_delta:
            if (j := self._delta_index.get(name)) is None:
                raise AdapterMismatchError(f"{source}: carries a full delta for {name!r}, which has no full-delta "
                                           f"slot in this model's {layout.name} layout; to load it: {layout.setting}")
            t = adapter.tensors.get(FULL_DELTA_PREFIX + name)
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise AdapterError(f"{source}: adapter key {FULL_DELTA_PREFIX + name!r} is missing or not floating")
            if t.shape != self.bases[j].shape:
                raise AdapterMismatchError(f"{source}: adapter key {FULL_DELTA_PREFIX + name!r} has shape "
                                           f"{tuple(t.shape)}, expected {tuple(self.bases[j].shape)}")

    @torch.no_grad()
    def prepare(self, adapter: Adapter, device: str | torch.device | None = None,
                source: str | None = None) -> PreparedAdapter:
        """Check `adapter` (see `check`) and lay it out as the slots hold it, on `device` (default: the slots')."""
        self.check(adapter, source)
        info, dtype = adapter.info, self.key.dtype
        scale = info.lora_alpha / info.r
        layers = tuple(sorted(self._layer_index[n] for n in info.target_modules))
        deltas = tuple(sorted(self._delta_index[n] for n in info.full_delta))
        a_out, b_out, full_out, delta_out = [], [], [], []
        for i in layers:
            slot, name = self.layers[i], self.layer_names[i]
            dev = slot.lora_A.device if device is None else device
            a, b = adapter.tensors[f"{name}.lora_A"], adapter.tensors[f"{name}.lora_B"]
            r = a.shape[0]
            padded_a = torch.zeros(slot.lora_A.shape, dtype=dtype, device=dev)
            padded_b = torch.zeros(slot.lora_B.shape, dtype=dtype, device=dev)
            padded_a[:r].copy_(a)
            padded_b[:, :r].copy_(b)
            if scale != 1.0:  # in the slot dtype, after the cast: as a per-layer copy then scale would compute it
                padded_b[:, :r].mul_(scale)
            a_out.append(padded_a)
            b_out.append(padded_b)
        for j in deltas:
            base = self.bases[j] if device is None else self.bases[j].to(device)
            delta = torch.empty(base.shape, dtype=base.dtype, device=base.device)
            delta.copy_(adapter.tensors[FULL_DELTA_PREFIX + self.delta_names[j]])
            full_out.append(base + delta)
            delta_out.append(delta)
        return PreparedAdapter(info, self.key, layers, deltas, (*a_out, *b_out, *full_out, *delta_out))

    # --- the swap ------------------------------------------------------------------------------------------------
    def _plan(self, layers: tuple[int, ...], deltas: tuple[int, ...]) -> _Plan:
        plan = self._plans.get((layers, deltas))
        if plan is None:
            unset = [i for i in range(len(self.layers)) if i not in set(layers)]
            rest = [j for j in range(len(self.delta_names)) if j not in set(deltas)]
            delta_dst = [*(self.params[j] for j in deltas), *(self.deltas[j] for j in deltas),
                         *(self.params[j] for j in rest)]
            delta_zero = [self.deltas[j] for j in rest]
            dst = [*(self.layers[i].lora_A for i in layers), *(self.layers[i].lora_B for i in layers), *delta_dst]
            zero = [*(self.layers[i].lora_A for i in unset), *(self.layers[i].lora_B for i in unset), *delta_zero]
            plan = _Plan(dst, [self.bases[j] for j in rest], zero, delta_dst, delta_zero)
            self._plans[(layers, deltas)] = plan
        return plan

    @torch.no_grad()
    def swap(self, prepared: PreparedAdapter | None) -> None:
        """Make `prepared` resident (None: the base voice), in place: one fused copy, one fused zero."""
        if prepared is None:
            layers: tuple[int, ...] = ()
            deltas: tuple[int, ...] = ()
            tensors: tuple[Tensor, ...] = ()
        else:
            if prepared.key is not self.key and prepared.key != self.key:
                raise AdapterMismatchError(f"{prepared.info.name}: prepared for another model, layout or dtype "
                                           f"({prepared.key.layout.name}, {prepared.key.dtype}); prepare it with "
                                           "this model")
            layers, deltas, tensors = prepared.layers, prepared.deltas, prepared.tensors
        plan = self._plan(layers, deltas)
        if any(layer.merged for layer in self.layers):  # rare (single-voice deployments): pairs one by one
            self._swap_merged(layers, tensors)
            self._copy(plan.delta_dst, [*tensors[2 * len(layers):], *plan.extra_src], plan.delta_zero)
        else:
            self._copy(plan.dst, [*tensors, *plan.extra_src], plan.zero)
        self.resident = prepared

    @staticmethod
    def _copy(dst: list[Tensor], src: list[Tensor], zero: list[Tensor]) -> None:
        if dst:
            torch._foreach_copy_(dst, src)
        if zero:
            torch._foreach_zero_(zero)

    def _swap_merged(self, layers: tuple[int, ...], tensors: tuple[Tensor, ...]) -> None:
        """Merged layers keep their merge: each restores its base weight, takes the pair, adds the new delta."""
        n = len(layers)
        pairs = {i: (tensors[k], tensors[n + k]) for k, i in enumerate(layers)}
        for i, layer in enumerate(self.layers):
            if i in pairs:
                layer.assign_(*pairs[i], 1.0)
            else:
                layer.reset_()
