"""Deterministic demo assets: a random-weight base model in RVC's real format, a content encoder, adapters,
a full voice model, an index and a test input, so every command runs end to end without downloads.

The weights are random: the output is not a real voice. Everything is drawn from numpy's PCG64 generator
with fixed seeds, so every machine writes the same bytes and adapters made for one copy fit every copy.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from numpy.typing import NDArray
from torch import nn

from rvc_lora.config import SynthConfig
from rvc_lora.lora import LoRAConfig
from rvc_lora.models.synthesizer import RVCSynthesizer, build_synthesizer
from rvc_lora.voice import save_adapter

log = logging.getLogger(__name__)

DEMO_VERSION = 2  # bump when the assets change: a stale folder is then regenerated
V2_40K_CONFIG = [1025, 32, 192, 192, 768, 2, 6, 3, 0, "1", [3, 7, 11], [[1, 3, 5]] * 3, [10, 10, 2, 2], 512,
                 [16, 16, 4, 4], 109, 256, 40000]  # RVC's real v2 40k f0 configuration (spec §1.1)
DEMO_LORA = LoRAConfig(r=8, lora_alpha=8, target_modules=["ups", "resblocks"])
FILES = {"model": "demo-base-v2-40k.pth", "pretrained": "demo-pretrained-f0G40k.pth",
         "discriminator": "demo-pretrained-f0D40k.pth",
         "hubert": "demo-hubert_base.pt", "voice_model": "demo-voice-full.pth", "input": "demo-input.wav",
         "index": "demo-voice-a.index"}
ADAPTERS = {"demo-voice-a": ("demo-voice-a.safetensors", 101), "demo-voice-b": ("demo-voice-b.safetensors", 102)}


def speech_like(duration_s: float, sr: int = 16000, *, seed: int = 0, f0_hz: float = 140.0,
                gaps: bool = True) -> NDArray[np.float32]:
    """A voiced-sounding test signal: harmonics of a gliding f0 (vibrato + slow contour), a formant-like
    spectral tilt, syllable-rate amplitude envelope, short silences and a little breath noise.

    Deterministic for a given seed; peak about 0.5.
    """
    rng = np.random.default_rng(seed)
    n = int(round(duration_s * sr))
    t = np.arange(n) / sr
    contour = f0_hz * (1 + 0.15 * np.sin(2 * np.pi * 0.4 * t + rng.uniform(0, 6)) + 0.02 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(contour) / sr
    voice = np.zeros(n)
    for k in range(1, 16):
        if k * f0_hz * 1.2 > sr / 2:
            break
        voice += np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k**1.2
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, 6)) ** 2
    if gaps:  # a pause of ~0.25 s every ~1.5 s: unvoiced frames and quiet cut points
        period, gap = int(1.5 * sr), int(0.25 * sr)
        for start in range(period - gap, n, period):
            envelope[start : start + gap] = 0.0
    signal = voice * envelope + 0.003 * rng.standard_normal(n)
    out: NDArray[np.float32] = (0.5 * signal / max(np.max(np.abs(signal)), 1e-9)).astype(np.float32)
    return out


def _fill_(module: nn.Module, seed: int) -> None:
    """Deterministic weights on every platform: numpy PCG64 normals scaled by fan-in (no torch RNG)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            shape = tuple(p.shape)
            if name.endswith("weight_g"):
                value = np.full(shape, 1.0) + 0.05 * rng.standard_normal(shape)
            elif name.endswith("gamma"):
                value = 1.0 + 0.05 * rng.standard_normal(shape)
            elif p.dim() >= 2:
                value = rng.standard_normal(shape) / np.sqrt(max(int(np.prod(shape[1:])), 1))
            else:
                value = 0.02 * rng.standard_normal(shape)
            p.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


def demo_base_model(seed: int = 1) -> RVCSynthesizer:
    """The demo base: RVC v2 40k with f0, full size, deterministic random weights, `enc_q` included."""
    model = build_synthesizer(SynthConfig.from_list(V2_40K_CONFIG, version="v2", f0=True))
    _fill_(model, seed)
    return model.eval()


