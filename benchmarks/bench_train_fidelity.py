"""LoRA training against full fine-tuning, on the same data, batches and step budget (issue #18 part 3).

One espeak-ng speaker of `bench_fidelity.py` (the same sentences, prepared the same way) is trained from the
same pretrained base and discriminator with RVC's step (`GANTrainer`) in several ways:

- `full`: every generator parameter (enc_q included) and the discriminator, as RVC fine-tunes a voice;
- `dec rN`: `rvc-lora train`'s LoRA (rank N, alpha 16) on its default targets before this benchmark (the
  decoder's `ups` and `resblocks`); `all rN`: LoRA on every layer extraction writes (enc_p, flow, dec);
- `all+full r32`: plus the small tensors (biases, norms, `emb_g`, `emb_pitch`, ...) trained whole, as
  extraction stores them; `... Bx16`: with B's learning rate 16x A's (LoRA+).

Every run sees the same batches in the same order (same seed). Measured: the validation mel loss (L1 between
log mels of the output and of the real held-out speech, the unweighted `loss_mel`) every `--eval-every`
steps; at the end the distances of `bench_fidelity.py` against the *full fine-tune's* output on the held-out
sentences (the question is how much of what full fine-tuning learns LoRA learns; against the data itself,
the random-weight demo base is too far from speech for a distance to say that); seconds per step (after
the first), the process's peak RSS and the trainable parameters' optimizer state (param grad + 2 Adam
moments, fp32). Each run is its own process (peak RSS per run); rows go to `<out>/train_fidelity.jsonl`
as they come, a rerun skips finished runs; `--table` prints the table from it.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_train_fidelity.py --out /tmp/fidelity

(defaults: 1 voice, 10 steps at lr 3e-4, batch 2: about 45 minutes on 2 shared CPU cores). `--long`: 200
steps at RVC's lr 1e-4, batch 4, 3 voices (many hours on this CPU; the runs are CPU-only).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fidelity import (  # noqa: E402  (a sibling script, not a package)
    F0_METHOD,
    HELD_OUT,
    SPEAKERS,
    TEXTS,
    Reference,
    batches,
    distances,
    models,
    pitch_track,
    require_espeak,
    speak,
)

from rvc_lora.checkpoint import read_rvc_checkpoint  # noqa: E402
from rvc_lora.train.data import PreparedInfo, SegmentDataset, collate  # noqa: E402
from rvc_lora.train.discriminators import load_discriminator  # noqa: E402
from rvc_lora.train.losses import mel_loss  # noqa: E402
from rvc_lora.train.mel import MelScale  # noqa: E402
from rvc_lora.train.prepare import run_prepare  # noqa: E402
from rvc_lora.train.pretrained import load_pretrained_base, train_params  # noqa: E402
from rvc_lora.train.step import WEIGHT_DECAY, GANTrainer  # noqa: E402
from rvc_lora.train.trainer import LoRATraining, sync_full_deltas  # noqa: E402
from rvc_lora.voice import EXTRACT_TARGETS, build_voice_model, save_adapter  # noqa: E402

RESULTS = "train_fidelity.jsonl"
DEC = ("ups", "resblocks")  # `rvc-lora train`'s targets before this benchmark
ALL = EXTRACT_TARGETS["all"]
# name -> (targets, rank, full deltas, B lr ratio); None: full fine-tune
CONFIGS: dict[str, tuple[tuple[str, ...], int, bool, float] | None] = {
    "full": None,
    "dec r8": (DEC, 8, False, 1.0), "dec r32": (DEC, 32, False, 1.0), "dec r128": (DEC, 128, False, 1.0),
    "all r8": (ALL, 8, False, 1.0), "all r32": (ALL, 32, False, 1.0), "all r128": (ALL, 128, False, 1.0),
    "all+full r32": (ALL, 32, True, 1.0), "all+full r32 Bx16": (ALL, 32, True, 16.0),
    "dec r8 Bx16": (DEC, 8, False, 16.0),
}
ALPHA = 16.0  # `rvc-lora train --alpha` default


def voice_dir(out: Path, name: str) -> Path:
    return out / "voices" / name


def prepare_voice(args: argparse.Namespace, index: int) -> None:
    """The speaker's train / held-out sentences, spoken and prepared as `bench_fidelity.py` does."""
    exe = require_espeak()
    m = models(args)
    name, voice, pitch, speed, lang = SPEAKERS[index]
    vdir = voice_dir(Path(args.out), name)
    speak(exe, voice, pitch, speed, TEXTS[lang][:-HELD_OUT], vdir / "train-wav")
    speak(exe, voice, pitch, speed, TEXTS[lang][-HELD_OUT:], vdir / "heldout-wav")
    for part in ("train", "heldout"):
        if not (vdir / part / "dataset.json").is_file():
            run_prepare(vdir / f"{part}-wav", vdir / part, m.served, m.hubert, F0_METHOD, min_total_s=1.0,
                        progress=False)


