"""Content encoder: HuBERT base / ContentVec features exactly as RVC computes them (spec §3.5).

The network is transformers' `HubertModel`; this module only loads weights into it and picks the layer RVC
uses: v1 = output of layer 9 through `final_proj` (256-d), v2 = output of layer 12 (768-d). Two file
formats load: the fairseq checkpoint RVC ships as `hubert_base.pt` (keys mapped to HF names, see
`_KEY_MAP`) and a Hugging Face folder (`config.json` + safetensors or `pytorch_model.bin`).

fairseq checkpoints pickle more than tensors: `task_state` holds `fairseq.data.dictionary.Dictionary`
objects, `args` may be an `argparse.Namespace`, `cfg` an omegaconf container. `torch.load(weights_only=True)`
refuses those globals. We list the globals the file names (zip or legacy format) and allowlist each one under its own
name as an inert stand-in (`_Inert`) that only records the arguments and state it is given (a `defaultdict` or
`deque` becomes a plain dict or list, so the items the pickle adds can go in); no class or function from the file
is ever imported or called, and torch's weights-only unpickler still blocks `os`/`sys`. The config values we need
(attention heads, conv strides) are then read out of plain data (`_plain`); one that cannot be read changes nothing
(the weights decide). The conv stack string that fairseq `eval()`s is parsed as literals only (`_literal`).
"""

from __future__ import annotations

import _compat_pickle
import ast
import json
import math
import pickletools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import HubertConfig, HubertModel

from rvc_lora.convs import use_fast_convolutions
from rvc_lora.errors import AudioError, CheckpointError, ConfigError, ModelUnavailableError, ParameterError
from rvc_lora.pipeline.batching import run_grouped

__all__ = ["ContentEncoder", "build_random_hubert", "save_fairseq_hubert", "save_hf_hubert"]

Version = Literal["v1", "v2"]
OUTPUT_LAYER: dict[str, int] = {"v1": 9, "v2": 12}  # fairseq extract_features(output_layer=k) == HF hidden_states[k]
BASE_CONV_LAYERS = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2  # HuBERT base (dim, kernel, stride)

# fairseq name <-> HF HubertModel name; {i} = layer number, {p} = weight|bias
_KEY_MAP = (
    ("feature_extractor.conv_layers.{i}.0.{p}", "feature_extractor.conv_layers.{i}.conv.{p}"),
    ("feature_extractor.conv_layers.0.2.{p}", "feature_extractor.conv_layers.0.layer_norm.{p}"),  # GroupNorm
    ("layer_norm.{p}", "feature_projection.layer_norm.{p}"),
    ("post_extract_proj.{p}", "feature_projection.projection.{p}"),
    ("mask_emb", "masked_spec_embed"),
    ("encoder.pos_conv.0.bias", "encoder.pos_conv_embed.conv.bias"),
    ("encoder.pos_conv.0.weight_g", "encoder.pos_conv_embed.conv.weight_g"),
    ("encoder.pos_conv.0.weight_v", "encoder.pos_conv_embed.conv.weight_v"),
    ("encoder.layer_norm.{p}", "encoder.layer_norm.{p}"),
    ("encoder.layers.{i}.self_attn.{proj}_proj.{p}", "encoder.layers.{i}.attention.{proj}_proj.{p}"),
    ("encoder.layers.{i}.self_attn_layer_norm.{p}", "encoder.layers.{i}.layer_norm.{p}"),
    ("encoder.layers.{i}.fc1.{p}", "encoder.layers.{i}.feed_forward.intermediate_dense.{p}"),
    ("encoder.layers.{i}.fc2.{p}", "encoder.layers.{i}.feed_forward.output_dense.{p}"),
    ("encoder.layers.{i}.final_layer_norm.{p}", "encoder.layers.{i}.final_layer_norm.{p}"),
)
_FIELDS = {"i": r"\d+", "p": "weight|bias", "proj": "q|k|v|out"}
_IGNORED = {"label_embs_concat"}  # pre-training unit embeddings: unused for features
_OPTIONAL = {"masked_spec_embed"}  # only used for training-time masking; HF omits it when masking is off
# old `weight_norm` names <-> `torch.nn.utils.parametrizations.weight_norm` names (newer torch / HF saves)
_WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    body = "".join(re.escape(s) if n % 2 == 0 else f"(?P<{s}>{_FIELDS[s]})" for n, s in enumerate(parts))
    return re.compile(body)


