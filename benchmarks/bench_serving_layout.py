"""What the service's serving slot layout costs: `infer` with LoRA slots on every extractable layer (enc_p, flow,
dec, all at max_rank, plus full-delta slots) vs the `ups`/`resblocks` layout, on the full-size demo base.

    python benchmarks/bench_serving_layout.py [--assets demo-assets] [--seconds 1 3] [--repeats 5] [--threads N]

In eval mode every LoRA conv runs one conv with `W + B A` (the delta is rebuilt per call: O(weights * r), not
O(T)); LoRA Linear/Embedding layers add a rank-r branch. Prints median seconds per call and the overhead.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from rvc_lora.checkpoint import build_from_raw, read_rvc_checkpoint
from rvc_lora.demo import ensure_demo_assets
from rvc_lora.extract import fixed_inputs
from rvc_lora.voice import LIBRARY_LAYOUT, SynthesizerLoRA, serving_layout


def median_s(model: torch.nn.Module, inputs: dict[str, torch.Tensor], repeats: int) -> float:
    times = []
    with torch.inference_mode():
        model.infer(**inputs)  # warm-up
        for _ in range(repeats):
            torch.manual_seed(0)
            start = time.perf_counter()
            model.infer(**inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", type=Path, default=Path("demo-assets"))
    p.add_argument("--seconds", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-rank", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = ensure_demo_assets(args.assets)
    raw = read_rvc_checkpoint(args.assets / manifest["model"])
    layouts = {"ups+resblocks (old default)": LIBRARY_LAYOUT.lora,
               "serving (all targets + full deltas)": serving_layout(raw.config, args.max_rank).lora}
    models: dict[str, torch.nn.Module] = {"no LoRA slots (plain RVC model)": build_from_raw(raw)}
    models.update({name: SynthesizerLoRA(build_from_raw(raw), cfg, max_rank=args.max_rank,
                                         fingerprint=raw.fingerprint).eval() for name, cfg in layouts.items()})
    slots = {name: (len(m.slot_ranks()), len(m.full_delta_names())) if isinstance(m, SynthesizerLoRA) else (0, 0)
             for name, m in models.items()}
    print(f"full-size demo base (v2 40k), max_rank={args.max_rank}, CPU threads={torch.get_num_threads()}, "
          f"median of {args.repeats}\n")
    print("| audio | layout | LoRA layers | full-delta slots | infer (s) | overhead |")
    print("|---|---|---|---|---|---|")
    for seconds in args.seconds:
        inputs = fixed_inputs(raw.config, frames=int(seconds * 100), seed=0)
        base_s = None
        for name, model in models.items():
            s = median_s(model, inputs, args.repeats)  # type: ignore[arg-type]
            base_s = base_s or s
            print(f"| {seconds:g} s | {name} | {slots[name][0]} | {slots[name][1]} | {s:.3f} | "
                  f"{100 * (s / base_s - 1):+.1f}% |")


if __name__ == "__main__":
    main()
