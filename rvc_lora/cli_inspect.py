"""`rvc-lora inspect FILE`: what a model file is, told by its content (the suffix only picks adapter and index).

Voice models (`.pth` with RVC's `config`), pretrained generators and discriminators (`f0G40k.pth`,
`f0D40k.pth`: `{"model": state_dict}`, the config recognised from the tensor shapes), content encoders,
adapters and retrieval indexes. Anything else, an audio file included, is "not a model file".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rvc_lora.errors import CheckpointError, RVCLoraError

KINDS = ".pth voice models, pretrained G/D (.pth), content encoders (.pt), adapters (.safetensors), indexes (.index)"


class NotAModelError(CheckpointError):
    """The file is not one of the model files `inspect` describes."""

    code = "not_a_model"


def register(sub: Any) -> None:
    p = sub.add_parser("inspect", help="describe a model file: voice .pth, pretrained G/D, adapter, index",
                       description=f"Describe a model file: {KINDS}.")
    p.add_argument("file", help="the file to describe")
    p.add_argument("--json", action="store_true", help="print JSON instead of aligned text")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    info = describe(Path(args.file))
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        width = max(map(len, info))
        sys.stdout.write("".join(f"{k:<{width}}  {v}\n" for k, v in info.items()))
    return 0


def describe(path: Path) -> dict[str, Any]:
    """The facts about `path` as an ordered dict with `kind` first; `NotAModelError` for other files."""
    if path.is_dir():
        raise NotAModelError(f"{path}: is a directory, not a model file")
    if not path.exists():
        raise NotAModelError(f"{path}: does not exist")
    if path.suffix == ".safetensors":
        return _adapter(path)
    if path.suffix == ".index":
        return _index(path)
    return _torch_file(path)


def _adapter(path: Path) -> dict[str, Any]:
    from rvc_lora.adapters import load_adapter

    i = load_adapter(path).info
    facts = {"kind": "adapter", "name": i.name, "rank": i.r, "lora_alpha": i.lora_alpha, "layers": len(i.layers),
             "targets": sorted({_family(n) for n in i.layers}), "full_deltas": len(i.full_delta),
             "base_fingerprint": i.base_fingerprint, "version": i.version, "sr": i.sr, "f0": i.f0,
             "bytes": path.stat().st_size}
    if (report := i.report()) is not None:  # extracted from a full voice: how close it came
        facts |= {"extraction_snr_db": report.get("snr_db"), "extraction_max_rel_error": report.get("max_rel_error")}
    return facts


def _family(layer: str) -> str:
    return ".".join(p for p in layer.split(".") if not p.isdigit())


def _index(path: Path) -> dict[str, Any]:
    from rvc_lora.pipeline.index import RetrievalIndex

    index = RetrievalIndex.from_path(path)
    version = {256: "v1", 768: "v2"}.get(index.dim, "unknown")
    return {"kind": "index", "vectors": index.ntotal, "dim": index.dim, "version": version}


def _not_a_model(path: Path, why: str) -> NotAModelError:
    from rvc_lora.pipeline.audio import probe_audio

    try:
        audio = probe_audio(path)
    except RVCLoraError:
        return NotAModelError(f"{path}: not a model file ({why}); inspect reads {KINDS}")
    length = "" if audio.duration_s is None else f", {audio.duration_s:.1f} s"
    return NotAModelError(f"{path}: not a model file: it is audio ({audio.sr} Hz, {audio.channels} channel(s)"
                          f"{length}); inspect reads {KINDS}")


def _torch_file(path: Path) -> dict[str, Any]:
    from rvc_lora.checkpoint import ZIP_MAGIC, torch_load_checked

    with path.open("rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if not head.startswith((ZIP_MAGIC, b"\x80")):  # torch.save writes a zip; before torch 1.6, a pickle (0x80 ...)
        raise _not_a_model(path, "not a PyTorch checkpoint")
    try:
        cpt = torch_load_checked(path, allow_unsafe_pickle=False)
    except CheckpointError as exc:
        if "pickled objects" in str(exc):  # a model file perhaps, but one whose loading would run code from it
            raise CheckpointError(f"{path}: holds pickled Python objects besides tensors; loading it would run code "
                                  "from the file, which rvc-lora does not do") from exc
        raise _not_a_model(path, "not a PyTorch checkpoint") from exc
    if not isinstance(cpt, Mapping):
        raise _not_a_model(path, f"a PyTorch file holding a {type(cpt).__name__}")
    weights = cpt.get("weight", cpt.get("model"))
    size = path.stat().st_size
    if isinstance(weights, Mapping) and any(str(k).startswith("discriminators.") for k in weights):
        return _discriminator(path, weights, size)
    if "config" in cpt and "weight" in cpt:
        return _voice(path, size)
    if isinstance(weights, Mapping) and "emb_g.weight" in weights:
        return _pretrained(path, size)
    if isinstance(weights, Mapping) and any("encoder.layers." in str(k) for k in weights):
        return {"kind": "content encoder (fairseq HuBERT/ContentVec)", "tensors": len(weights), "bytes": size}
    keys = ", ".join(sorted(map(str, cpt))[:6])
    raise _not_a_model(path, f"a PyTorch file with keys {keys or 'none'}, not an RVC model")


def _voice(path: Path, size: int) -> dict[str, Any]:
    from rvc_lora.checkpoint import read_rvc_checkpoint

    raw = read_rvc_checkpoint(path)
    cfg = raw.config
    return {"kind": "voice model", "class": cfg.class_name, "version": cfg.version, "sr": cfg.sr, "f0": cfg.f0,
            "speakers": cfg.spk_embed_dim, "info": raw.info, "fingerprint": raw.fingerprint,
            "has_posterior_encoder": any(k.startswith("enc_q.") for k in raw.weights),
            "parameters": sum(v.numel() for v in raw.weights.values()), "bytes": size}


def _pretrained(path: Path, size: int) -> dict[str, Any]:
    from rvc_lora.train.pretrained import load_pretrained_base

    base = load_pretrained_base(path)  # config from the file or recognised from the shapes; enc_q required
    cfg = base.config
    return {"kind": "pretrained generator (a training base: rvc-lora train --base)", "class": cfg.class_name,
            "version": cfg.version, "sr": cfg.sr, "f0": cfg.f0, "speakers": cfg.spk_embed_dim,
            "fingerprint": base.fingerprint, "has_posterior_encoder": True,
            "parameters": sum(p.numel() for p in base.model.parameters()), "bytes": size}


def _discriminator(path: Path, weights: Mapping[str, Any], size: int) -> dict[str, Any]:
    from rvc_lora.train.discriminators import discriminator_from_state_dict

    model = discriminator_from_state_dict(weights, str(path))
    return {"kind": "pretrained discriminator (rvc-lora train --discriminator)", "version": model.version,
            "sub_discriminators": len(model.discriminators),
            "parameters": sum(p.numel() for p in model.parameters()), "bytes": size}