# --- one run (a child process) ----------------------------------------------------------------------------------------
class Validation:
    """The held-out clips: synthesizer inputs, the real audio, and the mel L1 of a model's output against it."""

    def __init__(self, work: Path, limit: int, seconds: float, mel: MelScale) -> None:
        info = PreparedInfo.read(work)
        data = SegmentDataset(info.segments, f0=True, hop=info.hop)
        frames, self.mel, self.inputs, self.real = int(seconds * 100), mel, [], []
        for i in range(min(limit, len(data))):
            s = data[i]
            assert s.pitch is not None and s.pitchf is not None
            n = min(frames, s.phone.shape[0])
            self.inputs.append({"phone": s.phone[None, :n], "phone_lengths": torch.tensor([n]),
                                "pitch": s.pitch[None, :n], "nsff0": s.pitchf[None, :n], "sid": torch.tensor([0])})
            self.real.append(s.wave[: n * info.hop])

    @torch.no_grad()
    def render(self, model: torch.nn.Module) -> list[np.ndarray]:
        was_training = model.training
        model.eval()
        out = []
        try:
            for seed, inputs in enumerate(self.inputs):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)  # the same noise for every model
                    out.append(model.infer(**inputs)[0].flatten().numpy().astype(np.float64))  # type: ignore[operator]
        finally:
            model.train(was_training)
        return out

    def mel_l1(self, audio: list[np.ndarray]) -> float:
        losses = []
        for real, fake in zip(self.real, audio, strict=True):
            n = min(real.shape[0], fake.shape[0])
            a, b = self.mel(real[None, :n].float()), self.mel(torch.from_numpy(fake[None, :n]).float())
            losses.append(float(mel_loss(a, b)))
        return statistics.mean(losses)


def setup_full(args: argparse.Namespace, seed: int) -> tuple[torch.nn.Module, GANTrainer, list[torch.Tensor]]:
    m = models(args)
    torch.manual_seed(seed)
    base = load_pretrained_base(m.pretrained)
    params = train_params(base.config)
    model = base.model.train()
    model.segment_size = params.segment_frames
    disc = load_discriminator(m.discriminator).train()
    trainable = list(model.parameters())
    groups = [{"params": trainable, "weight_decay": WEIGHT_DECAY}]
    return model, GANTrainer(model, groups, disc, params, f0=True, device=torch.device("cpu"), lr=args.lr), trainable


def setup_lora(args: argparse.Namespace, seed: int, work: Path, spec: tuple[tuple[str, ...], int, bool, float]
               ) -> LoRATraining:
    m = models(args)
    targets, rank, full, b_ratio = spec
    return LoRATraining.create(work, m.pretrained, Path(args.out) / "unused.safetensors", rank=rank, alpha=ALPHA,
                               targets=targets, batch_size=args.batch, lr=args.lr, seed=seed,
                               discriminator=m.discriminator, device="cpu", fp16=False, full_delta=full,
                               b_lr_ratio=b_ratio)


def run_one(args: argparse.Namespace) -> None:
    """Train `args.run` on the voice and append its rows (child process)."""
    torch.set_num_threads(1)
    out = Path(args.out)
    name = SPEAKERS[args.voice][0]
    vdir = voice_dir(out, name)
    seed = 100 + args.voice
    spec = CONFIGS[args.run]
    lora_job = None
    if spec is None:
        model, gan, trainable = setup_full(args, seed)
    else:
        lora_job = setup_lora(args, seed, vdir / "train", spec)
        model, gan = lora_job.model, lora_job.gan
        trainable = gan.g_params
    val = Validation(vdir / "heldout", args.clips, args.clip_s, MelScale(gan.params))
    info = PreparedInfo.read(vdir / "train")
    data = SegmentDataset(info.segments, f0=True, hop=info.hop)
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        row = {"voice": name, "config": args.run, "steps": args.steps, "lr": args.lr, "batch": args.batch, **row}
        rows.append(row)
        with (out / RESULTS).open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"  {name} {args.run:<18} " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in row.items() if k not in ("voice", "config")),
              flush=True)

    if spec is None:  # every run starts at the base: measure it once
        emit({"kind": "curve", "step": 0, "val_mel": val.mel_l1(val.render(model))})
    times = []
    for step, items in zip(range(args.steps), batches(data, args.batch, seed), strict=False):
        t = time.perf_counter()
        losses = gan.step(collate(items))
        times.append(time.perf_counter() - t)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            emit({"kind": "curve", "step": step + 1, "val_mel": val.mel_l1(val.render(model)),
                  "train_mel": losses["loss_mel"] / 45, "s": sum(times)})
    audio = val.render(model)
    ref_path = vdir / f"train-fidelity-ref-{args.steps}-{args.lr:g}-{args.batch}.npz"
    final: dict[str, Any] = {"kind": "final", "val_mel": val.mel_l1(audio),
                             "s_per_step": statistics.mean(times[1:] or times),
                             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                             "trainable": sum(p.numel() for p in trainable),
                             "optim_mb": 3 * 4 * sum(p.numel() for p in trainable) / 1e6}
    sr = read_rvc_checkpoint(models(args).served).config.sr
    if spec is None:
        np.savez(ref_path, *audio)
        base = build_voice_model(read_rvc_checkpoint(models(args).served))
        ref = Reference(audio, [pitch_track(a, sr) for a in audio], sr)
        emit({"kind": "base", "config_of": "base alone", **{f"vs_full_{k}": v for k, v in
                                                              distances(ref, val.render(base)).items()}})
        final["adapter_mb"] = models(args).served.stat().st_size / 1e6
    else:
        assert lora_job is not None
        with np.load(ref_path) as z:
            ref_audio = [z[f"arr_{i}"] for i in range(len(z.files))]
        ref = Reference(ref_audio, [pitch_track(a, sr) for a in ref_audio], sr)
        final.update({f"vs_full_{k}": v for k, v in distances(ref, audio).items()})
        with tempfile.TemporaryDirectory() as tmp:
            sync_full_deltas(lora_job.model)
            final["adapter_mb"] = save_adapter(Path(tmp) / "a.safetensors", lora_job.model,
                                               dtype=torch.float16).stat().st_size / 1e6
    emit(final)


