"""Adapters validated once, swapped by one fused copy.

`ResidentSlots` lists a voice model's adapter memory in one fixed order: `lora_A` of every wrapper, their
`lora_B`, then for every full-delta slot the parameter itself and its delta buffer. `ResidentSlots.prepare`
checks an `Adapter` against the model once (base fingerprint, sr/version/f0, layers, ranks, shapes) and
returns a `PreparedAdapter`: the tensors as the slots will hold them (at the adapter's own rank, `alpha/r`
folded into B, base + delta for full deltas, in the model's dtype). `ResidentSlots.swap` then copies them
into the leading rank slots with one `torch._foreach_copy_` and zeroes, with one `_foreach_zero_`, only what
the previous adapter left beyond the new one's rank (each layer's `rank` says how many leading slots are
written), after an identity check of the slot key only: no per-tensor validation, no allocation, no host
sync. A rank-8 adapter in rank-32 slots copies a quarter of the slots, not all of them. `swap(None)` (back
to the base voice) is the same path with nothing to copy but the base values.
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

    layers: indices (into `ResidentSlots.layers`) of the LoRA pairs it sets; ranks: the rank r of each of them
    (<= the slot's `max_rank`); deltas: indices of the full-delta slots it sets; tensors: A of each layer
    `[r, cols]`, then B `[rows, r]` (scale folded in), then base + delta per full delta, then the delta, all in
    `key.dtype` (a bank that stacks adapters at the slot rank zero-pads A's rows and B's columns past r)."""

    info: AdapterInfo
    key: SlotKey
    layers: tuple[int, ...]
    ranks: tuple[int, ...]
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
        return PreparedAdapter(self.info, self.key, self.layers, self.ranks, self.deltas, moved)

    def pin_memory(self) -> PreparedAdapter:
        """Page-locked host copies: the host -> device copy in `to(..., non_blocking=True)` is then a plain DMA."""
        pinned = tuple(t.pin_memory() for t in self.tensors)
        return PreparedAdapter(self.info, self.key, self.layers, self.ranks, self.deltas, pinned)


Ranks = tuple[int, ...]  # the written rank of every LoRA layer of a model, in `ResidentSlots.layers` order


@dataclass(frozen=True)
class _Plan:
    """For one (layers, ranks, deltas) pattern: where the prepared tensors go (`dst`: the leading rank slots,
    in the tensors' order, then the unset full-delta parameters, which take their base values `extra_src`),
    the full-delta buffers to zero, and the written rank of every layer once it is resident. `delta_dst` is
    the full-delta part of `dst` alone, for a model with merged layers (whose pairs go one by one)."""

    dst: list[Tensor]
    extra_src: list[Tensor]
    delta_zero: list[Tensor]
    delta_dst: list[Tensor]
    written: Ranks


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
        self._plans: dict[tuple[tuple[int, ...], Ranks, tuple[int, ...]], _Plan] = {}
        self._zeros: dict[tuple[Ranks, Ranks], list[Tensor]] = {}
        self.resident: PreparedAdapter | None = None  # what the last swap loaded (None: the base voice)
        # True while an `AdapterBank` runs the model in one of its slots (`AdapterBank.bound`): `resident` is then
        # that slot's voice and a swap would write into the bound slot's views, so `swap` refuses
        self.bound = False

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
            a_out.append(a.to(device=dev, dtype=dtype, copy=True).contiguous())
            b_slot = b.to(device=dev, dtype=dtype, copy=True).contiguous()
            if scale != 1.0:  # in the slot dtype, after the cast: as a per-layer copy then scale would compute it
                b_slot.mul_(scale)
            b_out.append(b_slot)
        for j in deltas:
            base = self.bases[j] if device is None else self.bases[j].to(device)
            delta = torch.empty(base.shape, dtype=base.dtype, device=base.device)
            delta.copy_(adapter.tensors[FULL_DELTA_PREFIX + self.delta_names[j]])
            full_out.append(base + delta)
            delta_out.append(delta)
        ranks = tuple(t.shape[0] for t in a_out)
        return PreparedAdapter(info, self.key, layers, ranks, deltas, (*a_out, *b_out, *full_out, *delta_out))

    # --- the swap ------------------------------------------------------------------------------------------------
    def _plan(self, layers: tuple[int, ...], ranks: Ranks, deltas: tuple[int, ...]) -> _Plan:
        plan = self._plans.get((layers, ranks, deltas))
        if plan is None:
            rest = [j for j in range(len(self.delta_names)) if j not in set(deltas)]
            delta_dst = [*(self.params[j] for j in deltas), *(self.deltas[j] for j in deltas),
                         *(self.params[j] for j in rest)]
            pairs = [(self.layers[i], r) for i, r in zip(layers, ranks, strict=True)]
            dst = [*(layer.lora_A[:r] for layer, r in pairs), *(layer.lora_B[:, :r] for layer, r in pairs),
                   *delta_dst]
            by_layer = dict(zip(layers, ranks, strict=True))
            written = tuple(by_layer.get(i, 0) for i in range(len(self.layers)))
            plan = _Plan(dst, [self.bases[j] for j in rest], [self.deltas[j] for j in rest], delta_dst, written)
            self._plans[(layers, ranks, deltas)] = plan
        return plan

    def _stale(self, before: Ranks, after: Ranks) -> list[Tensor]:
        """The slots written `before` that stay non-zero `after` unless zeroed: rows/columns `after[i]:before[i]`."""
        zero = self._zeros.get((before, after))
        if zero is None:
            grown = [(layer, new, old) for layer, new, old in zip(self.layers, after, before, strict=True)
                     if old > new]
            zero = [*(layer.lora_A[new:old] for layer, new, old in grown),
                    *(layer.lora_B[:, new:old] for layer, new, old in grown)]
            if len(self._zeros) >= 64:  # a handful of (rank pattern) pairs in practice; bound it anyway
                self._zeros.clear()
            self._zeros[(before, after)] = zero
        return zero

    @torch.no_grad()
    def swap(self, prepared: PreparedAdapter | None) -> None:
        """Make `prepared` resident (None: the base voice), in place: one fused copy of the adapter's own rank,
        one fused zero of what the previous adapter left beyond it."""
        if self.bound:
            raise AdapterError("the model runs in an adapter bank slot now (AdapterBank.bound); swap after the block")
        if prepared is None:
            layers: tuple[int, ...] = ()
            ranks: Ranks = ()
            deltas: tuple[int, ...] = ()
            tensors: tuple[Tensor, ...] = ()
        else:
            if prepared.key is not self.key and prepared.key != self.key:
                raise AdapterMismatchError(f"{prepared.info.name}: prepared for another model, layout or dtype "
                                           f"({prepared.key.layout.name}, {prepared.key.dtype}); prepare it with "
                                           "this model")
            layers, ranks, deltas, tensors = prepared.layers, prepared.ranks, prepared.deltas, prepared.tensors
        plan = self._plan(layers, ranks, deltas)
        if any(layer.merged for layer in self.layers):  # rare (single-voice deployments): pairs one by one
            self._swap_merged(layers, tensors)
            self._copy(plan.delta_dst, [*tensors[2 * len(layers):], *plan.extra_src], plan.delta_zero)
        else:
            before = tuple(layer.rank for layer in self.layers)
            self._copy(plan.dst, [*tensors, *plan.extra_src],
                       [*self._stale(before, plan.written), *plan.delta_zero])
            for layer, r in zip(self.layers, plan.written, strict=True):
                layer.rank = r
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
