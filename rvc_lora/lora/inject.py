"""Put LoRA into any `nn.Module` by name pattern, and swap adapters in place.

Name patterns (`LoRAConfig.target_modules`, `LoRAConfig.full_delta_modules`): a pattern without
`*`, `?` or `[` matches a qualified name when its dotted components occur as a consecutive run of the
name's components (`"ups"` matches `dec.ups.0`, `"enc_p.emb_phone"` matches that module, `"emb_g"`
matches the parameter `emb_g.weight`); a pattern with them is an `fnmatch` against the whole name
(`"enc_p.encoder.attn_layers.*.conv_q"`, `"*.bias"`; `*` also crosses dots).

Adapter state dicts (what `lora_state_dict` returns and `load_lora_weights` takes):
  `<layer>.lora_A` `[r, W[0].numel()]`, `<layer>.lora_B` `[W.shape[0], r]`: low-rank pairs, effective
      values (scale folded in), `<layer>` the qualified name of the wrapped layer;
  `full_delta.<param>`: a whole-tensor delta, shaped like the parameter, added to the parameter's base
      value; `<param>` is the parameter's name in the un-injected model (e.g. `dec.ups.0.bias`,
      `emb_g.weight`, `enc_p.encoder.norm_layers_1.0.gamma`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.weight_norm import WeightNorm

from rvc_lora.errors import AdapterError, AdapterMismatchError, ConfigError
from rvc_lora.lora.config import LoRAConfig
from rvc_lora.lora.layers import SUPPORTED, LoRALayer, adapt_problem, check_alpha, tensor_problem, wrap_layer

FULL_DELTA_PREFIX = "full_delta."
FULL_DELTA_ATTR = "lora_full_delta"  # child module of the injected model holding the FullDeltaSlots
_WILDCARDS = frozenset("*?[")
_KINDS = "Conv1d/ConvTranspose1d/Linear/Embedding"


def name_matches(pattern: str, name: str) -> bool:
    """Whether `pattern` selects the qualified module or parameter `name` (rules in the module doc)."""
    if _WILDCARDS.intersection(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    want, parts = pattern.split("."), name.split(".")
    return any(parts[i : i + len(want)] == want for i in range(len(parts) - len(want) + 1))


def _weight_norm_names(m: nn.Module) -> list[str]:
    """Tensors of `m` computed by weight norm: old hook API or new parametrizations API."""
    names = [h.name for h in m._forward_pre_hooks.values() if isinstance(h, WeightNorm)]
    if parametrize.is_parametrized(m):
        plists = cast(nn.ModuleDict, m.parametrizations)  # tensor name -> ParametrizationList
        names += [
            t for t, plist in plists.items() if all(isinstance(p, _WeightNorm) for p in cast(nn.ModuleList, plist))
        ]
    return names


def _fold_own(m: nn.Module) -> list[str]:
    """Fold the weight-normed tensors of `m` itself (not of its children); returns their names."""
    names = []
    for hook in [h for h in m._forward_pre_hooks.values() if isinstance(h, WeightNorm)]:
        torch.nn.utils.remove_weight_norm(m, hook.name)  # sets a Parameter computed as forward does
        names.append(hook.name)
    for t in _weight_norm_names(m):  # only parametrized ones are left after the loop above
        parametrize.remove_parametrizations(m, t, leave_parametrized=True)
        names.append(t)
    return names


def fold_weight_norm(module: nn.Module) -> list[str]:
    """Replace weight norm by a plain Parameter of identical value in `module` and every submodule.

    Handles `torch.nn.utils.weight_norm` (`weight_g`/`weight_v`) and
    `torch.nn.utils.parametrizations.weight_norm` (`parametrizations.weight.original0/1`); other
    parametrizations are left alone. Returns the qualified names of the folded tensors."""
    folded = []
    for name, m in list(module.named_modules()):  # list: removing parametrizations edits the tree
        folded += [f"{name}.{t}".lstrip(".") for t in _fold_own(m)]
    return folded


class FullDeltaSlots(nn.Module):
    """Preallocated state for whole-tensor deltas, one entry per adapted parameter.

    `names[i]`: the parameter's name in the un-injected model (adapter key after `full_delta.`);
    `paths[i]`: where it lives in the injected model (differs inside a LoRA wrapper: `x.base.bias`);
    buffers `base_{i}` (the base value) and `delta_{i}` (the loaded delta), shaped like the parameter.
    Buffers are non-persistent: the model's state dict is unchanged, `.to()`/`.half()` still move them.
    """

    def __init__(self, targets: Mapping[str, tuple[str, Tensor]]) -> None:
        super().__init__()
        self.names = tuple(targets)
        self.paths = tuple(path for path, _ in targets.values())
        self.index = {name: i for i, name in enumerate(self.names)}
        for i, (_, param) in enumerate(targets.values()):
            self.register_buffer(f"base_{i}", param.detach().clone(), persistent=False)
            self.register_buffer(f"delta_{i}", torch.zeros_like(param, requires_grad=False), persistent=False)

    def base(self, i: int) -> Tensor:
        return self.get_buffer(f"base_{i}")

    def delta(self, i: int) -> Tensor:
        return self.get_buffer(f"delta_{i}")

    @torch.no_grad()
    def apply_(self, model: nn.Module, i: int, delta: Tensor | None) -> None:
        """Set parameter i to base + delta in place (delta None: exactly base). No check, no allocation."""
        param = model.get_parameter(self.paths[i])
        param.copy_(self.base(i))
        if delta is None:
            self.delta(i).zero_()
        else:
            param.add_(self.delta(i).copy_(delta))


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA wrapper in `model` by qualified name (the module walk is cached: a swap runs it often)."""
    cached: tuple[int, dict[str, LoRALayer]] | None = model.__dict__.get(_LAYERS_CACHE)
    stamp = _STRUCTURE_VERSION[0]
    if cached is None or cached[0] != stamp:
        cached = (stamp, {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)})
        model.__dict__[_LAYERS_CACHE] = cached
    return cached[1]