# --- table ------------------------------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def table(rows: list[dict[str, Any]]) -> str:
    finals = [r for r in rows if r["kind"] in ("base", "final")]
    curves: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for r in rows:
        if r["kind"] == "curve":
            curves[(r["voice"], r["config"])][r["step"]] = r["val_mel"]
    lines = []
    for voice in sorted({r["voice"] for r in finals}):
        lines.append(f"voice {voice}: validation mel L1 (log mel, vs the real held-out speech) by step; distances "
                     "to the full fine-tune's held-out output at the end")
        steps = sorted({s for (v, _), c in curves.items() if v == voice for s in c})
        lines.append(f"{'config':<19}" + "".join(f"{'@' + str(s):>7}" for s in steps)
                     + f" {'SNR dB':>7} {'mel dB':>7} {'voicing':>7} {'f0 gross':>8} {'s/step':>7} {'RSS MB':>7}"
                       f" {'optim MB':>8} {'MB':>7}")
        for r in [x for x in finals if x["voice"] == voice]:
            cfg = r.get("config_of", r["config"])
            curve = curves.get((voice, r["config"]), {}) if "config_of" not in r else {}
            lines.append(f"{cfg:<19}" + "".join(f"{curve[s]:>7.3f}" if s in curve else f"{'':>7}" for s in steps)
                         + (f" {r['vs_full_snr_db']:>7.2f} {r['vs_full_mel_db']:>7.2f} {r['vs_full_voicing']:>7.3f}"
                            f" {r['vs_full_f0_gross']:>8.3f}" if "vs_full_snr_db" in r else f" {'(reference)':>32}")
                         + (f" {r['s_per_step']:>7.1f} {r['peak_rss_mb']:>7.0f} {r['optim_mb']:>8.1f}"
                            f" {r['adapter_mb']:>7.2f}" if "s_per_step" in r else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/rvc-lora-fidelity", help="work folder (shared with bench_fidelity)")
    parser.add_argument("--models-dir", default="models", help="where `rvc-lora models fetch` put RVC's files")
    parser.add_argument("--voices", type=int, nargs="+", default=[0], help="speaker indices (bench_fidelity's list)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-4, help="learning rate of every run (RVC: 1e-4)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--clip-s", type=float, default=2.0)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--long", action="store_true", help="200 steps at lr 1e-4, batch 4, 3 voices, eval every 20")
    parser.add_argument("--table", action="store_true", help="only print the table of what --out holds")
    parser.add_argument("--run", choices=list(CONFIGS), help=argparse.SUPPRESS)  # one run, in a child process
    parser.add_argument("--voice", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.long:
        args.steps, args.lr, args.batch, args.eval_every, args.voices = 200, 1e-4, 4, 20, [0, 1, 2]
    out = Path(args.out)
    if args.table:
        print(table(read_rows(out / RESULTS)))
        return
    if args.run is not None:
        run_one(args)
        return
    out.mkdir(parents=True, exist_ok=True)
    configs = ["full"] + [c for c in args.configs if c != "full"]  # the reference first
    for index in args.voices:
        prepare_voice(args, index)
        name = SPEAKERS[index][0]
        done = {r["config"] for r in read_rows(out / RESULTS) if r["kind"] == "final" and r["voice"] == name
                and r["steps"] == args.steps and r["lr"] == args.lr and r["batch"] == args.batch}
        for config in configs:
            if config in done:
                continue
            print(f"{name}: {config}", flush=True)
            subprocess.run([sys.executable, __file__, "--run", config, "--voice", str(index), "--out", args.out,
                            "--models-dir", args.models_dir, "--steps", str(args.steps), "--lr", str(args.lr),
                            "--batch", str(args.batch), "--eval-every", str(args.eval_every), "--clips",
                            str(args.clips), "--clip-s", str(args.clip_s)], check=True)
    print(table(read_rows(out / RESULTS)))


if __name__ == "__main__":
    main()