_FAIRSEQ_TO_HF = [(_template_regex(fs), hf) for fs, hf in _KEY_MAP]
_HF_TO_FAIRSEQ = [(_template_regex(hf), fs) for fs, hf in _KEY_MAP]


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in table:
        if m := pattern.fullmatch(key):
            return target.format(**m.groupdict())
    return None


def _fairseq_name(key: str) -> str:
    return _rename(_canonical_weight_norm(key), _HF_TO_FAIRSEQ) or key


def _canonical_weight_norm(key: str) -> str:
    for old, new in _WEIGHT_NORM.items():
        if key.endswith("." + new):
            return key[: -len(new)] + old
    return key


class ContentEncoder(nn.Module):
    """HuBERT/ContentVec body (`hubert`, a transformers `HubertModel`) plus the optional `final_proj` (v1)."""

    def __init__(self, hubert: HubertModel, final_proj: nn.Linear | None, source: str = "<memory>") -> None:
        super().__init__()
        self.hubert = use_fast_convolutions(hubert)  # its conv stack over raw 16 kHz audio: ~0.7x the time
        self.final_proj = final_proj
        self.source = source  # named in error messages
        self.eval().requires_grad_(False)

    @classmethod
    def from_path(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> ContentEncoder:
        """Load a fairseq `hubert_base.pt`-style file or a Hugging Face folder, in eval mode on `device` as `dtype`
        (RVC: the model is loaded in fp32 and then `.half()`d or `.float()`ed)."""
        path = Path(path)
        if not path.exists():
            raise ModelUnavailableError(f"content encoder {path} does not exist (a hubert_base.pt or a HF folder)")
        if path.is_dir():
            config, weights = _read_hf_folder(path)
            hubert, final_proj = _assemble(config, weights, path, str)
        else:
            config, weights = _read_fairseq(path)
            hubert, final_proj = _assemble(config, weights, path, _fairseq_name)
            _use_fp32_group_norm(hubert)  # classic RVC runs fairseq's model, whose conv-0 norm is Fp32GroupNorm
        return cls(hubert, final_proj, str(path)).to(device=device, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def feature_dim(self, version: Version) -> int:
        """Width of `extract(..., version)` features: 256 (v1) / 768 (v2) for HuBERT base."""
        self._check(version)
        if version == "v1":
            assert self.final_proj is not None
            return int(self.final_proj.out_features)
        return int(self.hubert.config.hidden_size)

    def num_frames(self, num_samples: int) -> int:
        """Frames the conv stack yields for `num_samples` input samples: floor((L - 400) / 320) + 1 for base."""
        n = num_samples
        for kernel, stride in zip(self.hubert.config.conv_kernel, self.hubert.config.conv_stride, strict=True):
            n = (n - kernel) // stride + 1 if n >= kernel else 0
        return n

    def extract(self, audio16k: Tensor, version: Version) -> Tensor:
        """16 kHz mono audio `[T]` or `[1, T]` (any float dtype, e.g. RVC's float64 chunk) -> features
        `[1, F, D]` in the encoder's dtype, on its device (D = `feature_dim(version)`)."""
        layer = self._check(version)
        return self._forward(self._mono(audio16k).view(1, -1), version, layer)

    def extract_batch(self, audios: Sequence[Tensor], version: Version) -> list[Tensor]:
        """Several inputs as `extract` takes them -> each one's `[1, F, D]` features, inputs of equal length
        stacked into one forward (exact: see `rvc_lora.pipeline.batching`; unequal lengths are not padded, since
        HuBERT's group norm over time would then see the padding)."""
        layer = self._check(version)
        monos = [self._mono(a) for a in audios]

        def run(group: list[Tensor]) -> list[Tensor]:
            return list(self._forward(torch.stack(group), version, layer).chunk(len(group)))

        return run_grouped(monos, [m.shape[0] for m in monos], run)

    def _mono(self, audio16k: Tensor) -> Tensor:
        """`[T]` or `[1, T]` -> `[T]`, checked long enough for one frame."""
        if audio16k.dim() == 2 and audio16k.shape[0] == 1:
            audio16k = audio16k[0]
        if audio16k.dim() != 1:
            raise AudioError(f"content encoder input must be mono [T] or [1, T], got shape {tuple(audio16k.shape)}")
        if self.num_frames(audio16k.shape[0]) < 1:
            raise AudioError(
                f"{audio16k.shape[0]} samples is too short for the content encoder (HuBERT base needs >= 400)"
            )
        return audio16k

    def _forward(self, audio: Tensor, version: Version, layer: int) -> Tensor:
        """`[B, T]` audio -> `[B, F, D]` features."""
        # One cast straight to the model dtype, as RVC's `.half()`/`.float()` of the float64 chunk. No waveform
        # normalisation and no attention mask: RVC passes an all-False padding mask, i.e. none.
        x = audio.to(device=self.device, dtype=self.dtype)
        n_layers = int(self.hubert.config.num_hidden_layers)
        with torch.no_grad(), _rng_untouched(self.device):
            out = self.hubert(x, output_hidden_states=layer < n_layers)
            hidden: Tensor = out.last_hidden_state if layer == n_layers else out.hidden_states[layer]
            if version == "v1":
                assert self.final_proj is not None
                return self.final_proj(hidden)  # type: ignore[no-any-return]
            return hidden

    def _check(self, version: str) -> int:
        if version not in OUTPUT_LAYER:
            raise ParameterError(f"version must be 'v1' or 'v2', got {version!r}")
        layer = OUTPUT_LAYER[version]
        if self.hubert.config.num_hidden_layers < layer:
            raise CheckpointError(
                f"{self.source}: {version} features come from layer {layer}, "
                f"but the encoder has only {self.hubert.config.num_hidden_layers} layers"
            )
        if version == "v1" and self.final_proj is None:
            raise CheckpointError(f"{self.source}: has no final_proj, which v1 models need (layer 9 -> final_proj)")
        return layer


@contextmanager
def _rng_untouched(device: torch.device) -> Iterator[None]:
    """Keep the global generators as they were: the synthesizer's noise draws must line up with RVC's (§3.11),
    and some transformers 4.x versions drew `torch.rand([])` per layer even in eval."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        yield


class _Fp32GroupNorm(nn.GroupNorm):
    """fairseq's `Fp32GroupNorm` (HuBERT's norm after conv 0): input, scale and shift go to fp32, the result is cast
    back to the input dtype. Same numbers as `nn.GroupNorm` in fp32; differs only when the model runs in fp16."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type_as(x)


def _use_fp32_group_norm(hubert: HubertModel) -> None:
    """Swap the feature extractor's GroupNorm(s) for `_Fp32GroupNorm` in place; parameters (and keys) are kept."""
    for layer in hubert.feature_extractor.conv_layers:
        norm = getattr(layer, "layer_norm", None)
        if type(norm) is nn.GroupNorm:
            fp32 = _Fp32GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine)
            fp32.weight, fp32.bias = norm.weight, norm.bias
            layer.layer_norm = fp32


