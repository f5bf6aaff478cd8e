"""Training cost: LoRA (r=8 on dec.ups + dec.resblocks) vs a full fine-tune of the generator, same run.

Full-size RVC v2 40k f0 generator with `enc_q` and the v2 multi-period discriminator (random weights),
batch 4 of 3 s segments (RVC's `per` for fp32 / small GPUs), RVC's 32-frame (12800-sample) crop.
Each mode runs in its own process so that peak memory is that mode's alone (CPU: peak RSS; CUDA:
`max_memory_allocated`). Run:
    .venv/bin/python benchmarks/bench_train.py [--device cpu|cuda] [--steps 3] [--warmup 1]
Prints one table; every number comes from this run.
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
from pathlib import Path

import torch

from rvc_lora import LoRAConfig, SynthConfig, SynthesizerLoRA, build_synthesizer, save_adapter, save_rvc_checkpoint
from rvc_lora.lora import lora_layers
from rvc_lora.train.data import Batch, Sample, collate
from rvc_lora.train.discriminators import MultiPeriodDiscriminator
from rvc_lora.train.mel import spectrogram
from rvc_lora.train.pretrained import train_params
from rvc_lora.train.step import WEIGHT_DECAY, GANTrainer, lora_param_groups

V2_40K = [1025, 32, 192, 192, 768, 2, 6, 3, 0, "1", [3, 7, 11], [[1, 3, 5]] * 3, [10, 10, 2, 2], 512,
          [16, 16, 4, 4], 109, 256, 40000]
SEGMENT_S = 3.0
BATCH = 4


def batch(cfg: SynthConfig, seed: int = 0) -> Batch:
    """Four 3 s items: harmonic tones (their real spectrograms) with random 768-d content features."""
    gen = torch.Generator().manual_seed(seed)
    frames = int(SEGMENT_S * 100)
    hop = cfg.upp
    samples = []
    for i in range(BATCH):
        f0 = 120.0 + 40 * i + 20 * torch.sin(torch.arange(frames) / 30)
        phase = torch.cumsum(f0.repeat_interleave(hop) / cfg.sr, 0) * 2 * torch.pi
        wave = 0.3 * torch.sin(phase) + 0.1 * torch.sin(2 * phase)
        spec = spectrogram(wave[None], 2 * (cfg.spec_channels - 1), hop, 2 * (cfg.spec_channels - 1))[0]
        samples.append(Sample(torch.randn(frames, cfg.content_dim, generator=gen), torch.randint(1, 256, (frames,)),
                              f0, spec, wave, 0))
    return collate(samples)


def file_mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def worker(mode: str, device: str, steps: int, warmup: int) -> dict[str, float | str]:
    dev = torch.device(device)
    torch.manual_seed(0)
    cfg = SynthConfig.from_list(V2_40K, version="v2", f0=True)
    params = train_params(cfg)
    base = build_synthesizer(cfg, with_posterior=True)
    base.segment_size = params.segment_frames
    out: dict[str, float | str] = {"mode": mode}
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "lora":
            lcfg = LoRAConfig(r=8, lora_alpha=16, target_modules=["ups", "resblocks"])
            lora = SynthesizerLoRA(base, lcfg)
            layers = lora_layers(lora.base)
            for layer in layers.values():
                layer.init_for_training_()
            groups = lora_param_groups([m.lora_A for m in layers.values()], [m.lora_B for m in layers.values()],
                                       1e-4, lcfg.scaling)
            out["saved_mb"] = file_mb(save_adapter(Path(tmp) / "voice.safetensors", lora))
            model: torch.nn.Module = lora
        else:
            model = base
            groups = [{"params": list(base.parameters()), "weight_decay": WEIGHT_DECAY}]
            out["saved_mb"] = file_mb(save_rvc_checkpoint(Path(tmp) / "voice.pth", base))  # RVC's fp16 small model
        model.to(dev).train()
        disc = MultiPeriodDiscriminator("v2").to(dev).train()
        gan = GANTrainer(model, groups, disc, params, f0=True, device=dev, fp16=dev.type == "cuda")
        out["trainable"] = sum(p.numel() for p in gan.g_params)
        b = batch(cfg)
        rss_before = rss_mb()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(warmup + steps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            gan.step(b)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t)
        step_s = statistics.median(times)
        out["step_s"], out["steps_per_s"] = step_s, 1 / step_s
        if dev.type == "cuda":
            out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out["peak_mb"], out["peak_over_model_mb"] = peak, peak - rss_before
        trainables = {str(i): p.detach() for i, p in enumerate(gan.g_params)}  # full: the whole generator
        torch.save({"trainables": trainables, "trainer": gan.state_dict(), "d": disc.state_dict()},
                   Path(tmp) / "state.pt")
        out["state_mb"] = file_mb(Path(tmp) / "state.pt")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--worker", choices=["lora", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.device, args.steps, args.warmup)))
        return
    rows = []
    for mode in ("lora", "full"):
        cmd = [sys.executable, __file__, "--worker", mode, "--device", args.device, "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"v2 40k f0, batch {BATCH} x {SEGMENT_S:g} s segments, 32-frame crop, v2 MPD; {where}; "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    mem = "peak GPU alloc MB" if args.device == "cuda" else "peak RSS MB (over model)"
    print(f"{'mode':<6} {'trainable':>12} {'s/step':>8} {'steps/s':>8} {mem:>26} {'saved MB':>9} {'state MB':>9}")
    for r in rows:
        peak = f"{r['peak_mb']:.0f}" + (f" ({r['peak_over_model_mb']:.0f})" if "peak_over_model_mb" in r else "")
        print(f"{r['mode']:<6} {r['trainable']:>12,} {r['step_s']:>8.2f} {r['steps_per_s']:>8.3f} {peak:>26} "
              f"{r['saved_mb']:>9.2f} {r['state_mb']:>9.1f}")
    print("saved: lora = adapter .safetensors (fp32); full = RVC's fp16 inference .pth (no enc_q). "
          "state: what resuming needs (trainables, optimisers, discriminator).")


if __name__ == "__main__":
    main()
