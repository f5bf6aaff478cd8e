"""Adapter files: safetensors holding LoRA pairs and full deltas, with metadata tying them to a base model.

Tensors: `<layer>.lora_A` `[r, cols]`, `<layer>.lora_B` `[rows, r]` (layout of `rvc_lora.lora`) and
`full_delta.<param>`. Metadata (str -> str): `format`, `format_version`, `name`, `r`, `lora_alpha`,
`target_modules` (JSON list), `full_delta` (JSON list), `base_fingerprint`, `sr`, `version`, `f0`, and for
an adapter extracted from a full voice `extraction` (its report as a JSON object: `rvc_lora.extract`), so
that the report travels with the file.
Loading folds `lora_alpha / r` into B. Only safetensors is ever read: a pickle is refused, not executed.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from rvc_lora.errors import AdapterError
from rvc_lora.lora.inject import FULL_DELTA_PREFIX

FORMAT = "rvc-lora-adapter"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a real header is a few hundred KB at most
MAX_TENSORS = 8192  # a real adapter holds two tensors per adapted layer and one per full delta: hundreds
MAX_LABEL_CHARS = 256
MAX_REPORT_CHARS = 1_000_000  # an extraction report of a full-size model: ~30 KB of JSON
MAX_ABS_VALUE = 65504.0  # the largest float16: adapters may be served in fp16, where larger values become inf
_DTYPE_NAMES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.float64: "F64"}
REQUIRED = ("format", "format_version", "r", "lora_alpha", "target_modules", "base_fingerprint", "sr", "version",
            "f0")


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter is for: rank, scale, targets and the base model (fingerprint, sr, version, f0).

    The one record of an adapter: the file's metadata (`to_metadata` / `AdapterInfo.from_metadata`), the
    service's store record (`service.store.StoredAdapter.info`, kept in the same metadata form) and the HTTP
    schema (`service.schemas.AdapterOut`, generated from these fields) all come from it."""

    name: str
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    base_fingerprint: str
    sr: int
    version: str
    f0: bool
    full_delta: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION
    extraction: str | None = None  # the extraction report, a JSON object's text (None: not extracted)

    @property
    def layers(self) -> tuple[str, ...]:
        return self.target_modules

    def to_metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "format_version": str(self.format_version), "name": self.name, "r": str(self.r),
                "lora_alpha": repr(self.lora_alpha), "target_modules": json.dumps(list(self.target_modules)),
                "full_delta": json.dumps(list(self.full_delta)), "base_fingerprint": self.base_fingerprint,
                "sr": str(self.sr), "version": self.version, "f0": str(int(self.f0)),
                **({} if self.extraction is None else {"extraction": self.extraction})}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], where: str | Path) -> AdapterInfo:
        """The record `to_metadata` wrote, checked (AdapterError naming `where` when it is not one)."""
        return _parse_info(Path(where), meta)

    def report(self) -> dict[str, object] | None:
        """The extraction report, parsed (None for an adapter that was not extracted)."""
        return None if self.extraction is None else dict(json.loads(self.extraction))


@dataclass(frozen=True)
class Adapter:
    """A validated adapter in memory: raw tensors (scale not yet folded) and their `AdapterInfo`."""

    info: AdapterInfo
    tensors: dict[str, Tensor] = field(repr=False)

    @property
    def layer_names(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] for k in self.tensors if not k.startswith(FULL_DELTA_PREFIX)})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> Adapter:
        return Adapter(self.info, {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in self.tensors.items()})


def _header_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return "is too short to be a safetensors file"
    (n,) = struct.unpack("<Q", head[:8])
    if head[8:9] != b"{":
        return "is not a safetensors file (pickle and other formats are refused, never executed)"
    if n > MAX_HEADER_BYTES or 8 + n > size:
        return f"declares a {n}-byte header in a {size}-byte file (corrupt or hostile)"
    return None


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"header names {key[:100]!r} more than once")
        out[key] = value
    return out