# --- fairseq checkpoints -----------------------------------------------------------------------------------------


class _Inert:
    """Stand-in for a non-tensor global named in a pickle: records what it is given, runs nothing."""

    global_name: ClassVar[str] = ""
    args: tuple[object, ...]
    state: object

    def __new__(cls, *args: object, **kwargs: object) -> _Inert:
        self = object.__new__(cls)
        self.args = args
        self.state = None
        return self

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        self.state = state


def _dict_stand_in(*args: object) -> dict[object, object]:
    """`collections.defaultdict(factory)` (omegaconf's resolver cache): a plain dict, so the SETITEMS that follow
    in the pickle fill it (torch's unpickler sets items on dicts only); the factory is dropped, never called."""
    return {}


def _list_stand_in(*args: object) -> list[object]:
    """`collections.deque(items, maxlen)`: a plain list, for the same reason (APPENDS work on lists only)."""
    return list(args[0]) if args and isinstance(args[0], list | tuple) else []


# Containers that a pickle fills with SETITEMS/APPENDS after building them: an `_Inert` could not take the items.
_CONTAINER_STAND_INS: dict[str, Callable[..., Any]] = {
    "collections.defaultdict": _dict_stand_in,
    "collections.deque": _list_stand_in,
}


def _pickle_globals(stream: IO[bytes]) -> set[str]:
    """`module.name` of every GLOBAL in the next pickle of `stream` (read up to its STOP), with Python 2 names mapped
    as torch's unpickler maps them. Opcodes are only decoded, nothing is built."""
    names = set()
    for opcode, arg, _ in pickletools.genops(stream):
        if opcode.name == "GLOBAL" and isinstance(arg, str):
            module, _, name = arg.partition(" ")
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
            names.add(f"{module}.{name}")
    return names


