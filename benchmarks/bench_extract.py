"""Adapter extraction on a full-size RVC v2 40k f0 model: the issue's acceptance run, with timings.

Base: random weights (every tensor non-zero, as in a pretrained model). Voice: `make_synthetic_voice`
(rank-8 delta with 5% of each layer's norm + noise with 1% of the delta's), both saved as RVC `.pth`
(fp16). Acceptance: `rank=8, targets="all"` gives >= 30 dB waveform SNR and an adapter <= 1/15 of the
voice `.pth`. Run:
    .venv/bin/python benchmarks/bench_extract.py [--threads 1] [--frames 32] [--dec] [--energy 0.99]
Prints the report's summary per run and one table; every number comes from this single run. Load
average is printed too: on a shared machine, wall time follows the other processes' load.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from rvc_lora import SynthConfig, build_synthesizer, save_rvc_checkpoint
from rvc_lora.extract import extract_adapter, make_synthetic_voice

V2_40K = [1025, 32, 192, 192, 768, 2, 6, 3, 0, "1", [3, 7, 11], [[1, 3, 5]] * 3, [10, 10, 2, 2], 512,
          [16, 16, 4, 4], 109, 256, 40000]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads during extraction")
    parser.add_argument("--frames", type=int, default=32, help="evaluation input length (10 ms frames)")
    parser.add_argument("--dec", action="store_true", help="also extract targets='dec' at rank 8")
    parser.add_argument("--energy", type=float, default=None, help="also extract with this energy (rank cap 32)")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = SynthConfig.from_list(V2_40K)
    base = build_synthesizer(cfg, with_posterior=False).eval()
    with torch.no_grad():
        for p in base.parameters():
            if not p.any():  # flow.*.post starts at zero in RVC; a trained base has non-zero weights there
                p.normal_(0.0, 0.02)
    t = time.perf_counter()
    voice = make_synthetic_voice(base, rank=8, delta_share=0.05, noise_share=0.01, seed=1)
    synth_s = time.perf_counter() - t
    runs: list[tuple[str, dict[str, object]]] = [("all r=8 (acceptance)", dict(rank=8, targets="all"))]
    if args.dec:
        runs.append(("dec r=8", dict(rank=8, targets="dec")))
    if args.energy is not None:
        runs.append((f"all energy={args.energy} r<=32", dict(rank=32, energy=args.energy, targets="all")))
    print(f"torch {torch.__version__}, {args.threads} extraction threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; synthetic voice made in {synth_s:.2f} s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_path = save_rvc_checkpoint(Path(tmp) / "base.pth", base)
        voice_path = save_rvc_checkpoint(Path(tmp) / "voice.pth", voice)
        for label, kwargs in runs:
            wall, cpu = time.perf_counter(), time.process_time()
            result = extract_adapter(base_path, voice_path, eval_frames=args.frames, progress=False,
                                     threads=args.threads, **kwargs)  # type: ignore[arg-type]
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            report = result.report
            print(f"\n== {label}\n{report.format(per_layer=False)}")
            rows.append((label, report.rank, report.snr_db, report.base_snr_db, report.size_ratio,
                         report.adapter_bytes, report.voice_bytes, report.max_rel_error, report.seconds,
                         report.eval_seconds, wall, cpu))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    print(f"{'run':<28} {'r':>3} {'SNR dB':>7} {'base dB':>7} {'size':>7} {'adapter MB':>10} {'pth MB':>7} "
          f"{'worst err':>9} {'extract s':>9} {'eval s':>7} {'wall s':>7} {'cpu s':>7}")
    for label, r, snr, base_snr, ratio, ab, vb, err, ext, ev, wall, cpu in rows:
        print(f"{label:<28} {r:>3} {snr:>7.1f} {base_snr:>7.1f} {'1/' + format(ratio, '.1f'):>7} {ab / 1e6:>10.3f} "
              f"{vb / 1e6:>7.2f} {err:>9.4f} {ext:>9.2f} {ev:>7.2f} {wall:>7.2f} {cpu:>7.2f}")
    acceptance = rows[0]
    ok = acceptance[2] is not None and acceptance[2] >= 30 and acceptance[4] >= 15
    print(f"acceptance (>= 30 dB, <= 1/15 of the .pth): {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
