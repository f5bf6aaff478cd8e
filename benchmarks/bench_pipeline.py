"""Real-time factor of each pipeline stage for 10 s of audio, full-size v2 40k (the demo assets).

Run:  .venv/bin/python benchmarks/bench_pipeline.py [--assets demo-assets] [--seconds 10] [--device cpu]
RTF = stage seconds / audio seconds (below 1 is faster than real time).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rvc_lora.demo import ensure_demo_assets, speech_like
from rvc_lora.pipeline.audio import encode_audio
from rvc_lora.pipeline.converter import ConvertParams, VoiceConverter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--assets", default="demo-assets")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--f0-methods", default="pm,harvest,fcpe")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    folder = Path(args.assets)
    manifest = ensure_demo_assets(folder)
    vc = VoiceConverter.from_files(folder / manifest["model"], folder / manifest["hubert"], device=args.device)
    adapter = folder / next(iter(manifest["adapters"].values()))
    index = folder / manifest["indexes"]["demo-voice-a"]
    audio = speech_like(args.seconds, 16000, seed=11)
    vc.convert(audio[:16000], 16000, ConvertParams(seed=0), adapter=adapter, index=index)  # warm-up
    print(f"device: {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.seconds:.0f} s of audio, v2 40k full size, adapter r=8 + index (median of {args.repeats})")
    stages = ["decode", "f0", "features", "index", "synth", "postprocess", "encode", "total"]
    print(f"{'f0 method':<10} | " + " | ".join(f"{s:>11}" for s in stages))
    print("-" * 11 + "|" + "|".join(["-" * 13] * len(stages)))
    for method in args.f0_methods.split(","):
        runs = []
        for _ in range(args.repeats):
            result = vc.convert(audio, 16000, ConvertParams(f0_method=method, seed=0, index_rate=0.75),
                                adapter=adapter, index=index)
            start = time.perf_counter()
            encode_audio(result.audio, result.sr, "wav")
            result.timings["encode"] = time.perf_counter() - start
            result.timings["total"] = sum(result.timings.values())
            runs.append(result.timings)
        med = {s: sorted(r[s] for r in runs)[len(runs) // 2] for s in stages}
        print(f"{method:<10} | " + " | ".join(f"{med[s] / args.seconds:>11.3f}" for s in stages))


if __name__ == "__main__":
    main()