def _globals_in_checkpoint(path: Path) -> list[str]:
    """Globals a torch checkpoint names: zip files (torch >= 1.6) via torch; the legacy format (magic number,
    protocol, sys info, then the object's pickle) by scanning the fourth pickle. [] if neither parses."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # not a zip checkpoint
        pass
    try:
        with path.open("rb") as f:
            for _ in range(3):
                _pickle_globals(f)
            return sorted(_pickle_globals(f))
    except Exception:  # neither format: let torch.load report what it is
        return []


def _torch_load_weights_only(path: Path) -> Any:
    stand_ins: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (_CONTAINER_STAND_INS.get(name) or type(f"_Inert<{name}>", (_Inert,), {"global_name": name}), name)
        for name in _globals_in_checkpoint(path)
    ]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from e


def _plain(obj: object, depth: int = 0) -> object:
    """Plain Python data (dict/list/str/number) out of a loaded config; `_Inert` stand-ins are unwrapped: omegaconf
    containers keep their items in `_content`, value nodes in `_val`, argparse.Namespace in its state dict, enum
    members in their single argument."""
    if depth > 32:
        return None
    if isinstance(obj, _Inert):
        state = obj.state
        if isinstance(state, Mapping):
            for key in ("_content", "_val"):
                if key in state:
                    return _plain(state[key], depth + 1)
            return _plain(state, depth + 1)
        return _plain(obj.args[0], depth + 1) if len(obj.args) == 1 else None
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v, depth + 1) for v in obj]
    return obj if isinstance(obj, str | int | float | bool) or obj is None else None


def _literal(expr: str) -> Any:
    """Evaluate fairseq's `conv_feature_layers` ("[(512,10,5)] + [(512,3,2)] * 4 + ...") with ints, tuples, lists,
    `+` and small `*` only (fairseq itself calls eval())."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.List | ast.Tuple):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult):
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(right, int) and 0 <= right <= 64 or isinstance(left, int) and 0 <= left <= 64:
                product = left * right
                if not isinstance(product, int) and len(product) > 256:  # a conv stack has ~7 layers
                    raise ValueError(f"conv layer list of {len(product)} entries")
                return product
        raise ValueError(f"unsupported expression {ast.dump(node)[:80]}")

    return ev(ast.parse(expr, mode="eval").body)


def _read_fairseq(path: Path) -> tuple[HubertConfig, dict[str, Tensor]]:
    ckpt = _torch_load_weights_only(path)
    model = ckpt.get("model") if isinstance(ckpt, Mapping) else None
    if not isinstance(model, Mapping) or "post_extract_proj.weight" not in model:
        raise CheckpointError(f"{path}: no fairseq HuBERT state dict under 'model' (is this a hubert_base.pt?)")
    weights: dict[str, Tensor] = {}
    for key, value in model.items():
        if key in _IGNORED:
            continue
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{path}: model[{key!r}] is a {type(value).__name__}, not a tensor")
        name = key if key.startswith("final_proj.") else _rename(_canonical_weight_norm(key), _FAIRSEQ_TO_HF)
        if name is None:
            raise CheckpointError(f"{path}: unexpected key {key!r} (not a HuBERT base / ContentVec checkpoint)")
        weights[name] = value
    return _fairseq_config(ckpt, weights, path), weights