_LAYERS_CACHE = "_rvc_lora_layers"
_STRUCTURE_VERSION = [0]  # bumped by inject_lora: any injection invalidates every cached walk


def full_delta_slots(model: nn.Module) -> FullDeltaSlots | None:
    """The model's full-delta state, or None if `inject_lora` made none."""
    slots = getattr(model, FULL_DELTA_ATTR, None)
    return slots if isinstance(slots, FullDeltaSlots) else None


def _param_owners(model: nn.Module) -> dict[str, str]:
    """Parameter name as it reads once weight norm is folded -> qualified name of its module."""
    owners: dict[str, str] = {}
    parametrized = [n for n, m in model.named_modules() if parametrize.is_parametrized(m)]
    internal = tuple(f"{n}.parametrizations".lstrip(".") for n in parametrized)
    for mname, m in model.named_modules():
        if mname.startswith(internal):  # original0/1 of a parametrization are reported as the tensor
            continue
        prefix = f"{mname}." if mname else ""
        normed = _weight_norm_names(m)
        for pname, _ in m.named_parameters(recurse=False):
            folded = next((t for t in normed if pname in (f"{t}_g", f"{t}_v")), pname)
            owners[prefix + folded] = mname
        for t in normed:
            owners[prefix + t] = mname
    return owners


def _select(patterns: tuple[str, ...], names: list[str], field: str) -> list[str]:
    """Names matched by any pattern, in model order; a pattern matching nothing is a `ConfigError`."""
    hits: dict[str, None] = {}
    for pattern in patterns:
        matched = [n for n in names if name_matches(pattern, n)]
        if not matched:
            raise ConfigError(f"LoRAConfig.{field} pattern {pattern!r} matches nothing in the model")
        hits.update(dict.fromkeys(matched))
    return [n for n in names if n in hits]  # model order


