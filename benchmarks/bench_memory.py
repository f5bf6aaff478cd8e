"""Peak memory of one conversion by input length, full-size v2 40k (the demo assets).

Run:  .venv/bin/python benchmarks/bench_memory.py [--assets demo-assets] [--seconds 10,41,120] [--device cpu]

Each length runs in a fresh child process (so one length's allocator cache does not hide the next one's
peak) that samples its resident set every 20 ms; on CUDA the device's peak allocation is reported too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def measure(assets: Path, seconds: float, device: str) -> dict[str, float]:
    """In this process: load the models, convert `seconds` of speech-like audio, return the numbers."""
    from rvc_lora.demo import ensure_demo_assets, speech_like
    from rvc_lora.pipeline.converter import ConvertParams, VoiceConverter

    manifest = ensure_demo_assets(assets)
    vc = VoiceConverter.from_files(assets / manifest["model"], assets / manifest["hubert"], device=device)
    audio = speech_like(seconds, 16000, seed=11)
    loaded = _rss_mb()
    peak = [loaded]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _rss_mb())

    threading.Thread(target=sample, daemon=True).start()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    vc.convert(audio, 16000, ConvertParams(seed=0))
    wall = time.perf_counter() - start
    done.set()
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")
    return {"seconds": seconds, "wall_s": wall, "loaded_mb": loaded, "peak_mb": max(peak[0], _rss_mb()),
            "gpu_peak_mb": gpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--assets", default="demo-assets")
    parser.add_argument("--seconds", default="10,41,120", help="comma-separated input lengths")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.assets), float(args.seconds), args.device)))
        return
    print(f"device: {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, v2 40k full size")
    print("| audio (s) | wall (s) | RSS loaded (MB) | RSS peak (MB) | peak - loaded (MB) | GPU peak (MB) |")
    print("|-----------|----------|-----------------|---------------|--------------------|---------------|")
    for seconds in args.seconds.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", "--assets", args.assets, "--seconds", seconds,
                              "--device", args.device], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {r['seconds']:>9.0f} | {r['wall_s']:>8.1f} | {r['loaded_mb']:>15.0f} | {r['peak_mb']:>13.0f} | "
              f"{r['peak_mb'] - r['loaded_mb']:>18.0f} | {r['gpu_peak_mb']:>13.0f} |", flush=True)


if __name__ == "__main__":
    main()