def _fairseq_config(ckpt: Mapping[str, Any], weights: Mapping[str, Tensor], path: Path) -> HubertConfig:
    """HubertConfig from the tensor shapes, plus the few values shapes cannot tell (heads, conv strides) from the
    checkpoint's `cfg["model"]` or old-style `args`, falling back to HuBERT base's."""
    cfg = _plain(ckpt.get("cfg"))
    args = _plain(ckpt.get("args"))
    model_cfg: Mapping[str, Any] = {}
    if isinstance(cfg, Mapping) and isinstance(cfg.get("model"), Mapping):
        model_cfg = cfg["model"]
    elif isinstance(args, Mapping):
        model_cfg = args
    # A value the stand-ins could not turn into plain data reads as None and changes nothing: the weights decide.
    # (extractor_mode "layer_norm" also shows in the weights: its per-conv norms have keys that do not map.)
    mode, pre_norm = model_cfg.get("extractor_mode"), model_cfg.get("layer_norm_first")
    if isinstance(mode, str) and mode != "default" or pre_norm is True or pre_norm in ("true", "True"):
        raise CheckpointError(f"{path}: only HuBERT base-style models load (extractor_mode default, post-norm layers)")

    def shape(key: str) -> tuple[int, ...]:
        if key not in weights:
            raise CheckpointError(f"{path}: missing key {_fairseq_name(key)!r}")
        return tuple(weights[key].shape)

    n_conv = sum(1 for k in weights if re.fullmatch(r"feature_extractor\.conv_layers\.\d+\.conv\.weight", k))
    convs = [shape(f"feature_extractor.conv_layers.{i}.conv.weight") for i in range(n_conv)]
    kernels = [s[2] for s in convs]
    if isinstance(model_cfg.get("conv_feature_layers"), str):
        try:
            layers = [
                (int(dim), int(kernel), int(stride))
                for dim, kernel, stride in _literal(str(model_cfg["conv_feature_layers"]))
            ]
        except (ValueError, TypeError, SyntaxError) as e:
            raise CheckpointError(f"{path}: cannot read conv_feature_layers ({e})") from e
        if [kernel for _, kernel, _ in layers] != kernels:
            raise CheckpointError(f"{path}: conv_feature_layers kernels differ from the weights' {kernels}")
        strides = [stride for _, _, stride in layers]
    elif kernels == [k for _, k, _ in BASE_CONV_LAYERS]:
        strides = [s for _, _, s in BASE_CONV_LAYERS]
    else:
        raise CheckpointError(f"{path}: non-base conv kernels {kernels} and no conv_feature_layers in its config")
    if len(strides) != n_conv:
        raise CheckpointError(f"{path}: config lists {len(strides)} conv layers, the weights have {n_conv}")
    hidden, _ = shape("feature_projection.projection.weight")
    pos_v = shape("encoder.pos_conv_embed.conv.weight_v")
    n_layers = len({k.split(".")[2] for k in weights if k.startswith("encoder.layers.")})
    heads = model_cfg.get("encoder_attention_heads")
    if not isinstance(heads, int) or isinstance(heads, bool):
        heads = hidden // 64  # base and large: head dim 64
    if heads < 1 or hidden % heads:
        raise CheckpointError(f"{path}: cannot split {hidden} hidden units into {heads} attention heads")
    return HubertConfig(
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        intermediate_size=shape("encoder.layers.0.feed_forward.intermediate_dense.weight")[0],
        hidden_act="gelu",
        feat_extract_norm="group",
        feat_proj_layer_norm=True,
        do_stable_layer_norm=False,
        conv_dim=[s[0] for s in convs],
        conv_kernel=kernels,
        conv_stride=strides,
        conv_bias="feature_extractor.conv_layers.0.conv.bias" in weights,
        num_conv_pos_embeddings=pos_v[2],
        num_conv_pos_embedding_groups=hidden // pos_v[1],
        layer_norm_eps=1e-5,
        classifier_proj_size=shape("final_proj.weight")[0] if "final_proj.weight" in weights else 256,
    )


