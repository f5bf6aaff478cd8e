"""Pretrained bases for training (RVC's `f0G40k.pth` style) and the per-variant training numbers.

RVC's pretrained generators are `{"model": state_dict}` without a `config` list (spec §4.6), so the
config is recognised from the tensor shapes against the six shipped variants (spec §1.1 / §4.4). A
file that does carry a `config` (rvc-lora's own pretrained-style bases, RVC voice files that kept
`enc_q`) is read from it; an explicit `SynthConfig` overrides both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from rvc_lora.checkpoint import (
    POSTERIOR_PREFIX,
    base_fingerprint,
    check_weights,
    rename_parametrizations,
    torch_load_checked,
    unfuse_weight_norm,
)
from rvc_lora.config import SynthConfig, parse_sr
from rvc_lora.errors import CheckpointError, ConfigError
from rvc_lora.frames import FRAMES_PER_S
from rvc_lora.models.synthesizer import RVCSynthesizer, build_synthesizer

LEGACY_SEGMENT = 32  # what RVC's savers write as config[1] (spec §1.1); training uses `TrainParams.segment_frames`


@dataclass(frozen=True)
class Variant:
    """One of RVC's shipped configs (spec §1.1 / §4.4): decoder geometry and training numbers."""

    spec_channels: int
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    n_mels: int
    segment_samples: int  # `train.segment_size` of the json


# (version, sr) -> variant. v2 40k has no json upstream: the WebUI trains it with v1/40k.json (spec §1.1).
VARIANTS: dict[tuple[str, int], Variant] = {
    ("v1", 32000): Variant(513, (10, 4, 2, 2, 2), (16, 16, 4, 4, 4), 80, 12800),
    ("v1", 40000): Variant(1025, (10, 10, 2, 2), (16, 16, 4, 4), 125, 12800),
    ("v1", 48000): Variant(1025, (10, 6, 2, 2, 2), (16, 16, 4, 4, 4), 128, 11520),
    ("v2", 32000): Variant(513, (10, 8, 2, 2), (20, 16, 4, 4), 80, 12800),
    ("v2", 40000): Variant(1025, (10, 10, 2, 2), (16, 16, 4, 4), 125, 12800),
    ("v2", 48000): Variant(1025, (12, 10, 2, 2), (24, 20, 4, 4), 128, 17280),
}
DEFAULT_N_MELS = 80  # for configs outside the table, unless the caller says otherwise


