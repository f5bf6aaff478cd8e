"""The adapter bank: K adapters resident at once, and one forward over rows in different voices.

Every adapter tensor of the model (each LoRA layer's A and B, each full-delta parameter's value) gets K slots,
allocated once as one `[K, ...]` tensor. Slot 0 *is* the model's own resident memory (its parameters are
rebound to views of slot 0 when the bank is made), so `K = 1` costs what the model cost before and loading
slot 0 is `ResidentSlots.swap`, the fused copy of today. Loading slot k > 0 is the same fused copy into that
slot's views. Nothing is reallocated afterwards (`data_ptr()`s stay put).

A batch acquires the slot of each voice it uses (`acquire`, loading the voice into a free or the least
recently used unpinned slot if it is not resident) and releases them when its forward is done; a pinned slot
is never evicted, and `BankFullError` says every slot is pinned (nothing is loaded or evicted then). The
prepared adapter may live in host memory (pinned on CUDA): the load is then the host -> device copy itself,
still one fused copy into the slot, so the bank is the device tier of a voice cache and nothing else holds a
device copy. `bound(slot, voice)` runs the model's own forward (`VoiceConverter.convert`, a stream block) in
a slot's voice without copying it into slot 0. `synthesize(rows, slots)` gathers each row's
A, B and full-delta values from the bank (`index_select`: one gather per tensor, no loop over rows) and runs
`rvc_lora.models.rows.infer_padded` under `torch.func.vmap` with them: each LoRA layer's fused weight
`W + B_row @ A_row` then becomes a grouped convolution over the rows. A batch in a single voice skips the
vmap and runs the plain batched forward with that voice's slot bound in place of the resident one.

vmap costs per operation, and its per-row grouped convolutions do a voice's arithmetic less efficiently than
running each voice's rows as their own plain batch (`by_voice`: one forward per distinct voice, each exactly
the solo computation). `auto` measures both per batch shape (distinct voices, longest row; each within 2x) and
runs the faster one (`WayChooser`); both give each row what it gives alone, to float rounding. The default
(`default_strategy`) is `by_voice` on a CPU, whose cores one voice's forward already keeps busy, and `auto` on
an accelerator, where a vmapped forward can fill units that one voice's rows leave idle.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from rvc_lora.errors import BankFullError, ConfigError
from rvc_lora.lora import every_slot_active, full_delta_slots
from rvc_lora.models.rows import PaddedRows, infer_padded
from rvc_lora.models.synthesizer import RVCSynthesizer
from rvc_lora.voice.batch import SynthRow, pad_rows, split_audio
from rvc_lora.voice.model import SynthesizerLoRA
from rvc_lora.voice.slots import PreparedAdapter

Slot = int | None  # a bank slot index; None is the base voice (no slot)


Way = Literal["vmap", "by_voice"]  # how a batch of several voices runs (see the module docstring)
Strategy = Literal["auto", "vmap", "by_voice"]


def default_strategy(device: torch.device) -> Strategy:
    """How a bank on `device` runs a batch of several voices unless told: `by_voice` on a CPU, else `auto`.

    On a CPU vmap never paid: a full-size batch of 16 rows over 8 voices took 33.3 s vmapped against 16.7 s by
    voice on the 2-core CPU, and each trial `auto` makes of the slower way costs a whole batch (in a short load
    test of 16 clients the trials halved the pipelined worker's throughput)."""
    return "by_voice" if device.type == "cpu" else "auto"


class WayChooser:
    """Which way runs a batch shape faster, measured on this machine. Per key, each way is tried `trials` times
    (`by_voice` first: it is never slower than one voice at a time); then the way with the lower cost (the least
    of its last `window` timings) runs, and the other is tried again after a gap of calls of the key, then after
    twice as many, and so on (up to `MAX_GAP`): a change of load or a first-call warm-up does not fix the choice
    for good. The first gap is `recheck` calls, longer when the other way was much slower: a recheck costs
    `ratio - 1` of a batch (the other way's cost over the better one's, less the batch it replaces), so the gap is
    at least `(ratio - 1) / overhead` calls and rechecks cost at most about `overhead` of the time (on a 2-core
    CPU a vmapped full-size batch took twice `by_voice`'s time: rechecking it every 32 calls would cost 3%)."""

    WAYS: tuple[Way, Way] = ("by_voice", "vmap")
    MAX_GAP = 1024

    def __init__(self, trials: int = 1, window: int = 4, recheck: int = 32, overhead: float = 0.02) -> None:
        if trials < 1 or window < trials or recheck < 1 or overhead <= 0:
            raise ConfigError(f"WayChooser: trials {trials} (>= 1, <= window {window}), recheck {recheck} (>= 1) "
                              f"and overhead {overhead} (> 0) out of range")
        self.trials, self.window, self.recheck, self.overhead = trials, window, recheck, overhead
        self._costs: dict[Hashable, dict[Way, deque[float]]] = {}
        self._calls: dict[Hashable, int] = {}
        self._next: dict[Hashable, tuple[int, int]] = {}  # (call at which the other way runs again, the gap)

    def pick(self, key: Hashable) -> Way:
        costs = self._costs.setdefault(key, {w: deque(maxlen=self.window) for w in self.WAYS})
        calls = self._calls[key] = self._calls.get(key, 0) + 1
        for way in self.WAYS:
            if len(costs[way]) < self.trials:
                return way
        best = min(self.WAYS, key=lambda w: min(costs[w]))
        other = self.WAYS[1 - self.WAYS.index(best)]
        if key not in self._next:
            ratio = min(costs[other]) / max(min(costs[best]), 1e-9)
            gap = min(max(self.recheck, math.ceil((ratio - 1) / self.overhead)), self.MAX_GAP)
            self._next[key] = (calls - 1 + gap, gap)
        at, gap = self._next[key]
        if calls >= at:
            gap = min(2 * gap, self.MAX_GAP)
            self._next[key] = (calls + gap, gap)
            return other
        return best

    def record(self, key: Hashable, way: Way, seconds: float) -> None:
        self._costs.setdefault(key, {w: deque(maxlen=self.window) for w in self.WAYS})[way].append(seconds)


class _PaddedForward(nn.Module):
    """`infer_padded` as a module's forward, so `functional_call` can run it with substituted parameters."""

    def __init__(self, synth: RVCSynthesizer) -> None:
        super().__init__()
        self.synth = synth

    def forward(self, rows: PaddedRows) -> Tensor:
        return infer_padded(self.synth, rows)


class AdapterBank:
    """K adapter slots over one `SynthesizerLoRA` (built after the model's `.to()`/`.half()`; a later move
    leaves the bank stale, which its methods report). `slots`: K >= 1."""

    def __init__(self, model: SynthesizerLoRA, slots: int) -> None:
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ConfigError(f"bank slots must be an int >= 1, got {slots!r}")
        resident = model.slots
        if any(layer.merged for layer in resident.layers):
            raise ConfigError("an adapter bank needs unmerged LoRA layers (unmerge the model first)")
        self.model, self.size = model, slots
        self.strategy: Strategy = default_strategy(model.base.emb_g.weight.device)
        self.chooser = WayChooser()
        self.last_way: Way | Literal["one_voice"] | None = None  # how the last `synthesize` ran (benchmarks, logs)
        self._forward = _PaddedForward(model.base)
        self.layer_names = resident.layer_names
        full = full_delta_slots(model.base)
        self.delta_paths: tuple[str, ...] = () if full is None else full.paths
        # the parameter dicts `_bound` writes: each LoRA layer's, and (dict, name) of each full-delta value
        self._layer_params: list[dict[str, Any]] = [layer._parameters for layer in resident.layers]
        self._owner_params: list[tuple[dict[str, Any], str]] = [
            (model.base.get_submodule(path.rpartition(".")[0])._parameters, path.rpartition(".")[2])
            for path in self.delta_paths]
        self._views: dict[Slot, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
        self._bases = resident.bases
        # [K, ...] storage; slot 0 takes the resident values and the model's parameters become its views
        self._a = [_stacked(layer.lora_A, slots) for layer in resident.layers]
        self._b = [_stacked(layer.lora_B, slots) for layer in resident.layers]
        self._v = [_stacked(p, slots) for p in resident.params]
        for layer, a, b in zip(resident.layers, self._a, self._b, strict=True):
            layer.lora_A = nn.Parameter(a[0], requires_grad=layer.lora_A.requires_grad)
            layer.lora_B = nn.Parameter(b[0], requires_grad=layer.lora_B.requires_grad)
        for path, p, v in zip(self.delta_paths, resident.params, self._v, strict=True):
            owner, _, leaf = path.rpartition(".")
            setattr(model.base.get_submodule(owner), leaf, nn.Parameter(v[0], requires_grad=p.requires_grad))
        model.refresh_slots()  # list the rebound parameters; slot 0 still holds what was resident
        model.slots.resident = resident.resident
        self._loaded: list[PreparedAdapter | None] = [resident.resident] + [None] * (slots - 1)
        self._written: list[tuple[int, ...]] = [()] * slots  # slots > 0: the written rank of each LoRA layer
        self._keys: list[Hashable | None] = [None] * slots
        self._where: dict[Hashable, int] = {}
        self._pins = [0] * slots
        self._lru: OrderedDict[int, None] = OrderedDict.fromkeys(range(slots))  # least recently used first
        self._plans: dict[tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...]],
                          tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}

    # --- memory ---------------------------------------------------------------------------------------------
    @property
    def slot_nbytes(self) -> int:
        """Bytes one slot holds: A and B of every LoRA layer and the value of every full-delta parameter."""
        return sum(t[0].numel() * t.element_size() for t in (*self._a, *self._b, *self._v))

    @property
    def nbytes(self) -> int:
        """Bytes of all K slots (slot 0 is the model's own resident memory)."""
        return self.size * self.slot_nbytes

    # --- slots ----------------------------------------------------------------------------------------------
    def resident(self) -> dict[Hashable, int]:
        """Keys of the voices resident now -> their slot."""
        self._sync_slot0()
        return dict(self._where)

    def pinned(self, slot: int) -> int:
        """How many holders pin `slot` now."""
        return self._pins[slot]

    def holds(self, key: Hashable) -> bool:
        """Whether voice `key` is resident in a slot now."""
        self._sync_slot0()
        return key in self._where

    @property
    def voices(self) -> int:
        """How many named voices the slots hold (a read only: callable from another thread for a gauge; slot 0
        may have been swapped since, which the next `acquire` notices)."""
        return len(self._where)

    def discard(self, key: Hashable) -> None:
        """Forget voice `key` unless a holder pins its slot (its cache entry left, its adapter was deleted): the
        slot is then the first one `acquire` loads. Its weights stay until then (nothing is copied here)."""
        slot = self._where.get(key)
        if slot is not None and self._pins[slot] == 0:
            del self._where[key]
            self._keys[slot] = None
            self._lru.move_to_end(slot, last=False)

    def acquire(self, key: Hashable, prepared: PreparedAdapter | None) -> Slot:
        """The slot holding voice `key` (loading `prepared` into a free or the least recently used unpinned slot
        if it is not resident), pinned until `release`. `prepared` None is the base voice: no slot, None.
        `BankFullError` when the voice is not resident and every slot is pinned."""
        if prepared is None:
            return None
        self._check_fresh()
        self._sync_slot0()
        slot = self._where.get(key)
        if slot is None:
            free = [s for s in self._lru if self._pins[s] == 0]
            if not free:
                raise BankFullError(f"all {self.size} adapter slots are pinned by batches in flight")
            slot = next((s for s in free if self._keys[s] is None), free[0])
            self._load(slot, prepared)
            if self._keys[slot] is not None:
                del self._where[self._keys[slot]]
            self._keys[slot], self._where[key] = key, slot
        self._pins[slot] += 1
        self._lru.move_to_end(slot)
        return slot

    def release(self, slot: Slot) -> None:
        """Unpin a slot `acquire` gave (None: nothing to do)."""
        if slot is None:
            return
        if self._pins[slot] < 1:
            raise ConfigError(f"bank slot {slot} released more often than acquired")
        self._pins[slot] -= 1

    @contextmanager
    def hold(self, voices: Sequence[tuple[Hashable, PreparedAdapter | None]]) -> Iterator[list[Slot]]:
        """Acquire a slot per (key, prepared) (repeats allowed) for the `with` block, release them after. On
        `BankFullError` the slots already acquired are released."""
        slots: list[Slot] = []
        try:
            for key, prepared in voices:
                slots.append(self.acquire(key, prepared))
            yield slots
        finally:
            for slot in slots:
                self.release(slot)

    @contextmanager
    def bound(self, slot: Slot, voice: PreparedAdapter | None) -> Iterator[None]:
        """Inside the block the model computes in `slot`'s voice (from `acquire`; None: the base voice) without
        any copy: `voice`, the adapter acquired for it, is the model's `slots.resident` and `slots.bound` is
        set, so `VoiceConverter.use_adapter(voice)` copies nothing and a `swap` is refused."""
        if slot is not None and self._pins[slot] < 1:
            raise ConfigError(f"slot {slot} is not acquired (acquire it before binding it, release it after)")
        slots = self.model.slots
        if slots.bound:
            raise ConfigError("the model is bound to a bank slot already")
        saved = slots.resident
        slots.resident, slots.bound = voice, True
        try:
            with self._bound(slot):
                yield
        finally:
            slots.resident, slots.bound = saved, False

    def _sync_slot0(self) -> None:
        """Slot 0 is the model's resident memory: a `swap` outside the bank replaced what it holds."""
        if self.model.slots.bound:  # `resident` is the bound slot's voice for now, not slot 0's
            return
        current = self.model.slots.resident
        if current is not self._loaded[0]:
            self._loaded[0] = current
            if self._keys[0] is not None:
                del self._where[self._keys[0]]
                self._keys[0] = None

    def _check_fresh(self) -> None:
        layers = self.model.slots.layers
        if layers and layers[0].lora_A.data_ptr() != self._a[0][0].data_ptr():
            raise ConfigError("the model was moved or recast after its adapter bank was made; make a new bank")

    @torch.no_grad()
    def _load(self, slot: int, prepared: PreparedAdapter) -> None:
        if slot == 0:  # the resident slots: exactly the single-voice swap
            self.model.swap(prepared)
            self._loaded[0] = prepared
            return
        if prepared.key != self.model.slots.key:
            raise ConfigError(f"{prepared.info.name}: prepared for another model, layout or dtype; prepare it with "
                              "this model")
        dst, extra, zero = self._plan(slot, prepared.layers, prepared.ranks, prepared.deltas)
        n, d = len(prepared.layers), len(prepared.deltas)
        src = [*prepared.tensors[: 2 * n + d], *extra]
        torch._foreach_copy_(dst, src, non_blocking=True)  # from pinned host memory: an async DMA in stream order
        if zero:
            torch._foreach_zero_(zero)
        self._loaded[slot] = prepared
        ranks = dict(zip(prepared.layers, prepared.ranks, strict=True))
        self._written[slot] = tuple(ranks.get(i, 0) for i in range(len(self._a)))

    def _plan(self, slot: int, layers: tuple[int, ...], ranks: tuple[int, ...], deltas: tuple[int, ...]
              ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Slot views in the order of a prepared adapter's tensors (A's leading `ranks` rows, B's leading
        columns, full values), then the unset full deltas (from their base values), and the unset A/B and the
        rank slots past each adapter layer's rank to zero: one fused copy, one fused zero."""
        plan = self._plans.get((slot, layers, ranks, deltas))
        if plan is None:
            unset = [i for i in range(len(self._a)) if i not in set(layers)]
            rest = [j for j in range(len(self._v)) if j not in set(deltas)]
            pairs = list(zip(layers, ranks, strict=True))
            dst = [*(self._a[i][slot][:r] for i, r in pairs), *(self._b[i][slot][:, :r] for i, r in pairs),
                   *(self._v[j][slot] for j in deltas), *(self._v[j][slot] for j in rest)]
            zero = [*(self._a[i][slot] for i in unset), *(self._b[i][slot] for i in unset),
                    *(self._a[i][slot][r:] for i, r in pairs if r < self._a[i].shape[1]),
                    *(self._b[i][slot][:, r:] for i, r in pairs if r < self._a[i].shape[1])]
            plan = dst, [self._bases[j] for j in rest], zero
            self._plans[(slot, layers, ranks, deltas)] = plan
        return plan

    # --- the batched forward --------------------------------------------------------------------------------
    @torch.no_grad()
    def synthesize(self, rows: Sequence[SynthRow], slots: Sequence[Slot]) -> list[Tensor]:
        """Rows in the voices of `slots` (one per row, from `acquire`; None = base voice) in one forward
        -> each row's audio `[samples]` in the model dtype on the model's device."""
        if len(rows) != len(slots):
            raise ConfigError(f"{len(rows)} rows but {len(slots)} slots")
        for s in slots:
            if s is not None and not (0 <= s < self.size and self._pins[s] > 0):
                raise ConfigError(f"slot {s} is not acquired (acquire it before the batch, release it after)")
        self._check_fresh()
        device = self._a[0].device if self._a else self.model.base.emb_g.weight.device
        voices = list(dict.fromkeys(slots))  # distinct, in order of first use
        if len(voices) == 1:  # one voice: the plain batched forward with its slot bound
            self.last_way = "one_voice"
            with self._bound(voices[0]):
                return split_audio(infer_padded(self.model.base, pad_rows(rows, device)), rows)
        way: Way = self.strategy if self.strategy != "auto" else "vmap"
        # distinct voices and longest row, each within 2x: few keys, so few trials of the slower way
        key = (len(voices).bit_length(), max(r.plan.frames for r in rows).bit_length())
        if self.strategy == "auto":
            way = self.chooser.pick(key)
            start = time.perf_counter()
        self.last_way = way
        out = self._by_voice(rows, slots, voices, device) if way == "by_voice" else self._vmapped(rows, slots, device)
        if self.strategy == "auto":
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.chooser.record(key, way, time.perf_counter() - start)
        return out

    def _by_voice(self, rows: Sequence[SynthRow], slots: Sequence[Slot], voices: list[Slot],
                  device: torch.device) -> list[Tensor]:
        """One plain batched forward per voice, over that voice's rows (each padded to its own longest)."""
        out: list[Tensor | None] = [None] * len(rows)
        for voice in voices:
            idx = [i for i, s in enumerate(slots) if s == voice]
            group = [rows[i] for i in idx]
            with self._bound(voice):
                audio = split_audio(infer_padded(self.model.base, pad_rows(group, device)), group)
            for i, a in zip(idx, audio, strict=True):
                out[i] = a
        return [a for a in out if a is not None]

    def _vmapped(self, rows: Sequence[SynthRow], slots: Sequence[Slot], device: torch.device) -> list[Tensor]:
        """All rows in one forward under `vmap`, each with its slot's adapter tensors (grouped convolutions)."""
        batch = pad_rows(rows, device)
        params = self._gather(list(slots), device)

        def one_row(p: dict[str, Tensor], *values: Tensor | None) -> Tensor:
            row = PaddedRows.from_tensors(tuple(None if v is None else v.unsqueeze(0) for v in values), batch)
            out: Tensor = functional_call(self._forward, p, (row,), tie_weights=False)
            return out[0]

        values = batch.tensors()
        in_dims: tuple[Any, ...] = (0, *(None if v is None else 0 for v in values))
        with every_slot_active(self.model.slots.layers):  # the slot tensors are substituted: all ranks count
            audio = vmap(one_row, in_dims=in_dims)(params, *values)
        return split_audio(audio, rows)

    @contextmanager
    def _bound(self, slot: Slot) -> Iterator[None]:
        """Inside the block the model computes in `slot`'s voice: its A/B views and full-delta values stand in
        for slot 0's, with its written ranks, so the forward is exactly a solo run's. The base voice (None):
        rank 0 and the base values. Slot 0 is the model as it is. The entries are written straight into the
        modules' parameter dicts and the ranks into their `__dict__`s (no copy; `setattr` would insist on
        `nn.Parameter`s and costs microseconds per tensor, `functional_call` milliseconds per model)."""
        if slot == 0:
            yield
            return
        layers = self.model.slots.layers
        a_views, b_views, values = self._slot_views(slot)
        written = (0,) * len(layers) if slot is None else self._written[slot]
        params, owners = self._layer_params, self._owner_params
        saved_pairs = [(p["lora_A"], p["lora_B"]) for p in params]
        saved_ranks = [layer.rank for layer in layers]
        saved_values = [p[leaf] for p, leaf in owners]
        try:
            if slot is not None:
                for p, a, b in zip(params, a_views, b_views, strict=True):
                    p["lora_A"], p["lora_B"] = a, b
            for layer, r in zip(layers, written, strict=True):
                layer.__dict__["rank"] = r
            for (p, leaf), v in zip(owners, values, strict=True):
                p[leaf] = v
            yield
        finally:
            for p, (a, b) in zip(params, saved_pairs, strict=True):
                p["lora_A"], p["lora_B"] = a, b
            for layer, r in zip(layers, saved_ranks, strict=True):
                layer.__dict__["rank"] = r
            for (p, leaf), v in zip(owners, saved_values, strict=True):
                p[leaf] = v

    def _slot_views(self, slot: Slot) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """A and B of every layer and every full-delta value in `slot` (views, made once: the storage never
        moves); the base voice: no A/B, the base values."""
        views = self._views.get(slot)
        if views is None:
            if slot is None:
                views = [], [], list(self._bases)
            else:
                views = [a[slot] for a in self._a], [b[slot] for b in self._b], [v[slot] for v in self._v]
            self._views[slot] = views
        return views

    def _gather(self, slots: list[Slot], device: torch.device) -> dict[str, Tensor]:
        """Each row's adapter tensors under `_PaddedForward`'s parameter names, `[B, ...]`: one `index_select`
        per tensor. Base-voice rows read slot 0 with B zeroed and the base full-delta values."""
        idx = torch.tensor([0 if s is None else s for s in slots], device=device)
        keep = torch.tensor([s is not None for s in slots], device=device)
        params: dict[str, Tensor] = {}
        for name, a, b in zip(self.layer_names, self._a, self._b, strict=True):
            rows_b = b.index_select(0, idx) * keep.view(-1, 1, 1).to(b.dtype)
            params[f"synth.{name}.lora_A"] = a.index_select(0, idx)
            params[f"synth.{name}.lora_B"] = rows_b
        for path, v, base in zip(self.delta_paths, self._v, self._bases, strict=True):
            shape = (-1, *[1] * base.dim())
            params[f"synth.{path}"] = torch.where(keep.view(shape), v.index_select(0, idx), base.unsqueeze(0))
        return params


def _stacked(t: Tensor, slots: int) -> Tensor:
    """`[K, *t.shape]` storage with `t`'s values in slot 0 and zeros elsewhere."""
    out = torch.zeros((slots, *t.shape), dtype=t.dtype, device=t.device)
    out[0].copy_(t.detach())
    return out
