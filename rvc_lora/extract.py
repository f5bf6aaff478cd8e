"""LoRA adapters from full RVC voice models: `voice - base`, layer by layer, by truncated SVD.

    result = extract_adapter("f0G40k.pth", "voice.pth", rank=8, targets="all")
    result.save("voice.safetensors"); print(result.report.format())

Both models' weight norm is folded (`W = g * v / ||v||`, norm over every dim but 0, in fp32 after
upcasting the stored fp16), then per Conv1d/ConvTranspose1d/Linear weight the delta
`M = (W_voice - W_base).reshape(W.shape[0], -1)` is factored as `M ~ B @ A` with `B = U_k sqrt(S_k)`
`[rows, k]` and `A = sqrt(S_k) V_k^T` `[k, cols]`, the layout of `rvc_lora.lora`. The square root is
split between the factors so that neither falls into fp16's subnormal range for small deltas. k is
`rank`, or with `energy` the smallest rank keeping that share of `||M||_F^2` (`rank` then caps it);
never above the numerical rank, so an exact rank-3 delta is stored at rank 3. The file has one `r`
(the largest k); lower-rank layers are zero-padded. `lora_alpha = r`: B holds effective values.

Biases, LayerNorm gamma/beta, `emb_g`, `emb_pitch`, `emb_rel_k/v`, `l_linear`, `conv_post` and the
`noise_convs` (one input or output channel: no low-rank saving) are stored whole as
`full_delta.<param>` (`FULL_DELTA_PATTERNS`). Layers whose delta is exactly zero are omitted.
`targets="dec"` extracts `dec.*` only (everything else stays the base's, listed as `skipped`);
`"all"` extracts enc_p, flow and dec.

Speakers: the voice's `emb_g` may have fewer rows than the base's (the delta is zero-padded: those
speaker ids keep the base's rows); more rows cannot be expressed over the base and are refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rvc_lora.adapters import Adapter, AdapterInfo, adapter_file_bytes, save_adapter_tensors
from rvc_lora.calibration import (
    CALIBRATION_SECONDS,
    collect_input_covariances,
    prepared_inputs,
    weighted_factorize,
)
from rvc_lora.checkpoint import POSTERIOR_PREFIX, RawCheckpoint, build_from_raw, folded_names, read_rvc_checkpoint
from rvc_lora.config import SynthConfig
from rvc_lora.errors import AdapterError, AdapterMismatchError, ConfigError
from rvc_lora.frames import FRAMES_PER_S
from rvc_lora.lora import FULL_DELTA_PREFIX, name_matches
from rvc_lora.models.synthesizer import RVCSynthesizer, build_synthesizer
from rvc_lora.pipeline.steps import f0_to_coarse
from rvc_lora.voice import (
    DEFAULT_EXTRACT_METHOD,
    DEFAULT_EXTRACT_RANK,
    DEFAULT_EXTRACT_TARGETS,
    EXTRACT_METHODS,
    EXTRACT_TARGETS,
    FULL_DELTA_PATTERNS,
    ExtractMethod,
    SynthesizerLoRA,
    Targets,
    adapter_layout,
    build_voice_model,
)

log = logging.getLogger(__name__)

LOW_RANK_KINDS = (nn.Conv1d, nn.ConvTranspose1d, nn.Linear)
WORST_LAYERS = 8  # per-layer rows an adapter keeps of its extraction report: the worst fits


# --- layout: which parameters become LoRA pairs, which full deltas --------------------------------------------------
def _meta_model(cfg: SynthConfig) -> RVCSynthesizer:
    with torch.device("meta"):  # shapes and names only
        return build_synthesizer(cfg, with_posterior=False)


def extraction_layout(cfg: SynthConfig, targets: Targets = DEFAULT_EXTRACT_TARGETS) -> tuple[list[str], list[str]]:
    """(LoRA layer names, full-delta parameter names), in model order, that extraction can produce for `cfg`."""
    if targets not in EXTRACT_TARGETS:
        raise ConfigError(f"targets must be 'dec' or 'all', got {targets!r}")
    layers, full = _layout(_meta_model(cfg), targets)
    return list(layers), full


def _layout(model: RVCSynthesizer, targets: Targets) -> tuple[dict[str, str], list[str]]:
    """({LoRA layer name: its kind}, full-delta parameter names) for a (meta) model, in model order."""
    patterns = EXTRACT_TARGETS[targets]
    layers = {n: type(m).__name__ for n, m in model.named_modules()
              if isinstance(m, LOW_RANK_KINDS) and any(name_matches(p, n) for p in patterns)}
    params = folded_names(model.state_dict())
    full = [n for n in params if any(name_matches(p, n) for p in FULL_DELTA_PATTERNS)
            and (targets == "all" or n.startswith("dec."))]
    assert not {f"{n}.weight" for n in layers} & set(full), "a weight is both a LoRA layer and a full delta"
    return layers, full


# --- reading and checking the two models -----------------------------------------------------------------------------
def folded_weights(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """fp32 parameters with weight norm folded: `W = g * (v / ||v||)` (torch's order), `enc_q.*` left out."""
    out: dict[str, Tensor] = {}
    for key in folded_names(weights):
        if f"{key}_v" in weights:
            v, g = weights[f"{key}_v"].float(), weights[f"{key}_g"].float()
            norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
            if not bool((norm > 0).all()):
                raise AdapterError(f"{key}: a slice of weight_v is all zero, so its weight norm is undefined")
            out[key] = v * (g / norm)
        else:
            out[key] = weights[key].float()
    return out


def _raw(model: str | os.PathLike[str] | RawCheckpoint) -> RawCheckpoint:
    return model if isinstance(model, RawCheckpoint) else read_rvc_checkpoint(model)


def check_voice_matches_base(base: RawCheckpoint, voice: RawCheckpoint) -> list[str]:
    """Raise `AdapterMismatchError` naming the first difference (version, f0, a config item by name, a key)
    unless `voice` can be an adapter over `base`; returns notes on what was accepted with care. Equal
    configs imply equal shapes: `read_rvc_checkpoint` checks every tensor against its config."""
    where = f"{voice.path} vs base {base.path}"
    b, v = base.config, voice.config
    for name in ("version", "f0"):
        if getattr(v, name) != getattr(b, name):
            raise AdapterMismatchError(f"{where}: {name} is {getattr(v, name)!r}, the base's is {getattr(b, name)!r}")
    for f in fields(SynthConfig):
        if f.name != "spk_embed_dim" and getattr(v, f.name) != getattr(b, f.name):
            raise AdapterMismatchError(f"{where}: config.{f.name} is {getattr(v, f.name)!r}, the base's is "
                                       f"{getattr(b, f.name)!r} (not fine-tuned from this base)")
    keys_b, keys_v = (set(folded_names(r.weights)) for r in (base, voice))
    if keys_b != keys_v:
        key = min(keys_b ^ keys_v)
        raise AdapterMismatchError(f"{where}: key {key!r} is only in the {'base' if key in keys_b else 'voice'}")
    notes = []
    if v.spk_embed_dim > b.spk_embed_dim:
        raise AdapterMismatchError(f"{where}: the voice has {v.spk_embed_dim} speakers (emb_g rows), the base "
                                   f"{b.spk_embed_dim}: speakers past {b.spk_embed_dim - 1} cannot be expressed")
    if v.spk_embed_dim < b.spk_embed_dim:
        notes.append(f"voice has {v.spk_embed_dim} speakers, base {b.spk_embed_dim}: speaker ids "
                     f">= {v.spk_embed_dim} keep the base's embedding")
    return notes


# --- factorisation ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerReport:
    """One low-rank layer: `rel_error` = ||dW - BA|| / ||dW|| with B, A as stored (after the dtype cast);
    `energy_kept` = share of ||dW||^2 in the kept singular values; `delta_share` = ||dW|| / ||W_base||."""

    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    rel_error: float
    energy_kept: float
    delta_share: float


def factorize(delta: Tensor, rank: int | None, energy: float | None) -> tuple[Tensor, Tensor, float]:
    """`delta` `[rows, cols]` -> (B `[rows, k]`, A `[k, cols]`, energy share kept), k as in the module doc.

    The SVD comes from the eigendecomposition of the fp64 Gram matrix of the shorter side (`M M^T` or
    `M^T M`, at most 1152 x 1152 in RVC): the whole spectrum (for `energy`), errors within 1e-11 of the
    optimal rank-k error, and 2.3x faster than `torch.linalg.svd` on RVC's wide conv matrices (152 layers of a
    v2 40k model: 2.5 s vs 5.8 s on one thread). `svd_lowrank` would be faster still but approximate."""
    x = delta.double()
    wide = x.shape[0] <= x.shape[1]
    power, vec = torch.linalg.eigh(x @ x.T if wide else x.T @ x)  # ascending: sigma^2 and U (wide) or V
    power, vec = power.flip(0).clamp_min(0), vec.flip(1)
    s = power.sqrt()
    tol = float(s[0]) * max(x.shape) * torch.finfo(torch.float32).eps  # numerical rank, as matrix_rank's default
    numerical = max(int((s > tol).sum()), 1)
    kept = torch.cumsum(power, 0) / power.sum()
    k = numerical if rank is None else min(rank, numerical)
    if energy is not None:  # smallest k whose share reaches `energy`
        k = min(k, int((kept < energy).sum()) + 1)
    root = s[:k].sqrt()  # sqrt(S) on each side
    if wide:
        u = vec[:, :k]
        b, a = u * root, (u.T @ x) / root[:, None]  # U sqrt(S), sqrt(S)^-1 U^T M = sqrt(S) V^T
    else:
        v = vec[:, :k]
        b, a = (x @ v) / root, root[:, None] * v.T  # M V sqrt(S)^-1 = U sqrt(S), sqrt(S) V^T
    return b.float(), a.float(), float(kept[k - 1])


@contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """`torch.set_num_threads(n)` for the duration (process-wide), restored after; None: leave it alone."""
    threads = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pad(b: Tensor, a: Tensor, r: int) -> tuple[Tensor, Tensor]:
    k = a.shape[0]
    return torch.nn.functional.pad(b, (0, r - k)), torch.nn.functional.pad(a, (0, 0, 0, r - k))


# --- report ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtractionReport:
    """What extraction kept and how close base + adapter comes to the voice.

    `snr_db`: waveform SNR of base + adapter against the full voice on a fixed input (None: not evaluated);
    `base_snr_db`: the same for the plain base (how far the voice is from its base). `adapter_bytes` is the
    adapter file's exact size, `voice_bytes` the `.pth`'s (its fp16 payload when the file is gone).
    The adapter file keeps `summary()` in its metadata.
    """

    base: str
    voice: str
    base_fingerprint: str
    targets: str
    rank: int
    requested_rank: int | None
    energy: float | None
    dtype: str
    layers: tuple[LayerReport, ...]
    full_delta: tuple[str, ...]
    full_delta_values: int
    skipped: tuple[str, ...]
    adapter_bytes: int
    voice_bytes: int
    seconds: float
    snr_db: float | None = None
    base_snr_db: float | None = None
    eval_frames: int = 0
    eval_seed: int = 0
    eval_seconds: float = 0.0
    notes: tuple[str, ...] = field(default=())

    @property
    def size_ratio(self) -> float:
        """`.pth` bytes per adapter byte (15 means the adapter is 1/15 of the voice file)."""
        return self.voice_bytes / max(self.adapter_bytes, 1)

    @property
    def max_rel_error(self) -> float:
        return max((x.rel_error for x in self.layers), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, every field (`summary()` is what travels with the adapter)."""
        out = dataclasses.asdict(self)
        out.update(size_ratio=self.size_ratio, max_rel_error=self.max_rel_error)
        return out

    def summary(self) -> dict[str, Any]:
        """What travels with the adapter (its file's `extraction` metadata; the service's record of it): the fit
        in brief, with the `WORST_LAYERS` worst layers by rel.err rather than all of them. Not this run's paths,
        timings or the file's own size: the same extraction writes the same bytes."""
        errors = [x.rel_error for x in self.layers]
        worst = sorted(self.layers, key=lambda x: (-x.rel_error, x.name))[:WORST_LAYERS]
        return {"base_fingerprint": self.base_fingerprint, "targets": self.targets, "rank": self.rank,
                "requested_rank": self.requested_rank, "energy": self.energy, "dtype": self.dtype,
                "layer_count": len(self.layers), "max_rel_error": self.max_rel_error,
                "mean_rel_error": sum(errors) / len(errors) if errors else 0.0,
                "worst_layers": [dataclasses.asdict(x) for x in worst], "full_delta_count": len(self.full_delta),
                "full_delta_values": self.full_delta_values, "skipped_count": len(self.skipped),
                "voice_bytes": self.voice_bytes, "snr_db": self.snr_db, "base_snr_db": self.base_snr_db,
                "eval_frames": self.eval_frames, "eval_seed": self.eval_seed, "notes": list(self.notes)}

    def format(self, per_layer: bool = True) -> str:
        """A printable table: one row per low-rank layer, then totals."""
        rank = f"rank {self.requested_rank}" if self.requested_rank is not None else "no rank cap"
        energy = f", energy {self.energy:g}" if self.energy is not None else ""
        lines = [f"extract {self.voice} over base {self.base} ({self.base_fingerprint[:16]}): targets={self.targets}, "
                 f"{rank}{energy} -> r={self.rank}, {self.dtype}"]
        if per_layer:
            width = max((len(x.name) for x in self.layers), default=5)
            lines.append(f"{'layer':<{width}}  {'kind':<15}  {'shape':>13}  {'rank':>4}  {'rel.err':>8}  "
                         f"{'energy':>8}  {'|dW|/|W|':>8}")
            lines += [f"{x.name:<{width}}  {x.kind:<15}  {'x'.join(map(str, x.shape)):>13}  {x.rank:>4}  "
                      f"{x.rel_error:>8.4f}  {100 * x.energy_kept:>7.3f}%  {x.delta_share:>8.4f}" for x in self.layers]
        lines.append(f"low-rank layers: {len(self.layers)}, worst rel.err {self.max_rel_error:.4f}; full deltas: "
                     f"{len(self.full_delta)} tensors, {self.full_delta_values:,} values; skipped (outside targets): "
                     f"{len(self.skipped)}")
        lines.append(f"adapter {self.adapter_bytes / 1e6:.3f} MB vs voice .pth {self.voice_bytes / 1e6:.3f} MB: "
                     f"1/{self.size_ratio:.1f}")
        if self.snr_db is not None:
            lines.append(f"waveform SNR, base+adapter vs voice: {self.snr_db:.1f} dB (base alone: "
                         f"{self.base_snr_db:.1f} dB), {self.eval_frames} frames, seed {self.eval_seed}")
        lines.append(f"time: extraction {self.seconds:.2f} s, evaluation {self.eval_seconds:.2f} s")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class ExtractionResult:
    """The adapter (tensors already in the storage dtype, exactly what the file holds) and its report."""

    adapter: Adapter
    report: ExtractionReport

    def to_bytes(self) -> bytes:
        """The adapter file's bytes (for a store that writes files itself): exactly what `save` writes."""
        dtype = next(iter(self.adapter.tensors.values())).dtype
        return adapter_file_bytes(self.adapter.tensors, self.adapter.info, dtype)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the adapter file atomically (temp file + rename), validated as `save_adapter_tensors` does."""
        dtype = next(iter(self.adapter.tensors.values())).dtype  # one dtype for all: extract_adapter's `dtype`
        return save_adapter_tensors(path, self.adapter.tensors, self.adapter.info, dtype)


# --- extraction ------------------------------------------------------------------------------------------------------
def extract_adapter(base: str | os.PathLike[str] | RawCheckpoint, voice: str | os.PathLike[str] | RawCheckpoint, *,
                    rank: int | None = DEFAULT_EXTRACT_RANK, energy: float | None = None,
                    targets: Targets = DEFAULT_EXTRACT_TARGETS,
                    name: str | None = None, dtype: torch.dtype = torch.float16, progress: bool = True,
                    evaluate: bool = True, eval_frames: int = 32, eval_seed: int = 0,
                    threads: int | None = 1, method: ExtractMethod = DEFAULT_EXTRACT_METHOD,
                    calibration: Sequence[Mapping[str, Tensor]] | None = None) -> ExtractionResult:
    """The adapter that turns `base` into (approximately) `voice`, and its report (module doc for the method).

    base, voice: `.pth` paths or `read_rvc_checkpoint` results (a service keeps its base's in memory).
    rank: per-layer rank (with `energy`: the cap); energy: share of each delta's energy to keep, in (0, 1].
    evaluate: run both models on a fixed input (`eval_frames` frames, `eval_seed`) for the report's SNR.
    method: "svd" factors each delta alone; "data-aware" (the default) factors it for the inputs the layer sees
    when the voice runs on `calibration` (`rvc_lora.calibration`; `LayerReport.energy_kept` is then the share
    of output error energy). calibration: synthesizer inputs (`model.infer` keyword arguments, e.g.
    `calibration.prepared_inputs` of the voice's speech); None: `synthetic_inputs` (no speech needed).
    threads: torch intra-op threads while this runs (process-wide, restored after; None: unchanged). The
    work is memory-bound element-wise ops, `eigh` of at most 1152 x 1152 and a short CPU inference: on a
    2-core CPU shared with other processes one thread was 5-30x faster than two (every OpenMP region waits
    for a descheduled thread), so 1 is the default.
    Raises `AdapterMismatchError` when the voice is not of the base's architecture, `AdapterError` when it
    has the base's weights exactly, `CheckpointError` for unreadable files, `ConfigError` for bad arguments.
    """
    if rank is None and energy is None:
        raise ConfigError("give rank, energy or both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be an int >= 1, got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise ConfigError(f"energy must be in (0, 1], got {energy!r}")
    if not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating point type, got {dtype}")
    if targets not in EXTRACT_TARGETS:
        raise ConfigError(f"targets must be 'dec' or 'all', got {targets!r}")
    if method not in EXTRACT_METHODS:
        raise ConfigError(f"method must be one of {', '.join(EXTRACT_METHODS)}, got {method!r}")
    if method == "svd" and calibration is not None:
        raise ConfigError("calibration is for method='data-aware'; method='svd' uses no inputs")
    if calibration is not None and not calibration:
        raise ConfigError("calibration: no clips given")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be an int >= 1 or None, got {threads!r}")
    say: Callable[..., None] = log.info if progress else log.debug
    with _intra_op_threads(threads):
        return _extract(base, voice, rank, energy, targets, name, dtype, say, evaluate, eval_frames, eval_seed,
                        method, calibration)


def _extract(base: str | os.PathLike[str] | RawCheckpoint, voice: str | os.PathLike[str] | RawCheckpoint,
             rank: int | None, energy: float | None, targets: Targets, name: str | None, dtype: torch.dtype,
             say: Callable[..., None], evaluate: bool, eval_frames: int, eval_seed: int,
             method: ExtractMethod = "svd", calibration: Sequence[Mapping[str, Tensor]] | None = None
             ) -> ExtractionResult:
    start = time.perf_counter()
    base_raw, voice_raw = _raw(base), _raw(voice)
    notes = check_voice_matches_base(base_raw, voice_raw)
    layers, full = _layout(_meta_model(base_raw.config), targets)
    w_base, w_voice = folded_weights(base_raw.weights), folded_weights(voice_raw.weights)
    say("extract: %s over %s, %d layers, %d small tensors", voice_raw.path, base_raw.path, len(layers), len(full))
    tensors = {FULL_DELTA_PREFIX + k: _cast(FULL_DELTA_PREFIX + k, d, dtype) for k in full
               if bool((d := _delta(w_voice[k], w_base[k])).any())}
    covs: dict[str, Tensor] = {}
    if method == "data-aware":
        clips = synthetic_inputs(base_raw.config) if calibration is None else calibration
        t = time.perf_counter()
        covs = collect_input_covariances(build_from_raw(_without_posterior(voice_raw)), layers, clips)
        frames = sum(int(c["phone"].shape[1]) for c in clips)
        notes.append(f"data-aware: each layer fitted to its outputs on {frames / FRAMES_PER_S:.1f} s of "
                     + ("synthetic input" if calibration is None else "calibration speech"))
        say("extract: input covariances of %d layers in %.1f s", len(covs), time.perf_counter() - t)
    pairs, reports = _factor_layers(layers, w_base, w_voice, rank, energy, dtype, say, covs)
    if not pairs and not tensors:
        raise AdapterError(f"{voice_raw.path}: has exactly the weights of base {base_raw.path} within targets="
                           f"{targets!r}: nothing to extract")
    r = max((a.shape[0] for _, a in pairs.values()), default=1)
    for layer, (b, a) in pairs.items():
        tensors[f"{layer}.lora_B"], tensors[f"{layer}.lora_A"] = _pad(b, a, r)
    cfg = base_raw.config
    full_names = tuple(k for k in full if FULL_DELTA_PREFIX + k in tensors)
    info = AdapterInfo(name=name or voice_raw.path.stem, r=r, lora_alpha=float(r), target_modules=tuple(pairs),
                       base_fingerprint=base_raw.fingerprint, sr=cfg.sr, version=cfg.version, f0=cfg.f0,
                       full_delta=full_names)
    adapter = Adapter(info, tensors)
    covered = {f"{n}.weight" for n in layers} | set(full)
    skipped = tuple(k for k in w_base if k not in covered and not torch.equal(w_base[k], w_voice[k]))
    report = ExtractionReport(
        base=str(base_raw.path), voice=str(voice_raw.path), base_fingerprint=base_raw.fingerprint,
        targets=targets, rank=r, requested_rank=rank, energy=energy, dtype=str(dtype).removeprefix("torch."),
        layers=tuple(reports), full_delta=full_names,
        full_delta_values=sum(tensors[FULL_DELTA_PREFIX + k].numel() for k in full_names), skipped=skipped,
        adapter_bytes=0, voice_bytes=_file_bytes(voice_raw), seconds=time.perf_counter() - start, notes=tuple(notes))
    say("extract: r=%d, %d layers, %d full deltas in %.2f s", r, len(pairs), len(full_names), report.seconds)
    if evaluate:
        t = time.perf_counter()
        snr, base_snr = evaluate_adapter(base_raw, voice_raw, adapter, frames=eval_frames, seed=eval_seed)
        report = dataclasses.replace(report, snr_db=snr, base_snr_db=base_snr, eval_frames=eval_frames,
                                     eval_seed=eval_seed, eval_seconds=time.perf_counter() - t)
        say("extract: SNR %.1f dB (base alone %.1f dB)", snr, base_snr)
    # the report travels in the file (sorted keys: the same extraction, the same bytes)
    adapter = Adapter(dataclasses.replace(info, extraction=json.dumps(report.summary(), sort_keys=True)), tensors)
    size = len(adapter_file_bytes(adapter.tensors, adapter.info, dtype))
    return ExtractionResult(adapter, dataclasses.replace(report, adapter_bytes=size))


def _factor_layers(layers: Mapping[str, str], w_base: Mapping[str, Tensor], w_voice: Mapping[str, Tensor],
                   rank: int | None, energy: float | None, dtype: torch.dtype, say: Callable[..., None],
                   covs: Mapping[str, Tensor] | None = None
                   ) -> tuple[dict[str, tuple[Tensor, Tensor]], list[LayerReport]]:
    """{layer: (B, A) in `dtype`, unpadded} and one report row per layer whose delta is not zero. Layers with an
    input covariance in `covs` are factored for their outputs (`weighted_factorize`), the rest by plain SVD."""
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    reports: list[LayerReport] = []
    for i, (layer, kind) in enumerate(layers.items()):
        w = w_base[f"{layer}.weight"]
        delta = (w_voice[f"{layer}.weight"] - w).reshape(w.shape[0], -1)  # [rows, cols]: lora_B @ lora_A layout
        if bool(delta.any()):
            cov = (covs or {}).get(layer)
            fit = None if cov is None else weighted_factorize(delta, cov, rank, energy,
                                                                inputs_on_rows=kind == "ConvTranspose1d")
            b, a, kept = fit if fit is not None else factorize(delta, rank, energy)
            b, a = _cast(f"{layer}.lora_B", b, dtype), _cast(f"{layer}.lora_A", a, dtype)
            norm = float(torch.linalg.vector_norm(delta))
            err = float(torch.linalg.vector_norm(delta - b.float() @ a.float())) / norm  # as stored
            share = norm / max(float(torch.linalg.vector_norm(w)), 1e-30)
            reports.append(LayerReport(layer, kind, tuple(w.shape), a.shape[0], err, kept, share))
            pairs[layer] = (b, a)
        if (i + 1) % 25 == 0:
            say("extract: %d/%d layers factored", i + 1, len(layers))
    return pairs, reports


def _delta(voice: Tensor, base: Tensor) -> Tensor:
    if voice.shape == base.shape:
        return voice - base
    # emb_g with fewer speaker rows than the base (check_voice_matches_base refused more): zero delta past them
    delta = torch.zeros_like(base)
    delta[: voice.shape[0]] = voice - base[: voice.shape[0]]
    return delta


def _cast(key: str, t: Tensor, dtype: torch.dtype) -> Tensor:
    out = t.to(dtype).contiguous()
    if not bool(torch.isfinite(out).all()):
        raise AdapterError(f"{key}: values overflow {dtype}; extract with dtype=torch.float32")
    return out


def _file_bytes(raw: RawCheckpoint) -> int:
    if raw.path.is_file():
        return raw.path.stat().st_size
    return sum(2 * t.numel() for k, t in raw.weights.items() if not k.startswith(POSTERIOR_PREFIX))


# --- evaluation ------------------------------------------------------------------------------------------------------
def fixed_inputs(cfg: SynthConfig, frames: int = 32, seed: int = 0) -> dict[str, Tensor]:
    """A deterministic input: random content features, a gliding f0 contour with an unvoiced stretch, sid 0."""
    gen = torch.Generator().manual_seed(seed)
    t = np.arange(frames) / FRAMES_PER_S
    f0 = 150.0 * 2 ** (0.5 * np.sin(2 * np.pi * 1.5 * t))
    f0[frames // 3 : frames // 3 + max(frames // 10, 1)] = 0.0
    inputs = {"phone": torch.randn(1, frames, cfg.content_dim, generator=gen),
              "phone_lengths": torch.tensor([frames]), "sid": torch.tensor([0])}
    if cfg.f0:
        inputs["pitch"] = torch.from_numpy(f0_to_coarse(f0))[None]
        inputs["nsff0"] = torch.from_numpy(f0.astype(np.float32))[None]
    return inputs


def synthetic_inputs(cfg: SynthConfig, seconds: float = CALIBRATION_SECONDS) -> list[dict[str, Tensor]]:
    """Calibration clips that need no speech: `fixed_inputs` (random content, gliding f0), 2 s each, `seconds`
    in all (at least one clip)."""
    clips = max(1, round(seconds / 2))
    return [fixed_inputs(cfg, 200, seed) for seed in range(clips)]


def _audio(model: RVCSynthesizer | SynthesizerLoRA, inputs: Mapping[str, Tensor], seed: int) -> Tensor:
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the caller's RNG state is left alone
        torch.manual_seed(seed)
        return model.infer(**inputs)[0].flatten()  # type: ignore[operator]


def snr_db(reference: Tensor, estimate: Tensor) -> float:
    """`10 log10(sum ref^2 / sum (ref - est)^2)`, at most 200 dB (identical signals)."""
    signal = float(reference.double().square().sum())
    noise = float((reference.double() - estimate.double()).square().sum())
    return 10 * math.log10(max(signal, 1e-30) / max(noise, signal * 1e-20, 1e-30))


def _without_posterior(raw: RawCheckpoint) -> RawCheckpoint:
    weights = {k: v for k, v in raw.weights.items() if not k.startswith(POSTERIOR_PREFIX)}
    return dataclasses.replace(raw, weights=weights)


def evaluate_adapter(base: RawCheckpoint, voice: RawCheckpoint, adapter: Adapter, *, frames: int = 32,
                     seed: int = 0) -> tuple[float, float]:
    """(SNR of base + adapter, SNR of the plain base) against the voice, in dB, CPU fp32, on `fixed_inputs`.

    The adapter goes through `SynthesizerLoRA.load_adapter`, as a server would load it."""
    inputs = fixed_inputs(base.config, frames, seed)
    reference = _audio(build_from_raw(_without_posterior(voice)), inputs, seed)
    model = build_voice_model(_without_posterior(base), adapter_layout(adapter.info))
    model.load_adapter(adapter)
    adapted = _audio(model, inputs, seed)
    model.reset_adapter()
    return snr_db(reference, adapted), snr_db(reference, _audio(model, inputs, seed))


def run_extract(base: str | os.PathLike[str], voice: str | os.PathLike[str], rank: int | None,
                out: str | os.PathLike[str], targets: Targets = DEFAULT_EXTRACT_TARGETS,
                energy: float | None = None, method: ExtractMethod = DEFAULT_EXTRACT_METHOD,
                calibrate: str | os.PathLike[str] | None = None) -> ExtractionReport:
    """What `rvc-lora extract` does: extract, write `out`, return the report (print it with `.format()`).
    `calibrate`: a folder `rvc-lora prepare` wrote from the voice's speech, for the data-aware method."""
    calibration = prepared_inputs(calibrate) if calibrate is not None else None
    result = extract_adapter(base, voice, rank=rank, energy=energy, targets=targets, name=Path(voice).stem,
                             method=method, calibration=calibration)
    result.save(out)
    return result.report


# --- synthetic voices (tests, benchmarks, demo assets) ---------------------------------------------------------------
def make_synthetic_voice(base_model: RVCSynthesizer, rank: int = 8, delta_share: float = 0.05,
                         noise_share: float = 0.01, seed: int = 0) -> RVCSynthesizer:
    """A stand-in for a voice fine-tuned from `base_model` (which is not changed).

    Every parameter of 2+ dims (folded weight) gets `L + N`: L of rank `rank` (or less where the shape
    allows less) with `||L|| = delta_share * ||W||`, N Gaussian with `||N|| = noise_share * ||L||`; 1-d
    parameters (biases, gamma, beta) get a Gaussian delta of `delta_share` of their norm. Weight-normed
    layers keep weight norm: `v = W'`, `g = ||W'||`. `enc_q` is left alone; SineGen variant is "B".
    """
    gen = torch.Generator().manual_seed(seed)
    state = base_model.state_dict()
    voice = build_synthesizer(base_model.cfg, with_posterior=base_model.enc_q is not None)
    if not any(k.endswith(".weight_g") for k in state):
        voice.remove_weight_norm()
    updated = dict(state)
    for key, w in folded_weights(state).items():
        flat = w.reshape(w.shape[0], -1)
        if w.dim() >= 2:
            k = min(rank, *flat.shape)
            low = torch.randn(flat.shape[0], k, generator=gen) @ torch.randn(k, flat.shape[1], generator=gen)
            low = _scaled(low, delta_share * float(torch.linalg.vector_norm(w)))
            delta = low + _scaled(torch.randn(flat.shape, generator=gen), noise_share * float(low.norm()))
        else:
            delta = _scaled(torch.randn(flat.shape, generator=gen), delta_share * float(torch.linalg.vector_norm(w)))
        new = w + delta.view_as(w)
        if f"{key}_v" in state:
            updated[f"{key}_v"] = new
            updated[f"{key}_g"] = torch.linalg.vector_norm(new, dim=tuple(range(1, new.dim())), keepdim=True)
        else:
            updated[key] = new
    voice.load_state_dict(updated, strict=True)
    return voice.eval()


def _scaled(t: Tensor, norm: float) -> Tensor:
    current = float(torch.linalg.vector_norm(t))
    return t * (norm / current) if current > 0 else t