def save_fairseq_hubert(encoder: ContentEncoder, path: str | Path) -> Path:
    """Write `encoder` as a fairseq HuBERT checkpoint with `hubert_base.pt`'s key layout and config fields (tensors in
    the encoder's dtype). The same path and weights give the same bytes."""
    config = encoder.hubert.config
    if config.feat_extract_norm != "group" or config.do_stable_layer_norm or config.hidden_act != "gelu":
        raise ConfigError("only HuBERT base-style encoders (group-norm extractor, post-norm, gelu) have a fairseq form")
    model: dict[str, Tensor] = {}
    for key, value in encoder.hubert.state_dict().items():
        name = _rename(_canonical_weight_norm(key), _HF_TO_FAIRSEQ)
        assert name is not None, key  # every HubertModel key of a base-style config has a fairseq name
        model[name] = value.detach().cpu().contiguous()
    if encoder.final_proj is not None:
        model.update(
            {f"final_proj.{k}": v.detach().cpu().contiguous() for k, v in encoder.final_proj.state_dict().items()}
        )
    layers = list(zip(config.conv_dim, config.conv_kernel, config.conv_stride, strict=True))
    cfg = {
        "model": {
            "_name": "hubert",
            "extractor_mode": "default",
            "encoder_layers": config.num_hidden_layers,
            "encoder_embed_dim": config.hidden_size,
            "encoder_ffn_embed_dim": config.intermediate_size,
            "encoder_attention_heads": config.num_attention_heads,
            "activation_fn": "gelu",
            "layer_norm_first": False,
            "conv_feature_layers": repr([tuple(int(v) for v in layer) for layer in layers]),
            "conv_bias": bool(config.conv_bias),
            "conv_pos": config.num_conv_pos_embeddings,
            "conv_pos_groups": config.num_conv_pos_embedding_groups,
            "final_dim": encoder.final_proj.out_features if encoder.final_proj is not None else 0,
        },
        "task": {"_name": "hubert_pretraining", "normalize": False, "sample_rate": 16000},
    }
    path = Path(path)
    torch.save({"args": None, "cfg": cfg, "model": model, "optimizer_history": [], "extra_state": {}}, path)
    return path


# --- Hugging Face folders -----------------------------------------------------------------------------------------


def _read_hf_folder(folder: Path) -> tuple[HubertConfig, dict[str, Tensor]]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a Hugging Face HuBERT/ContentVec folder)")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_file}: unreadable ({e})") from e
    if not isinstance(raw, dict) or raw.get("model_type") != "hubert":
        raise CheckpointError(f"{config_file}: model_type is not 'hubert'")
    config = HubertConfig.from_dict(raw)
    if config.do_stable_layer_norm:
        raise CheckpointError(f"{config_file}: do_stable_layer_norm models (HuBERT large) are not RVC encoders")
    weights = _read_hf_weights(folder)
    if any(k.startswith("hubert.") for k in weights):  # a task model (e.g. HubertForCTC): keep the encoder only
        weights = {k.removeprefix("hubert."): v for k, v in weights.items() if k.startswith(("hubert.", "final_proj."))}
    return config, {_canonical_weight_norm(k): v for k, v in weights.items() if k not in _IGNORED}


def _read_hf_weights(folder: Path) -> dict[str, Tensor]:
    index = folder / "model.safetensors.index.json"
    files = [folder / "model.safetensors"]
    if index.is_file():
        shards = json.loads(index.read_text()).get("weight_map", {}).values()
        files = [folder / name for name in sorted(set(shards))]
    weights: dict[str, Tensor] = {}
    try:
        if all(f.is_file() for f in files):
            for f in files:
                weights.update(load_file(f))
            return weights
        bin_file = folder / "pytorch_model.bin"
        if bin_file.is_file():
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
            if isinstance(state, Mapping):
                return {str(k): v for k, v in state.items() if isinstance(v, Tensor)}
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot read the weights ({type(e).__name__}: {e})") from e
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin with a state dict")