def inject_lora(model: nn.Module, config: LoRAConfig, max_rank: int | None = None) -> dict[str, LoRALayer]:
    """Wrap every Conv1d/ConvTranspose1d/Linear/Embedding matched by `config.target_modules` in place
    (its weight norm folded first), with slots for `max_rank` (default `config.r`), and set up
    full-delta slots for the parameters matched by `config.full_delta_modules`. All slots start at
    zero, so the model computes what it computed before. Returns the wrappers by qualified name.

    Every check runs before the model is changed: `ConfigError` for a pattern that matches nothing
    (or no supported layer) and for a weight matched by both lists; `AdapterError` for an
    unsupported geometry (groups != 1, padding_mode, Embedding max_norm) or a model already injected."""
    slots = config.r if max_rank is None else max_rank
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < config.r:
        raise ConfigError(f"max_rank must be an int >= LoRAConfig.r={config.r}, got {max_rank!r}")
    if lora_layers(model) or full_delta_slots(model) is not None:
        raise AdapterError(f"{type(model).__name__} already has LoRA injected")
    modules = dict(model.named_modules())
    matched = _select(tuple(config.target_modules), [n for n in modules if n], "target_modules")
    targets = [n for n in matched if isinstance(modules[n], SUPPORTED)]
    for pattern in config.target_modules:
        if not any(name_matches(pattern, n) for n in targets):
            raise ConfigError(f"LoRAConfig.target_modules pattern {pattern!r} matches no {_KINDS}")
    for name in targets:
        m = modules[name]
        if (problem := adapt_problem(m)) is not None:
            raise AdapterError(f"cannot adapt {name}: {problem}")
        if "weight" not in dict(m.named_parameters(recurse=False)) and "weight" not in _weight_norm_names(m):
            raise AdapterError(
                f"cannot adapt {name}: its weight is computed by a parametrization other than weight norm"
            )
    owners = _param_owners(model)
    full = _select(tuple(config.full_delta_modules), list(owners), "full_delta_modules")
    clash = next((n for n in full if owners[n] in targets and n == f"{owners[n]}.weight"), None)
    if clash is not None:  # a merged LoRA delta and a whole-tensor delta would overwrite each other
        raise ConfigError(f"{clash} is matched by both target_modules and full_delta_modules")

    wrapped: dict[str, LoRALayer] = {}
    for name in targets:
        _fold_own(modules[name])
        parent, _, child = name.rpartition(".")
        wrapped[name] = wrap_layer(modules[name], slots, config.lora_dropout)
        setattr(model.get_submodule(parent), child, wrapped[name])
    paths: dict[str, tuple[str, Tensor]] = {}
    for n in full:
        owner, leaf = owners[n], n.rpartition(".")[2]
        if owner not in wrapped and leaf in _weight_norm_names(modules[owner]):
            _fold_own(modules[owner])  # the delta is to the folded weight, as the extractor computes it
        path = f"{owner}.base.{leaf}" if owner in wrapped else n
        paths[n] = (path, model.get_parameter(path))
    if paths:
        model.add_module(FULL_DELTA_ATTR, FullDeltaSlots(paths))
    _STRUCTURE_VERSION[0] += 1
    return wrapped


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """`lora_A` and `lora_B` of every wrapper, in model order (what an optimizer trains)."""
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]


def lora_state_dict(model: nn.Module, rank: int | None = None) -> dict[str, Tensor]:
    """The resident adapter as detached copies on the model's device: `<layer>.lora_A` `[r, cols]`,
    `<layer>.lora_B` `[rows, r]` (effective values: load them back with alpha=None) and, if the model
    has full-delta slots, `full_delta.<param>`. `rank` trims to the first `rank` slots (default: all);
    an `AdapterError` is raised if that would drop non-zero values."""
    out: dict[str, Tensor] = {}
    for name, layer in lora_layers(model).items():
        a, b = layer.lora_A.detach(), layer.lora_B.detach()
        if rank is not None:
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= layer.max_rank:
                raise AdapterError(f"rank must be an int in [1, {layer.max_rank}], got {rank!r}")
            if bool(a[rank:].any()) or bool(b[:, rank:].any()):
                raise AdapterError(f"{name} uses more than {rank} rank slots; trimming would change it")
            a, b = a[:rank], b[:, :rank]
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = a.clone(), b.clone()
    if (slots := full_delta_slots(model)) is not None:
        out.update({FULL_DELTA_PREFIX + n: slots.delta(i).detach().clone() for i, n in enumerate(slots.names)})
    return out


def _finite(tensors: Mapping[str, Tensor]) -> dict[str, bool]:
    """isfinite(t).all() per key with one host sync per device, not one per tensor.

    The common case (everything finite) costs one fused norm per device: a norm is NaN or inf iff some
    value is (or the values are astronomically large, which is then reported per tensor below)."""
    by_device: dict[torch.device, list[str]] = {}
    for key, t in tensors.items():
        by_device.setdefault(t.device, []).append(key)
    flags: dict[str, bool] = {}
    for keys in by_device.values():
        norms = torch._foreach_norm([tensors[k].float() if tensors[k].dtype != torch.float32 else tensors[k]
                                     for k in keys])
        if bool(torch.isfinite(torch.stack(norms)).all()):
            flags.update(dict.fromkeys(keys, True))
            continue
        ok = torch.stack([torch.isfinite(tensors[k]).all() for k in keys]).tolist()
        flags.update(zip(keys, ok, strict=True))
    return flags