def _duplicate_problem(path: Path) -> str | None:
    """safetensors keeps one of two header entries with the same name and ignores the other: refuse them.
    Called once safetensors has accepted the header (bounded size and nesting)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        text = f.read(n)
    try:
        json.loads(text, object_pairs_hook=_refuse_duplicates)
    except ValueError as exc:
        return str(exc)
    return None


def _parse_info(path: Path, meta: Mapping[str, str]) -> AdapterInfo:
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise AdapterError(f"{path}: metadata is missing {missing[0]!r} (not an rvc-lora adapter?)")
    if meta["format"] != FORMAT:
        raise AdapterError(f"{path}: metadata format is {meta['format']!r}, expected {FORMAT!r}")
    try:
        version = int(meta["format_version"])
        r, alpha, sr = int(meta["r"]), float(meta["lora_alpha"]), int(meta["sr"])
        targets = json.loads(meta["target_modules"])
        full = json.loads(meta.get("full_delta", "[]"))
    except (ValueError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: malformed metadata: {exc}") from exc
    if version > FORMAT_VERSION:
        raise AdapterError(f"{path}: format_version {version} is newer than this rvc-lora reads ({FORMAT_VERSION})")
    if version < 1:
        raise AdapterError(f"{path}: format_version {version} is not a version (1..{FORMAT_VERSION})")
    if len(name := meta.get("name", path.stem)) > MAX_LABEL_CHARS:
        raise AdapterError(f"{path}: metadata name has {len(name)} characters, at most {MAX_LABEL_CHARS} allowed")
    if r < 1 or not math.isfinite(alpha) or alpha <= 0 or sr <= 0:
        raise AdapterError(f"{path}: metadata r={meta['r']!r}, lora_alpha={meta['lora_alpha']!r}, sr={meta['sr']!r} "
                           "out of range")
    for label, value in (("target_modules", targets), ("full_delta", full)):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise AdapterError(f"{path}: metadata {label} must be a JSON list of names")
    if meta["version"] not in ("v1", "v2") or meta["f0"] not in ("0", "1"):
        raise AdapterError(f"{path}: metadata version={meta['version']!r}, f0={meta['f0']!r} invalid")
    return AdapterInfo(name=name, r=r, lora_alpha=alpha, target_modules=tuple(targets),
                       base_fingerprint=meta["base_fingerprint"], sr=sr, version=meta["version"],
                       f0=meta["f0"] == "1", full_delta=tuple(full), format_version=version,
                       extraction=_parse_report(path, meta.get("extraction")))


def _parse_report(path: Path, text: str | None) -> str | None:
    """The `extraction` metadata checked to be a bounded JSON object (its fields are the reader's to check)."""
    if text is None:
        return None
    if len(text) > MAX_REPORT_CHARS:
        raise AdapterError(f"{path}: metadata extraction has {len(text)} characters, at most {MAX_REPORT_CHARS}")
    try:
        report = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past Python's stack
        raise AdapterError(f"{path}: metadata extraction is not JSON: {exc}") from exc
    if not isinstance(report, dict):
        raise AdapterError(f"{path}: metadata extraction must be a JSON object (the extraction report)")
    return text


def _check_tensors(path: Path, info: AdapterInfo, tensors: Mapping[str, Tensor]) -> None:
    pairs: dict[str, set[str]] = {}
    fulls = set()
    for key, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:  # float8/float4 and the like: no finiteness check, no fp16 cast
            raise AdapterError(f"{path}: tensor {key!r} has dtype {t.dtype}, expected float16, bfloat16, float32 "
                               "or float64")
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{path}: tensor {key!r} contains NaN or inf")
        if key.startswith(FULL_DELTA_PREFIX):
            fulls.add(key.removeprefix(FULL_DELTA_PREFIX))
            continue
        layer, _, leaf = key.rpartition(".")
        if leaf not in ("lora_A", "lora_B") or not layer:
            raise AdapterError(f"{path}: unexpected tensor {key!r} (expected <layer>.lora_A/lora_B or "
                               f"{FULL_DELTA_PREFIX}<param>)")
        if t.dim() != 2:
            raise AdapterError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, expected 2-D")
        rank = t.shape[0] if leaf == "lora_A" else t.shape[1]
        if rank != info.r:
            raise AdapterError(f"{path}: tensor {key!r} has rank {rank} but metadata says r={info.r}")
        pairs.setdefault(layer, set()).add(leaf)
    for layer, leaves in pairs.items():
        if leaves != {"lora_A", "lora_B"}:
            raise AdapterError(f"{path}: layer {layer!r} has {sorted(leaves)} but needs both lora_A and lora_B")
    if set(pairs) != set(info.target_modules):
        raise AdapterError(f"{path}: metadata target_modules do not list the layers the tensors hold")
    if fulls != set(info.full_delta):
        raise AdapterError(f"{path}: metadata full_delta does not list the full-delta tensors the file holds")


def _check_range(path: Path, info: AdapterInfo, tensors: Mapping[str, Tensor]) -> None:
    """Every value, and every `lora_B` value once `lora_alpha / r` is folded in, within float16's range."""
    scale = info.lora_alpha / info.r
    for key, t in tensors.items():
        peak = float(t.abs().max()) if t.numel() else 0.0
        effective = peak * scale if key.endswith(".lora_B") and not key.startswith(FULL_DELTA_PREFIX) else peak
        if effective > MAX_ABS_VALUE:
            folded = f" once lora_alpha/r = {scale:.3g} is folded in" if effective != peak else ""
            raise AdapterError(f"{path}: tensor {key!r} reaches magnitude {effective:.3g}{folded}, beyond "
                               f"{MAX_ABS_VALUE:g} (the float16 range adapters may be served in)")


def load_adapter(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Adapter:
    """Read and validate an adapter file (format, metadata, keys, ranks, dtypes, finiteness).

    Fit to a particular base model is checked by `SynthesizerLoRA.prepare` (`rvc_lora.voice`) before anything
    is copied.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: no such adapter file")
    if (problem := _header_problem(path)) is not None:
        raise AdapterError(f"{path}: {problem}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if (problem := _duplicate_problem(path)) is not None:
                raise AdapterError(f"{path}: {problem}")
            meta = f.metadata() or {}
            info = _parse_info(path, meta)
            keys = list(f.keys())
            if len(keys) > MAX_TENSORS:
                raise AdapterError(f"{path}: holds {len(keys)} tensors, more than {MAX_TENSORS} (corrupt or hostile)")
            tensors = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise AdapterError(f"{path}: unreadable safetensors file: {exc}") from exc
    _check_tensors(path, info, tensors)
    _check_range(path, info, tensors)
    return Adapter(info, tensors).to(device)


def save_adapter_tensors(path: str | os.PathLike[str], tensors: Mapping[str, Tensor], info: AdapterInfo,
                         dtype: torch.dtype = torch.float32) -> Path:
    """Write tensors + metadata atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    data = adapter_file_bytes(tensors, info, dtype, source=str(path))
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def adapter_file_bytes(tensors: Mapping[str, Tensor], info: AdapterInfo, dtype: torch.dtype = torch.float32,
                       *, source: str = "adapter") -> bytes:
    """The adapter file's bytes: safetensors with a sorted header, so the same adapter always gives the
    same bytes and the same content-addressed id (the safetensors library orders metadata by a hash map,
    which differs from run to run)."""
    _check_tensors(Path(source), info, tensors)
    header: dict[str, object] = {"__metadata__": dict(sorted(info.to_metadata().items()))}
    blobs, offset = [], 0
    for name, t in sorted(tensors.items()):
        t = t.detach().to("cpu", dtype).contiguous()
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset,
                                                                                              offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)
