"""Reading and writing RVC's inference `.pth` files, and the base-model fingerprint.

RVC's file (spec §2): `{"weight": {key: fp16 tensor}, "config": [18 items], "info": str, "sr": "40k",
"f0": 0|1, "version": "v1"|"v2"}`. Files are read with `weights_only=True`: never execute pickled code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rvc_lora.config import SR_NAMES, SynthConfig, parse_sr
from rvc_lora.errors import CheckpointError, ConfigError
from rvc_lora.models.nsf import SineGenVariant
from rvc_lora.models.synthesizer import RVCSynthesizer, build_synthesizer

PARAM_G, PARAM_V = ".parametrizations.weight.original0", ".parametrizations.weight.original1"
POSTERIOR_PREFIX = "enc_q."


@dataclass(frozen=True)
class RawCheckpoint:
    """A validated `.pth` before any model is built: weights keyed as RVC's modules expect them."""

    path: Path
    weights: dict[str, Tensor]
    config: SynthConfig
    info: str
    fingerprint: str


@dataclass
class RVCCheckpoint:
    """A loaded RVC voice model: the synthesizer (eval mode, weight norm intact) and its metadata."""

    path: Path
    model: RVCSynthesizer
    config: SynthConfig
    info: str
    fingerprint: str

    @property
    def version(self) -> str:
        return self.config.version

    @property
    def f0(self) -> bool:
        return self.config.f0

    @property
    def sr(self) -> int:
        return self.config.sr


WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ZIP_MAGIC = b"PK\x03\x04"
INFLATE_SLACK = 1 << 20  # records a zip checkpoint may inflate to beyond its own size (torch.save stores them raw)


def _inflation_problem(path: Path) -> str | None:
    """torch.load reads each record of a zip checkpoint into a buffer of the size its zip directory declares.
    torch.save stores records uncompressed, so together they never exceed the file; a deflated record can
    declare gigabytes from a few KB (a zip bomb). Checked with torch's own zip reader, before any record is read."""
    size = path.stat().st_size
    with path.open("rb") as f:
        if f.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            return None  # a bare pickle: its storages are read from the file and must match it
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        declared = sum(reader.get_record_size(name) for name in reader.get_all_records())
    except Exception:  # not a readable zip: torch.load reports it
        return None
    if declared > size + INFLATE_SLACK:
        return f"its zip records inflate to {declared} bytes from a {size}-byte file (corrupt or hostile)"
    return None


def torch_load_checked(path: Path, allow_unsafe_pickle: bool) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if (problem := _inflation_problem(path)) is not None:
        raise CheckpointError(f"{path}: refused to load: {problem}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle, mmap=False)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the file holds pickled objects other than tensors and plain containers "
            f"({str(exc).splitlines()[0][:200]}). Loading it would execute code from the file; pass "
            "allow_unsafe_pickle=True only for a file you trust") from exc
    except Exception as exc:  # torch raises many types for corrupt or truncated files (KeyError among them)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or another format): "
                              f"{str(exc).splitlines()[0][:200]}") from exc


def rename_parametrizations(weights: Mapping[str, Any]) -> dict[str, Any]:
    """`X.parametrizations.weight.original0/1` (torch >= 2.1 re-saves) are RVC's `X.weight_g`/`X.weight_v`."""
    out: dict[str, Any] = {}
    for key, value in weights.items():
        if key.endswith(PARAM_G):
            key = key[: -len(PARAM_G)] + ".weight_g"
        elif key.endswith(PARAM_V):
            key = key[: -len(PARAM_V)] + ".weight_v"
        out[key] = value
    return out


def base_fingerprint(weights: Mapping[str, Tensor]) -> str:
    """sha256 over the stored tensors (sorted names, shapes, values rounded to fp16), `enc_q.*` excluded.

    A pretrained file with `enc_q` and the served file without it, in either weight-norm naming, in fp16
    or fp32, share one fingerprint: adapters made for one fit the other.
    """
    digest = hashlib.sha256()
    renamed = rename_parametrizations(weights)
    for key in sorted(renamed):
        if key.startswith(POSTERIOR_PREFIX):
            continue
        tensor = renamed[key].detach().to("cpu", torch.float16).contiguous()
        digest.update(key.encode())
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def unfuse_weight_norm(weights: dict[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    """Files already weight-norm-fused carry `X.weight` where the model has `X.weight_g`/`X.weight_v`:
    split it as g = ||w|| (per dim-0 slice), v = w, which reproduces w."""
    for key in [k for k in weights if k.endswith(".weight")]:
        stem = key[: -len(".weight")]
        if key not in expected and f"{stem}.weight_g" in expected and f"{stem}.weight_v" in expected:
            w = weights.pop(key).float()
            weights[f"{stem}.weight_v"] = w
            weights[f"{stem}.weight_g"] = torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())), keepdim=True)


def check_weights(path: Path, weights: Mapping[str, Any], expected: Mapping[str, Tensor]) -> None:
    for key, value in weights.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{path}: weight {key!r} is a {type(value).__name__}, not a tensor")
        if key not in expected:
            raise CheckpointError(f"{path}: unexpected key {key!r}: not part of this model's architecture")
        if value.dtype not in WEIGHT_DTYPES:  # float8 and the like: no finiteness check, no exact fp32 upcast
            raise CheckpointError(f"{path}: weight {key!r} has dtype {value.dtype}, expected float16, bfloat16, "
                                  "float32 or float64")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{path}: weight {key!r} has shape {tuple(value.shape)}, the config implies "
                                  f"{tuple(expected[key].shape)}")
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: weight {key!r} contains NaN or inf")
    missing = [k for k in expected if k not in weights and not k.startswith(POSTERIOR_PREFIX)]
    if missing:
        raise CheckpointError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing in all)")