def load_lora_weights(
    model: nn.Module, state: Mapping[str, Tensor], strict: bool = True, alpha: float | None = None
) -> None:
    """Replace the resident adapter by `state` (keys as in the module doc), copying in place.

    Everything is validated before anything is written; on any problem an `AdapterError` (an
    `AdapterMismatchError` for keys or shapes this model cannot have) names the first offending key
    in `state` order and the model is untouched. Checks: unknown keys (ignored if not `strict`),
    a lora_A without its lora_B or the reverse, non-floating dtypes, shapes, rank above the slots,
    non-finite values. Layers and full-delta parameters absent from `state` are reset to base: an
    adapter replaces the previous one entirely. `alpha` folds `alpha / r` into each layer's B (r =
    that layer's rank); None means scale 1, so `lora_state_dict` output round-trips bit-exactly.
    Full deltas are never scaled."""
    if alpha is not None:
        check_alpha(alpha)
    layers, slots = lora_layers(model), full_delta_slots(model)
    pairs: dict[str, dict[str, Tensor]] = {}  # layer -> {"lora_A": a, "lora_B": b}
    deltas: dict[int, Tensor] = {}  # full-delta slot index -> delta
    used: dict[str, Tensor] = {}  # structurally valid keys that will be copied
    problems: dict[str, AdapterError] = {}
    for key, t in state.items():
        layer_name, _, leaf = key.rpartition(".")
        delta_name = key.removeprefix(FULL_DELTA_PREFIX) if key.startswith(FULL_DELTA_PREFIX) else None
        slot = slots.index.get(delta_name) if slots is not None and delta_name is not None else None
        if slots is not None and slot is not None:
            if (problem := tensor_problem(t)) is not None:
                problems[key] = AdapterError(problem)
            elif t.shape != (shape := slots.base(slot).shape):
                problems[key] = AdapterMismatchError(f"has shape {tuple(t.shape)}, expected {tuple(shape)}")
            else:
                deltas[slot] = used[key] = t
        elif leaf in ("lora_A", "lora_B") and layer_name in layers:
            pairs.setdefault(layer_name, {})[leaf] = t
        elif strict:
            problems[key] = AdapterMismatchError("is not a LoRA or full-delta key of this model")
    for name, pair in pairs.items():
        if len(pair) == 1:
            (have,) = pair
            problems[f"{name}.{have}"] = AdapterError(f"has no matching {'lora_B' if have == 'lora_A' else 'lora_A'}")
        elif (bad := layers[name].adapter_problem(pair["lora_A"], pair["lora_B"])) is not None:
            problems[f"{name}.{bad[0]}"] = bad[1]
        else:
            used.update({f"{name}.{leaf}": t for leaf, t in pair.items()})
    problems.update({k: AdapterError("has non-finite values") for k, ok in _finite(used).items() if not ok})
    if problems:
        key = next(k for k in state if k in problems)  # first offending key in the caller's order
        raise type(problems[key])(f"adapter key {key!r} {problems[key]}")

    for name, layer in layers.items():
        if name in pairs:
            a, b = pairs[name]["lora_A"], pairs[name]["lora_B"]
            layer.assign_(a, b, 1.0 if alpha is None else alpha / a.shape[0])
        else:
            layer.reset_()
    if slots is not None:
        for i in range(len(slots.names)):
            slots.apply_(model, i, deltas.get(i))


def merge_lora(model: nn.Module) -> None:
    """Fold every wrapper's delta into its base weight (forward then costs what the base costs)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora`, restoring every base weight bit-exactly."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def reset_lora(model: nn.Module) -> None:
    """Drop the resident adapter: zero LoRA slots, full-delta parameters back to their base values."""
    for layer in lora_layers(model).values():
        layer.reset_()
    if (slots := full_delta_slots(model)) is not None:
        for i in range(len(slots.names)):
            slots.apply_(model, i, None)


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of the model without its adapter, under the un-injected key names.

    `<layer>.base.weight` -> `<layer>.weight` (the pre-merge weight if merged), `lora_A`/`lora_B`
    dropped, full-delta parameters at their base values. Layers whose weight norm was folded appear
    as `.weight` (not `weight_g`/`weight_v`). Tensors are detached views, not copies."""
    layers, slots = lora_layers(model), full_delta_slots(model)
    base_of = {} if slots is None else {path: slots.base(i) for i, path in enumerate(slots.paths)}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf in ("lora_A", "lora_B"):
            continue
        value = base_of.get(key, value)
        layer_name, _, mid = owner.rpartition(".")
        if mid == "base" and layer_name in layers:  # a wrapped layer's own weight or bias
            key = f"{layer_name}.{leaf}"
            value = layers[layer_name].base_weight() if leaf == "weight" else value
        out[key] = value.detach()
    return out