def save_hf_hubert(encoder: ContentEncoder, folder: str | Path) -> Path:
    """Write `encoder` as a Hugging Face folder: `config.json` + `model.safetensors` (HubertModel keys, plus
    `final_proj.*` as ContentVec's HF port has them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = encoder.hubert.config.to_dict()
    config["architectures"] = ["HubertModelWithFinalProj" if encoder.final_proj is not None else "HubertModel"]
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.hubert.state_dict().items()}
    if encoder.final_proj is not None:
        tensors.update(
            {f"final_proj.{k}": v.detach().cpu().contiguous() for k, v in encoder.final_proj.state_dict().items()}
        )
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


# --- assembly and random encoders ------------------------------------------------------------------------------------


def _assemble(
    config: HubertConfig, weights: dict[str, Tensor], path: Path, file_key: Callable[[str], str]
) -> tuple[HubertModel, nn.Linear | None]:
    """Copy `weights` (HF names, old weight-norm names) into a fresh HubertModel; every key and shape checked.
    `file_key` turns a name back into the file's own, for error messages."""
    proj = {k.removeprefix("final_proj."): v for k, v in weights.items() if k.startswith("final_proj.")}
    body = {k: v for k, v in weights.items() if not k.startswith("final_proj.")}
    with torch.random.fork_rng(devices=[]):  # construction-time init draws; all of it is overwritten below
        hubert = HubertModel(config)
    target = {_canonical_weight_norm(k): k for k in hubert.state_dict()}
    expected = hubert.state_dict()
    missing = [k for k in target if k not in body and k not in _OPTIONAL]
    unexpected = [k for k in body if k not in target and k not in _OPTIONAL]
    if missing or unexpected:
        key, what = (missing[0], "missing key") if missing else (unexpected[0], "unexpected key")
        more = len(missing) + len(unexpected) - 1
        more_text = f" (and {more} more key problems)" if more else ""
        raise CheckpointError(f"{path}: {what} {file_key(key)!r}{more_text}")
    state = {target[k]: v for k, v in body.items() if k in target}
    for key, value in body.items():
        want = tuple(expected[target[key]].shape) if key in target else tuple(value.shape)
        if tuple(value.shape) != want:
            raise CheckpointError(f"{path}: {file_key(key)} has shape {tuple(value.shape)}, expected {want}")
    hubert.load_state_dict(state, strict=False)
    final_proj = None
    if proj:
        if (
            set(proj) != {"weight", "bias"}
            or proj["weight"].dim() != 2
            or proj["weight"].shape[1] != config.hidden_size
        ):
            raise CheckpointError(f"{path}: final_proj must be a Linear({config.hidden_size}, n) with a bias")
        final_proj = nn.Linear(config.hidden_size, proj["weight"].shape[0])
        final_proj.load_state_dict(proj)
    return hubert, final_proj


def build_random_hubert(config_overrides: Mapping[str, Any] | None = None, seed: int = 0) -> ContentEncoder:
    """A HuBERT (`HubertConfig(**config_overrides)`, HuBERT base without overrides) with `final_proj`, weights drawn
    from numpy `default_rng(seed)` in `named_parameters()` order (the same on every machine, torch's generator
    untouched): matrices normal/sqrt(fan_in) (x0.3 for the residual out_proj / output_dense), the positional conv's
    weight-norm magnitude sqrt(hidden / kernel) per tap, norm weights 1 + 0.05 normal, other vectors 0.02 normal.
    The HubertModel part equals the shared fixtures' make_hubert.py for the same config and seed."""
    config = HubertConfig(**dict(config_overrides or {}))
    with torch.random.fork_rng(devices=[]):
        hubert = HubertModel(config)
        final_proj = nn.Linear(config.hidden_size, config.classifier_proj_size)
    rng = np.random.default_rng(seed)
    magnitude = math.sqrt(config.hidden_size / config.num_conv_pos_embeddings)
    params = list(hubert.named_parameters()) + [(f"final_proj.{k}", p) for k, p in final_proj.named_parameters()]
    with torch.no_grad():
        for name, p in params:
            shape = tuple(p.shape)
            if "weight_g" in name or name.endswith("original0"):
                v = np.full(shape, magnitude)
            elif p.dim() >= 2:
                v = rng.standard_normal(shape) / np.sqrt(int(np.prod(shape[1:])))
                if name.endswith(("attention.out_proj.weight", "feed_forward.output_dense.weight")):
                    v = v * 0.3  # damp residual branches so deep-layer features stay time-varying
            elif "norm" in name.lower() and name.endswith("weight"):
                v = 1.0 + 0.05 * rng.standard_normal(shape)
            else:
                v = 0.02 * rng.standard_normal(shape)
            p.copy_(torch.from_numpy(np.asarray(v, dtype=np.float32)))
    return ContentEncoder(hubert, final_proj, f"<random hubert seed={seed}>")
