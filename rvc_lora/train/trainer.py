"""`rvc-lora train`: a LoRA voice adapter over a frozen pretrained base (spec §4.3-§4.7).

Only the LoRA tensors of the generator train, with the small tensors (biases, norms, embeddings) whole by
default (`full_delta`; saved as the adapter's full deltas), and the discriminator. Every `save_every` epochs, and
at the end, `<work_dir>/checkpoints/` gets `<name>_e<epoch>.safetensors` (the service's adapter
format), `<name>_e<epoch>.wav` (a validation sample: the adapted model on the first training segment)
and `state.pt` (LoRA, discriminator, optimisers, schedulers, loss scaler, step, RNG states), from
which `resume=True` continues exactly. Per-step losses go to a progress bar and to
`<work_dir>/checkpoints/train_log.jsonl`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from rvc_lora.config import SynthConfig
from rvc_lora.lora import LoRAConfig, full_delta_slots, lora_layers, name_matches
from rvc_lora.pipeline.audio import encode_audio
from rvc_lora.train.data import BucketBatchSampler, PreparedInfo, Sample, SegmentDataset, collate, load_segment
from rvc_lora.train.discriminators import MultiPeriodDiscriminator, load_discriminator
from rvc_lora.train.errors import TrainingDataError, TrainingStateError
from rvc_lora.train.pretrained import TrainParams, load_pretrained_base, train_params
from rvc_lora.train.step import GANTrainer, lora_param_groups
from rvc_lora.voice import FULL_DELTA_PATTERNS, SynthesizerLoRA, save_adapter
from rvc_lora.voice.layout import (
    DEFAULT_B_LR_RATIO,
    DEFAULT_FULL_DELTA,
    DEFAULT_TRAIN_ALPHA,
    DEFAULT_TRAIN_RANK,
    DEFAULT_TRAIN_TARGETS,
)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
LOG_FILE = "train_log.jsonl"
STATE_FORMAT = "rvc-lora-train-state"
VALIDATION_FRAMES = 300  # 3 s of validation audio
DEFAULT_GRAD_CLIP = 1000.0


@dataclass(frozen=True)
class TrainResult:
    """Where the outputs are and how training went (`losses`: means over the last epoch run)."""

    adapter: Path
    state: Path
    log: Path
    samples: tuple[Path, ...]
    epochs: int
    steps: int
    losses: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    steps_per_s: float = 0.0
    trainable_parameters: int = 0

    def __str__(self) -> str:
        losses = ", ".join(f"{k} {v:.3f}" for k, v in self.losses.items() if k.startswith("loss"))
        return (f"{self.epochs} epochs, {self.steps} steps ({self.steps_per_s:.2f} steps/s, "
                f"{self.trainable_parameters:,} trainable parameters) -> {self.adapter}\n"
                f"last epoch: {losses or 'nothing left to train'}\nlog {self.log}, state {self.state}")


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _rng_state(device: torch.device) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_prepared(info: PreparedInfo, cfg: SynthConfig, params: TrainParams, base: Path) -> None:
    want = (cfg.sr, cfg.version, cfg.f0, params.n_fft, params.hop)
    have = (info.sr, info.version, info.f0, info.n_fft, info.hop)
    if want != have:
        raise TrainingDataError(f"{info.root}: prepared for sr/version/f0/n_fft/hop {have}, but {base} needs {want}; "
                                "run prepare again with this base")


class LoRATraining:
    """One training job: the adapted model, the GAN trainer, the data, and save / resume / fit.

    `run_train` is `LoRATraining.create(...).fit(...)`; tests and notebooks use the object to look at
    `model` (a `SynthesizerLoRA`) and `gan` (`GANTrainer`) before and after."""

    def __init__(self, model: SynthesizerLoRA, gan: GANTrainer, info: PreparedInfo, out: Path,
                 settings: dict[str, Any], *, seed: int, batch_size: int, num_workers: int = 0) -> None:
        self.model, self.gan, self.info, self.out, self.settings = model, gan, info, out, settings
        self.seed, self.batch_size, self.num_workers = seed, batch_size, num_workers
        self.dir = info.root / CHECKPOINTS
        self.samples: list[Path] = []

    @classmethod
    def create(cls, work_dir: str | os.PathLike[str], base: str | os.PathLike[str], out: str | os.PathLike[str], *,
               rank: int = DEFAULT_TRAIN_RANK, alpha: float = DEFAULT_TRAIN_ALPHA,
               targets: Sequence[str] = DEFAULT_TRAIN_TARGETS, batch_size: int = 4, lr: float = 1e-4, seed: int = 1234,
               discriminator: str | os.PathLike[str] | None = None, device: str | torch.device | None = None,
               fp16: bool | None = None, grad_clip: float | None = DEFAULT_GRAD_CLIP, num_workers: int = 0,
               base_config: SynthConfig | None = None, segment_frames: int | None = None,
               n_mels: int | None = None, full_delta: bool = DEFAULT_FULL_DELTA,
               b_lr_ratio: float = DEFAULT_B_LR_RATIO) -> LoRATraining:
        """Everything `fit` needs, seeded with `seed` (see `run_train` for the arguments)."""
        if not (math.isfinite(b_lr_ratio) and b_lr_ratio > 0):
            raise ValueError(f"b_lr_ratio must be a finite number > 0, got {b_lr_ratio!r}")
        dev = _device(device)
        info = PreparedInfo.read(Path(work_dir))
        torch.manual_seed(seed)
        pretrained = load_pretrained_base(base, base_config)
        cfg = pretrained.config
        params = train_params(cfg, n_mels=n_mels, segment_frames=segment_frames)
        _check_prepared(info, cfg, params, pretrained.path)
        pretrained.model.segment_size = params.segment_frames
        params_named = [n for n, _ in pretrained.model.named_parameters() if not n.startswith("enc_q.")]
        full = tuple(p for p in FULL_DELTA_PATTERNS if any(name_matches(p, n) for n in params_named)) if full_delta \
            else ()  # every small tensor extraction would store whole (no-f0 models have no emb_pitch)
        lora_config = LoRAConfig(r=rank, lora_alpha=alpha, target_modules=tuple(targets), full_delta_modules=full)
        model = SynthesizerLoRA(pretrained.model, lora_config, fingerprint=pretrained.fingerprint)
        layers = lora_layers(model.base)
        for layer in layers.values():
            layer.init_for_training_()  # A kaiming, B zero: training starts at exactly the base voice
        model.to(dev).train()
        fulls = _full_delta_parameters(model)
        for p in fulls:
            p.requires_grad_(True)
        disc = load_discriminator(discriminator) if discriminator is not None else MultiPeriodDiscriminator(
            cfg.version)
        disc.to(dev).train()
        groups = lora_param_groups([m.lora_A for m in layers.values()], [m.lora_B for m in layers.values()], lr,
                                   lora_config.scaling, b_lr_ratio)
        if fulls:  # no weight decay: AdamW would pull the base's bias itself, not its delta, towards 0
            groups.append({"params": fulls, "lr": lr, "weight_decay": 0.0})
        gan = GANTrainer(model, groups, disc, params, f0=cfg.f0, device=dev,
                         fp16=dev.type == "cuda" if fp16 is None else fp16, lr=lr, grad_clip=grad_clip)
        settings = {"fingerprint": pretrained.fingerprint, "rank": rank, "alpha": float(alpha),
                    "targets": list(targets), "segment_frames": params.segment_frames, "n_mels": params.n_mels,
                    "seed": seed}  # the seed also orders the batches: another one cannot continue exactly
        if full_delta or b_lr_ratio != 1.0:  # only when set: states saved before these options still resume
            settings.update(full_delta=full_delta, b_lr_ratio=b_lr_ratio)
        return cls(model, gan, info, Path(out), settings, seed=seed, batch_size=batch_size, num_workers=num_workers)

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def log_path(self) -> Path:
        return self.dir / LOG_FILE

    def save(self, epoch: int, step: int) -> Path:
        """Adapter, validation sample and resumable state for the end of `epoch`; returns the adapter path."""
        self.dir.mkdir(parents=True, exist_ok=True)
        sync_full_deltas(self.model)
        stem = self.dir / f"{self.out.stem}_e{epoch:04d}"
        adapter = save_adapter(stem.with_suffix(".safetensors"), self.model, name=self.out.stem)
        self._validation_sample(stem.with_suffix(".wav"))
        state = {"format": STATE_FORMAT, "epoch": epoch, "step": step, "settings": self.settings,
                 "lora": {k: v.cpu() for k, v in self.model.get_lora_state_dict().items()},
                 "discriminator": {k: v.cpu() for k, v in self.gan.discriminator.state_dict().items()},
                 "trainer": self.gan.state_dict(), "rng": _rng_state(self.gan.device)}
        tmp = self.state_path.with_name(f".{STATE_FILE}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.state_path)
        return adapter

    def resume(self) -> tuple[int, int]:
        """Load `state.pt` -> (epoch, step) it was saved at; RNG states restored last."""
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, foreign or pickled file: all mean "not our state"
            raise TrainingStateError(f"{self.state_path}: unreadable training state: {exc}") from exc
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise TrainingStateError(f"{self.state_path}: not an rvc-lora training state")
        for key, value in self.settings.items():
            if state["settings"].get(key) != value:
                raise TrainingStateError(f"{self.state_path}: saved with {key}={state['settings'].get(key)!r}, this "
                                         f"run has {value!r}; start without resume or use the same setting")
        self.model.load_lora_weights(state["lora"], strict=True)
        self.gan.discriminator.load_state_dict(state["discriminator"], strict=True)
        self.gan.load_state_dict(state["trainer"])
        _set_rng_state(state["rng"], self.gan.device)
        return int(state["epoch"]), int(state["step"])

    @torch.no_grad()
    def _validation_sample(self, path: Path) -> None:
        """The adapted model on the first training segment's features (own seed: training RNG untouched)."""
        s = load_segment(self.info.segments[0], self.info.f0, self.info.hop, max_frames=VALIDATION_FRAMES)
        device = self.gan.device
        n = torch.tensor([s.phone.shape[0]], device=device)
        sid = torch.zeros(1, dtype=torch.long, device=device)
        devices = ([device.index if device.index is not None else torch.cuda.current_device()]
                   if device.type == "cuda" else [])
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=devices, device_type="cuda"):
                torch.manual_seed(self.seed)
                if s.pitch is not None and s.pitchf is not None:
                    audio = self.model.infer(s.phone[None].to(device), n, s.pitch[None].to(device),
                                             s.pitchf[None].to(device), sid)[0]
                else:
                    audio = self.model.infer(s.phone[None].to(device), n, sid)[0]
        finally:
            self.model.train()
        path.write_bytes(encode_audio(audio[0, 0].float().cpu().numpy(), self.info.sr))
        self.samples.append(path)

    def _loader(self) -> tuple[DataLoader[Sample], BucketBatchSampler]:
        dataset = SegmentDataset(self.info.training_items(), self.info.f0, self.info.hop)
        sampler = BucketBatchSampler(dataset.lengths(), self.batch_size, seed=self.seed)
        if len(sampler) == 0:
            raise TrainingDataError(f"{self.info.root}: no segment is 0.75-6.75 s long; nothing to train on")
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
                            pin_memory=self.gan.device.type == "cuda", persistent_workers=self.num_workers > 0,
                            generator=torch.Generator())  # its seed draw must not touch the global generator
        return loader, sampler

    def fit(self, epochs: int, *, save_every: int = 5, resume: bool = False, progress: bool = True) -> TrainResult:
        """Train to `epochs` in total (continuing from `state.pt` when `resume`), then write the adapter to `out`."""
        if epochs < 1 or save_every < 1:
            raise ValueError(f"epochs and save_every must be >= 1, got {epochs}, {save_every}")
        self.dir.mkdir(parents=True, exist_ok=True)
        done = step = 0  # epochs and steps already trained
        if resume and self.state_path.is_file():
            done, step = self.resume()
            _trim_log(self.log_path, step)
        else:
            if resume:
                log.warning("%s: no training state to resume from; starting from epoch 1", self.state_path)
            self.log_path.write_text("")
        loader, sampler = self._loader()
        start, first_step = time.perf_counter(), step
        last: list[dict[str, float]] = []
        bar = tqdm(total=epochs * len(sampler), initial=step, desc="train", unit="step", disable=not progress)
        with self.log_path.open("a") as log_file:
            for epoch in range(done + 1, epochs + 1):
                sampler.set_epoch(epoch)
                last = []
                for batch in loader:
                    lr = self.gan.lr
                    losses = self.gan.step(batch)
                    step += 1
                    rate = (step - first_step) / (time.perf_counter() - start)
                    log_file.write(json.dumps({"epoch": epoch, "step": step, "lr": lr, **losses,
                                               "steps_per_s": rate}) + "\n")
                    last.append(losses)
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, g=f"{losses['loss_g']:.3f}", d=f"{losses['loss_d']:.3f}",
                                    mel=f"{losses['loss_mel']:.3f}", lr=f"{lr:.2e}")
                self.gan.end_epoch()
                if epoch % save_every == 0 or epoch == epochs:
                    log_file.flush()
                    log.info("epoch %d (step %d): saved %s", epoch, step, self.save(epoch, step))
                done = epoch
        bar.close()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        sync_full_deltas(self.model)
        save_adapter(self.out, self.model, name=self.out.stem)
        seconds = time.perf_counter() - start
        means = {k: float(np.mean([x[k] for x in last])) for k in last[0]} if last else {}
        return TrainResult(self.out, self.state_path, self.log_path, tuple(self.samples), done, step, means,
                           seconds, (step - first_step) / seconds if seconds > 0 else 0.0,
                           sum(p.numel() for p in self.gan.g_params))


