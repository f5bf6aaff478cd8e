"""Adapter hot swap vs full checkpoint reload, LoRA overhead on `infer`, and file sizes.

Full-size RVC v2 40k f0 configuration with random weights. Run:
    .venv/bin/python benchmarks/bench_lora.py [--device cpu|cuda] [--swaps 200] [--reloads 10]
Prints one table; every number comes from this single run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rvc_lora import LoRAConfig, SynthConfig, SynthesizerLoRA, build_synthesizer, save_adapter, save_rvc_checkpoint
from rvc_lora.checkpoint import build_from_raw, read_rvc_checkpoint

V2_40K = [1025, 32, 192, 192, 768, 2, 6, 3, 0, "1", [3, 7, 11], [[1, 3, 5]] * 3, [10, 10, 2, 2], 512,
          [16, 16, 4, 4], 109, 256, 40000]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], n: int, device: str, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--swaps", type=int, default=200)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--infer-repeats", type=int, default=3)
    args = parser.parse_args()
    dev = args.device
    torch.manual_seed(0)
    cfg = SynthConfig.from_list(V2_40K, version="v2", f0=True)
    base = build_synthesizer(cfg, with_posterior=False).eval()
    lora_cfg = LoRAConfig(r=8, lora_alpha=16, target_modules=["ups", "resblocks"])
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        pth = save_rvc_checkpoint(Path(tmp) / "voice.pth", base)
        plain = build_from_raw(read_rvc_checkpoint(pth), dev)
        plain.remove_weight_norm()  # fair baseline: LoRA models fold weight norm too
        model = SynthesizerLoRA(base, lora_cfg).to(dev).eval()
        adapters = []
        for seed in range(2):
            gen = torch.Generator().manual_seed(seed)
            adapters.append({k: (torch.randn(v.shape, generator=gen) * 0.01).to(dev)
                             for k, v in model.get_lora_state_dict().items()})
        model.load_lora_weights(adapters[0])
        adapter_file = save_adapter(Path(tmp) / "voice.safetensors", model, dtype=torch.float16)

        i = iter(range(10**9))
        swap = timed(lambda: model.load_lora_weights(adapters[next(i) % 2]), args.swaps, dev, warmup=5)

        def reload() -> None:  # what RVC servers do to change voice: torch.load + build + load_state_dict
            raw = read_rvc_checkpoint(pth)
            build_from_raw(raw, dev)

        reloads = timed(reload, args.reloads, dev)
        rows += [("swap p50 / p99 (ms)", f"{1e3 * pct(swap, .5):.3f} / {1e3 * pct(swap, .99):.3f}"),
                 ("reload p50 / p99 (ms)", f"{1e3 * pct(reloads, .5):.1f} / {1e3 * pct(reloads, .99):.1f}"),
                 ("reload / swap (p50)", f"{pct(reloads, .5) / pct(swap, .5):.0f}x")]

        for seconds in (1, 10):
            frames = 100 * seconds
            gen = torch.Generator().manual_seed(1)
            inputs = (torch.randn(1, frames, 768, generator=gen).to(dev), torch.tensor([frames], device=dev),
                      torch.randint(1, 256, (1, frames), generator=gen).to(dev),
                      (100 + 100 * torch.rand(1, frames, generator=gen)).to(dev), torch.tensor([0], device=dev))

            def run(m: torch.nn.Module, args: tuple[torch.Tensor, ...] = inputs) -> Callable[[], object]:
                def go() -> object:
                    with torch.inference_mode():
                        return m.infer(*args)  # type: ignore[operator]
                return go

            t_base = statistics.median(timed(run(plain), args.infer_repeats, dev))
            t_unmerged = statistics.median(timed(run(model), args.infer_repeats, dev))
            model.merge()
            t_merged = statistics.median(timed(run(model), args.infer_repeats, dev))
            model.unmerge()
            rows.append((f"infer {seconds:>2} s audio: base / LoRA unmerged / merged (ms)",
                         f"{1e3 * t_base:.0f} / {1e3 * t_unmerged:.0f} ({100 * (t_unmerged / t_base - 1):+.1f}%)"
                         f" / {1e3 * t_merged:.0f} ({100 * (t_merged / t_base - 1):+.1f}%)"))
        pth_bytes, ad_bytes = pth.stat().st_size, adapter_file.stat().st_size
        rows += [(".pth bytes / adapter bytes (r=8, fp16)",
                  f"{pth_bytes:,} / {ad_bytes:,} ({pth_bytes / ad_bytes:.0f}x)")]
    width = max(len(k) for k, _ in rows)
    print(f"device: {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else 'CPU'}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'measure':<{width}} | value")
    print(f"{'-' * width}-|------")
    for k, v in rows:
        print(f"{k:<{width}} | {v}")


if __name__ == "__main__":
    main()
