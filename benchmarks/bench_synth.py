"""The synthesizer alone: the plain RVC architecture (no LoRA wrappers, weight norm removed, built from the same
checkpoint, `torch.nn`'s own convolutions) beside ours with an empty slot, an adapter, the library layout and
the serving layout.

Full-size v2 40k f0 with random weights (the architecture is what costs; `rvc-lora demo` assets have the same
shapes). Each row runs in alternating pairs with the plain model in one process, so load on a shared machine
hits both sides alike. Run:
    .venv/bin/python benchmarks/bench_synth.py [--seconds 2] [--pairs 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_lora import V2_40K, random_adapter

from rvc_lora import SynthConfig, build_synthesizer, save_rvc_checkpoint
from rvc_lora.checkpoint import build_from_raw, read_rvc_checkpoint
from rvc_lora.convs import use_torch_convolutions
from rvc_lora.voice import LIBRARY_LAYOUT, SynthesizerLoRA, serving_layout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = SynthConfig.from_list(V2_40K, version="v2", f0=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = read_rvc_checkpoint(save_rvc_checkpoint(Path(tmp) / "base.pth",
                                                      build_synthesizer(cfg, with_posterior=False).eval()))
    plain = use_torch_convolutions(build_from_raw(raw).eval())
    plain.remove_weight_norm()
    variants: dict[str, SynthesizerLoRA] = {}
    for label, layout, rank in (("library layout (r=8 ups+resblocks)", LIBRARY_LAYOUT, 8),
                                ("serving layout (r=32 every layer)", serving_layout(cfg, 32), 8)):
        empty = SynthesizerLoRA(build_from_raw(raw), layout=layout, fingerprint=raw.fingerprint).eval()
        variants[f"{label}, empty slots"] = empty
        adapted = SynthesizerLoRA(build_from_raw(raw), layout=layout, fingerprint=raw.fingerprint).eval()
        adapted.load_adapter(random_adapter(adapted, 1, rank))
        variants[f"{label}, r={rank} adapter"] = adapted
    frames = int(100 * args.seconds)
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, frames, 768, generator=gen), torch.tensor([frames]),
              torch.randint(1, 256, (1, frames), generator=gen), 100 + 100 * torch.rand(1, frames, generator=gen),
              torch.tensor([0]))

    def timed(model: torch.nn.Module) -> float:
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.inference_mode():
            model.infer(*inputs)  # type: ignore[operator]
        return time.perf_counter() - start

    timed(plain)
    print(f"CPU, torch {torch.__version__}, threads {torch.get_num_threads()}, {args.seconds:g} s of audio "
          f"({frames} frames), {args.pairs} alternating pairs per row, medians")
    print(f"{'ours':<52} | plain (ms) | ours (ms) | ours / plain")
    print("-" * 53 + "|------------|-----------|-------------")
    for label, model in variants.items():
        timed(model)
        pairs = [(timed(plain), timed(model)) for _ in range(args.pairs)]
        base, ours = statistics.median(p for p, _ in pairs), statistics.median(o for _, o in pairs)
        ratio = statistics.median(o / p for p, o in pairs)
        print(f"{label:<52} | {1e3 * base:>10.0f} | {1e3 * ours:>9.0f} | {ratio:>12.3f}")


if __name__ == "__main__":
    main()