def _full_delta_parameters(model: SynthesizerLoRA) -> list[torch.nn.Parameter]:
    """The parameters with a full-delta slot: trained in place; their delta is `param - base` (`sync_full_deltas`)."""
    slots = full_delta_slots(model.base)
    return [] if slots is None else [model.base.get_parameter(path) for path in slots.paths]


@torch.no_grad()
def sync_full_deltas(model: SynthesizerLoRA) -> None:
    """Write each trained full-delta parameter's `param - base` into its slot, which adapters are saved from."""
    if (slots := full_delta_slots(model.base)) is not None:
        for i, path in enumerate(slots.paths):
            slots.delta(i).copy_(model.base.get_parameter(path) - slots.base(i))


def _trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the saved step (written by a run that stopped before its next save)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(f"{ln}\n" for ln in lines))


def run_train(work_dir: str | os.PathLike[str], base: str | os.PathLike[str], out: str | os.PathLike[str], *,
              rank: int = DEFAULT_TRAIN_RANK, alpha: float = DEFAULT_TRAIN_ALPHA,
              targets: Sequence[str] = DEFAULT_TRAIN_TARGETS, epochs: int = 20,
              batch_size: int = 4, lr: float = 1e-4, save_every: int = 5, resume: bool = False, seed: int = 1234,
              discriminator: str | os.PathLike[str] | None = None, device: str | torch.device | None = None,
              fp16: bool | None = None, grad_clip: float | None = DEFAULT_GRAD_CLIP, num_workers: int = 0,
              base_config: SynthConfig | None = None, segment_frames: int | None = None,
              n_mels: int | None = None, progress: bool = True, full_delta: bool = DEFAULT_FULL_DELTA,
              b_lr_ratio: float = DEFAULT_B_LR_RATIO) -> TrainResult:
    """Train a rank-`rank` LoRA adapter for the data prepared in `work_dir` over the pretrained `base`
    (which must carry `enc_q`) and write it to `out` (safetensors, the format the service serves).

    `discriminator`: a pretrained `D*.pth` (strongly recommended), else one from scratch. `device` None picks
    CUDA when available; `fp16` None means fp16 autocast on CUDA only. `grad_clip`: max total gradient norm
    (None: measure only, as RVC). `segment_frames`/`n_mels` override RVC's per-variant numbers (tiny models).
    `resume` continues from `<work_dir>/checkpoints/state.pt` to `epochs` in total, exactly as one run would.
    `full_delta`: also train the small tensors (biases, norms, embeddings: `FULL_DELTA_PATTERNS`) whole, stored
    as full deltas as extraction stores them; `b_lr_ratio`: B's learning rate over A's (LoRA+; 1: plain LoRA)."""
    job = LoRATraining.create(work_dir, base, out, rank=rank, alpha=alpha, targets=targets, batch_size=batch_size,
                              lr=lr, seed=seed, discriminator=discriminator, device=device, fp16=fp16,
                              grad_clip=grad_clip, num_workers=num_workers, base_config=base_config,
                              segment_frames=segment_frames, n_mels=n_mels, full_delta=full_delta,
                              b_lr_ratio=b_lr_ratio)
    return job.fit(epochs, save_every=save_every, resume=resume, progress=progress)