def read_rvc_checkpoint(path: str | os.PathLike[str], *, allow_unsafe_pickle: bool = False) -> RawCheckpoint:
    """Read and validate an RVC voice `.pth` (or a pretrained base `{"model": ...}` with a `config`).

    Raises `CheckpointError` naming the file and the first offending key for anything that is not a
    complete, well-shaped checkpoint: other files, truncated files, training states (`G_*.pth`), missing,
    unexpected or misshaped tensors, unknown versions.
    """
    path = Path(path)
    cpt = torch_load_checked(path, allow_unsafe_pickle)
    if not isinstance(cpt, Mapping):
        raise CheckpointError(f"{path}: expected a dict with 'weight' and 'config', got a {type(cpt).__name__}")
    if "optimizer" in cpt or "iteration" in cpt:
        raise CheckpointError(f"{path}: this is a training state (G_*.pth / D_*.pth: model + optimizer), not a "
                              "voice model; export the small model from it with RVC first")
    weights = cpt.get("weight", cpt.get("model"))
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{path}: missing key 'weight' (the state dict of an RVC voice model)")
    if "config" not in cpt:
        raise CheckpointError(f"{path}: missing key 'config' (RVC's 18-item model config list)")
    version = cpt.get("version", "v1")
    if version not in ("v1", "v2"):
        raise CheckpointError(f"{path}: unknown version {version!r} (expected 'v1' or 'v2')")
    f0 = cpt.get("f0", 1)
    if f0 not in (0, 1):
        raise CheckpointError(f"{path}: key 'f0' is {f0!r}, expected 0 or 1")
    weights = rename_parametrizations(weights)
    emb_g = weights.get("emb_g.weight")
    if not isinstance(emb_g, Tensor) or emb_g.dim() != 2:
        raise CheckpointError(f"{path}: missing or misshaped key 'emb_g.weight' (the speaker table)")
    config_list = list(cpt["config"]) if isinstance(cpt["config"], (list, tuple)) else cpt["config"]
    try:
        if isinstance(config_list, list) and len(config_list) == 18:
            config_list[15] = int(emb_g.shape[0])  # RVC's fix-up: the speaker count comes from emb_g's rows
            config_list[17] = parse_sr(config_list[17], field_name="config[17] (sr)")
        config = SynthConfig.from_list(config_list, version=version, f0=bool(f0))
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated or initialised
            expected = build_synthesizer(config).state_dict()
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:  # e.g. sizes past int64 in an absurd config
        raise CheckpointError(f"{path}: its config does not describe a buildable model: "
                              f"{str(exc).splitlines()[0][:200]}") from exc
    weights = dict(weights)
    unfuse_weight_norm(weights, expected)
    check_weights(path, weights, expected)
    info = cpt.get("info", "")
    return RawCheckpoint(path, weights, config, str(info), base_fingerprint(weights))


def folded_names(weights: Mapping[str, Any]) -> list[str]:
    """Parameter names once weight norm is folded (`X.weight_g`/`X.weight_v` -> `X.weight`), `enc_q` left out."""
    out = [k[: -len("_v")] if k.endswith(".weight_v") else k for k in weights if not k.endswith(".weight_g")]
    return [k for k in out if not k.startswith(POSTERIOR_PREFIX)]


def build_from_raw(raw: RawCheckpoint, device: str | torch.device = "cpu", *,
                   sinegen_variant: SineGenVariant = "B") -> RVCSynthesizer:
    """The synthesizer for `raw`, weights loaded strictly (fp16 upcast to fp32 first), eval mode."""
    has_posterior = any(k.startswith(POSTERIOR_PREFIX) for k in raw.weights)
    model = build_synthesizer(raw.config, sinegen_variant=sinegen_variant, with_posterior=has_posterior)
    model.load_state_dict({k: v.float() for k, v in raw.weights.items()}, strict=True)
    return model.eval().to(device)


def load_rvc_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu", *,
                        sinegen_variant: SineGenVariant = "B", allow_unsafe_pickle: bool = False) -> RVCCheckpoint:
    """Load an RVC `.pth` as RVC does for inference (spec §1.1), strictly: fp32, eval, on `device`."""
    raw = read_rvc_checkpoint(path, allow_unsafe_pickle=allow_unsafe_pickle)
    model = build_from_raw(raw, device, sinegen_variant=sinegen_variant)
    return RVCCheckpoint(raw.path, model, raw.config, raw.info, raw.fingerprint)


def rvc_state_dict(model: torch.nn.Module, *, with_posterior: bool = False) -> dict[str, Tensor]:
    """The model's weights as RVC stores them: fp16 CPU tensors, `enc_q.*` dropped unless asked for."""
    return {k: v.detach().to("cpu", torch.float16).clone() for k, v in model.state_dict().items()
            if with_posterior or not k.startswith(POSTERIOR_PREFIX)}


def save_rvc_checkpoint(path: str | os.PathLike[str], model: RVCSynthesizer, *, info: str = "",
                        with_posterior: bool = False) -> Path:
    """Write `model` in RVC's inference format (what RVC's `savee` writes), atomically."""
    cfg = model.cfg
    sr_name = next((name for name, hz in SR_NAMES.items() if hz == cfg.sr), str(cfg.sr))
    config_list = cfg.to_list()
    config_list[15] = model.emb_g.num_embeddings
    cpt = {"weight": rvc_state_dict(model, with_posterior=with_posterior), "config": config_list, "info": info,
           "sr": sr_name, "f0": int(cfg.f0), "version": cfg.version}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(cpt, tmp)
    os.replace(tmp, path)
    return path