@dataclass(frozen=True)
class TrainParams:
    """Spectrogram, mel and crop numbers of one model (spec §4.4): win = n_fft, hop = samples per frame."""

    sr: int
    n_fft: int
    hop: int
    n_mels: int
    segment_frames: int
    fmin: float = 0.0
    fmax: float | None = None  # None: sr / 2

    def __post_init__(self) -> None:
        if self.n_fft < self.hop:
            raise ConfigError(f"n_fft {self.n_fft} (spec_channels {self.spec_channels}) is below the hop {self.hop}: "
                              "RVC's spectrogram pads by (n_fft - hop) / 2, which must not be negative")
        if self.segment_frames < 1 or self.n_mels < 1:
            raise ConfigError(f"segment_frames and n_mels must be >= 1, got {self.segment_frames}, {self.n_mels}")

    @property
    def win(self) -> int:
        return self.n_fft

    @property
    def spec_channels(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def segment_samples(self) -> int:
        return self.segment_frames * self.hop

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def train_params(cfg: SynthConfig, *, n_mels: int | None = None, segment_frames: int | None = None) -> TrainParams:
    """The training numbers for `cfg`: RVC's table for the six shipped variants, else derived from the config
    (n_fft from `spec_channels`, hop = `upp`, crop = `cfg.segment_size`, `DEFAULT_N_MELS` mels)."""
    if cfg.upp * FRAMES_PER_S != cfg.sr:
        raise ConfigError(f"config: {cfg.upp} samples per frame at {cfg.sr} Hz is not RVC's 10 ms frame grid "
                          "(content and f0 frames are 10 ms)")
    variant = VARIANTS.get((cfg.version, cfg.sr))
    known = variant is not None and variant.spec_channels == cfg.spec_channels
    default_mels = variant.n_mels if variant is not None and known else DEFAULT_N_MELS
    default_seg = variant.segment_samples // cfg.upp if variant is not None and known else cfg.segment_size
    return TrainParams(sr=cfg.sr, n_fft=2 * (cfg.spec_channels - 1), hop=cfg.upp, n_mels=n_mels or default_mels,
                       segment_frames=segment_frames or default_seg)


def _variant_config(version: str, sr: int, variant: Variant, f0: bool, speakers: int) -> SynthConfig:
    return SynthConfig.from_list(
        [variant.spec_channels, LEGACY_SEGMENT, 192, 192, 768, 2, 6, 3, 0, "1", [3, 7, 11], [[1, 3, 5]] * 3,
         list(variant.upsample_rates), 512, list(variant.upsample_kernel_sizes), speakers, 256, sr],
        version=version, f0=f0)


def _shape_mismatch(weights: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str | None:
    for key, t in expected.items():
        if key not in weights:
            if not key.startswith(POSTERIOR_PREFIX):
                return f"missing {key}"
        elif tuple(weights[key].shape) != tuple(t.shape):
            return f"{key} {tuple(weights[key].shape)} != {tuple(t.shape)}"
    extra = next((k for k in weights if k not in expected), None)
    return None if extra is None else f"unexpected {extra}"


def _quick_mismatch(weights: Mapping[str, Tensor], version: str, variant: Variant) -> str | None:
    """A cheap look at the tensors that tell variants apart (content width, spec bins, upsample kernels)."""
    phone = weights.get("enc_p.emb_phone.weight")
    if phone is None or phone.shape[-1] != (256 if version == "v1" else 768):
        return "content width differs"
    pre = weights.get("enc_q.pre.weight")
    if pre is not None and pre.shape[1] != variant.spec_channels:
        return f"enc_q.pre takes {pre.shape[1]} bins, not {variant.spec_channels}"
    for i, k in enumerate(variant.upsample_kernel_sizes):
        up = weights.get(f"dec.ups.{i}.weight_v", weights.get(f"dec.ups.{i}.weight"))
        if up is None or up.shape[-1] != k:
            return f"dec.ups.{i} kernel differs"
    if f"dec.ups.{len(variant.upsample_kernel_sizes)}.weight_v" in weights:
        return "more upsample stages"
    return None


def infer_base_config(weights: Mapping[str, Tensor]) -> SynthConfig:
    """The shipped RVC variant whose every tensor shape equals `weights`' (names as RVC stores them,
    `weight_g`/`weight_v` or already fused). Raises `ConfigError` when none or several fit."""
    weights = dict(rename_parametrizations(weights))
    emb_g = weights.get("emb_g.weight")
    if emb_g is None or emb_g.dim() != 2:
        raise ConfigError("no 'emb_g.weight' [speakers, 256]: not an RVC synthesizer state dict")
    f0 = "enc_p.emb_pitch.weight" in weights
    fits: list[SynthConfig] = []
    reasons: list[str] = []
    for (version, sr), variant in VARIANTS.items():
        if (problem := _quick_mismatch(weights, version, variant)) is not None:
            reasons.append(f"{version} {sr // 1000}k: {problem}")
            continue
        cfg = _variant_config(version, sr, variant, f0, int(emb_g.shape[0]))
        with torch.device("meta"):
            expected = build_synthesizer(cfg).state_dict()
        fused = dict(weights)
        unfuse_weight_norm(fused, expected)
        problem = _shape_mismatch(fused, expected)
        if problem is None:
            fits.append(cfg)
        else:
            reasons.append(f"{version} {sr // 1000}k: {problem}")
    if len(fits) != 1:
        found = "several variants" if fits else "no variant"
        raise ConfigError(f"the tensor shapes fit {found} of RVC's pretrained bases (v1/v2 x 32k/40k/48k): "
                          f"{'; '.join(reasons) or [c.class_name for c in fits]}; pass the config explicitly")
    return fits[0]


@dataclass
class PretrainedBase:
    """A base generator ready for training: the synthesizer (with `enc_q`, weight norm intact), its
    config and the fingerprint adapters are tied to (the same as the served file without `enc_q`)."""

    path: Path
    model: RVCSynthesizer
    config: SynthConfig
    fingerprint: str


def _config_from_file(path: Path, cpt: Mapping[str, object], weights: Mapping[str, Tensor]) -> SynthConfig:
    version, f0 = cpt.get("version", "v1"), cpt.get("f0", 1)
    if version not in ("v1", "v2") or f0 not in (0, 1):
        raise CheckpointError(f"{path}: version {version!r} / f0 {f0!r} invalid (expected 'v1'|'v2' and 0|1)")
    values = cpt["config"]
    if not isinstance(values, (list, tuple)) or len(values) != 18:
        raise CheckpointError(f"{path}: 'config' is not RVC's 18-item list")
    values = list(values)
    values[15] = int(weights["emb_g.weight"].shape[0])  # RVC's fix-up: speakers come from emb_g
    values[17] = parse_sr(values[17], field_name="config[17] (sr)")
    return SynthConfig.from_list(values, version=str(version), f0=bool(f0))


def _read(path: Path, config: SynthConfig | None) -> tuple[dict[str, Tensor], SynthConfig, set[str]]:
    """The file's weights (RVC's names, weight norm unfused), config and the keys the config implies, checked."""
    cpt = torch_load_checked(path, allow_unsafe_pickle=False)
    if not isinstance(cpt, Mapping):
        raise CheckpointError(f"{path}: expected a dict with 'model' (or 'weight'), got a {type(cpt).__name__}")
    weights = cpt.get("model", cpt.get("weight"))
    if not isinstance(weights, Mapping) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: no state dict under 'model' or 'weight'")
    weights = rename_parametrizations(weights)
    if "emb_g.weight" not in weights:
        raise CheckpointError(f"{path}: missing key 'emb_g.weight': not an RVC generator")
    try:
        if config is None:
            config = _config_from_file(path, cpt, weights) if "config" in cpt else infer_base_config(weights)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    with torch.device("meta"):
        expected = build_synthesizer(config).state_dict()
    weights = dict(weights)
    unfuse_weight_norm(weights, expected)
    check_weights(path, weights, expected)
    return weights, config, set(expected)


def read_base_config(path: str | os.PathLike[str], config: SynthConfig | None = None) -> SynthConfig:
    """Only the config of a base (file's `config`, else recognised from shapes), tensors checked, no model built."""
    return _read(Path(path), config)[1]


def load_pretrained_base(path: str | os.PathLike[str], config: SynthConfig | None = None) -> PretrainedBase:
    """Read a base generator for training: RVC's `{"model": sd}` (config recognised from shapes), or a file
    with `weight`/`model` and `config`; `config` overrides both. Loaded strictly, fp32, CPU, train mode.

    Raises `CheckpointError` naming the file when it is unreadable, misshaped, a training state, or lacks
    the posterior encoder `enc_q`, which training needs."""
    path = Path(path)
    weights, config, expected = _read(path, config)
    if not any(k.startswith(POSTERIOR_PREFIX) for k in weights):
        raise CheckpointError(
            f"{path}: has no posterior encoder (enc_q.*), which training needs: voice files made for inference "
            "drop it. Train from a pretrained base such as RVC's f0G40k.pth / pretrained_v2/f0G40k.pth, or the "
            "'pretrained' file of `rvc-lora demo-assets`")
    if missing := sorted(k for k in expected if k.startswith(POSTERIOR_PREFIX) and k not in weights):
        raise CheckpointError(f"{path}: enc_q is incomplete: missing {missing[0]!r} ({len(missing)} in all)")
    model = build_synthesizer(config)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return PretrainedBase(path, model, config, base_fingerprint(weights))