def demo_discriminator(seed: int = 6) -> nn.Module:
    """RVC's v2 multi-period discriminator (full size) with deterministic random weights, as a starting
    point for `rvc-lora train --discriminator` (RVC ships pretrained ones as `f0D40k.pth`)."""
    from rvc_lora.train.discriminators import MultiPeriodDiscriminator

    disc = MultiPeriodDiscriminator("v2")
    _fill_(disc, seed)
    return disc


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_demo_assets(folder: str | os.PathLike[str], on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write every demo asset into `folder` and return the manifest (paths relative to `folder`); `on_step` is told
    what is being written (it takes about a minute on 2 CPU cores)."""
    from rvc_lora.checkpoint import rvc_state_dict, save_rvc_checkpoint
    from rvc_lora.pipeline.content import build_random_hubert, save_fairseq_hubert
    from rvc_lora.pipeline.index import build_index
    from rvc_lora.voice import SynthesizerLoRA

    note = on_step or (lambda _: None)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    note("base model")
    base = demo_base_model()
    save_rvc_checkpoint(out / FILES["model"], base, info="rvc-lora demo base (random weights, not a real voice)")
    note("pretrained generator and discriminator")
    _atomic_torch_save({"model": rvc_state_dict(base, with_posterior=True)}, out / FILES["pretrained"])
    _atomic_torch_save({"model": rvc_state_dict(demo_discriminator())}, out / FILES["discriminator"])
    note("content encoder")
    hubert = build_random_hubert(None, seed=2).to(torch.float16)
    save_fairseq_hubert(hubert, out / FILES["hubert"])

    note("full voice model")
    voice = demo_base_model()
    with torch.no_grad():  # a "fine-tuned" voice: the base plus small deltas, as RVC voices are
        rng = np.random.default_rng(3)
        for p in voice.parameters():
            p.add_(torch.from_numpy((0.02 * rng.standard_normal(tuple(p.shape))).astype(np.float32)) * p.abs().mean())
    save_rvc_checkpoint(out / FILES["voice_model"], voice, info="rvc-lora demo voice (random weights)")

    note("adapters")
    lora = SynthesizerLoRA(demo_base_model(), DEMO_LORA, fingerprint=_fingerprint_of(out / FILES["model"]))
    adapters = {}
    for name, (file, seed) in ADAPTERS.items():
        rng = np.random.default_rng(seed)
        state = {k: torch.from_numpy((0.05 * rng.standard_normal(tuple(v.shape))).astype(np.float32))
                 for k, v in lora.get_lora_state_dict().items()}
        lora.load_lora_weights(state)
        save_adapter(out / file, lora, name=name, dtype=torch.float16)
        adapters[name] = file

    note("input and retrieval index")
    audio = speech_like(6.0, 16000, seed=4)
    sf.write(out / FILES["input"], audio, 16000, subtype="PCM_16")
    with torch.inference_mode():
        feats = hubert.float().extract(torch.from_numpy(audio).double(), "v2")[0].numpy()
    rng = np.random.default_rng(5)
    build_index(np.concatenate([feats + 0.05 * rng.standard_normal(feats.shape) for _ in range(4)]).astype(
        np.float32), out / FILES["index"], seed=0)
    manifest = {"demo_version": DEMO_VERSION, "note": "random weights: the output is not a real voice",
                **{k: v for k, v in FILES.items()}, "adapters": adapters,
                "indexes": {"demo-voice-a": FILES["index"]}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _fingerprint_of(path: Path) -> str:
    from rvc_lora.checkpoint import read_rvc_checkpoint

    return read_rvc_checkpoint(path).fingerprint


def ensure_demo_assets(folder: str | os.PathLike[str], on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The manifest of `folder`, writing the assets first when they are missing or stale (`on_step`: as
    `write_demo_assets`)."""
    manifest_path = Path(folder) / "manifest.json"
    if manifest_path.is_file():
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        files = [manifest.get(k) for k in FILES] + list(manifest.get("adapters", {}).values())
        if manifest.get("demo_version") == DEMO_VERSION and all(
                isinstance(f, str) and (Path(folder) / f).is_file() for f in files):
            return manifest
    log.info("writing demo assets to %s (one-time, about a minute)", folder)
    return write_demo_assets(folder, on_step)
