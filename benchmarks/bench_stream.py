"""Realtime streams: how many concurrent streams (each its own voice) hold realtime on one device.

Run:  .venv/bin/python benchmarks/bench_stream.py [--models tiny,full] [--modes serial,batched] [--device cpu]
      [--max-streams 64] [--max-batch-frames 8000] [--streams 1,4,8]

Every stream: block 0.25 s, crossfade 0.05 s, extra 2.5 s, pm, 48 kHz mono into the 40 kHz model, its own LoRA
adapter (random, rank 8). The streams' blocks arrive together every block time (the worst alignment) and run on
one thread, as the service's device thread runs them, in one of two modes:
- serial: each block whole (`StreamConverter.process`), one stream after another (the service with
  RVC_LORA_BATCHING=false);
- batched: every stream's `begin` with one content-encoder forward for all of them (`begin_blocks`), then their
  rows synthesized together through an `AdapterBank` (one slot per voice) in batches of at most
  `--max-batch-frames` padded frames, then every `finish` (the service's pipelined worker:
  `RVC_LORA_BATCHING=true`, `RVC_LORA_BANK_SLOTS` >= the voices).
N streams hold realtime when the p99 of (block output ready - block input complete) stays below the block time
over the measured rounds. The search doubles N, then bisects.
"full" is the demo assets' full-size v2 40k base and 768-d HuBERT base (written to
--assets first if missing); "tiny" is a random v1 40k model of test size (ResBlock 2) with a 9-layer 64-wide HuBERT.
End-to-end latency (spec §6.8) = one block of buffering + crossfade + 10 ms - SOLA offset + server time.
On CUDA each N's line also gives the device memory a stream keeps between blocks and the peak over its rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rvc_lora import save_adapter
from rvc_lora.demo import ensure_demo_assets, speech_like
from rvc_lora.host_memory import DEFAULT_MALLOC_REUSE_BYTES, reuse_freed_memory
from rvc_lora.pipeline.converter import VoiceConverter
from rvc_lora.stream import StreamConverter, StreamParams
from rvc_lora.stream.converter import STAGES, StreamBlock, begin_blocks
from rvc_lora.voice import AdapterBank

PARAMS = StreamParams(block_time=0.25, crossfade_time=0.05, extra_time=2.5, f0_method="pm", seed=0)
SR = 48000
TINY = [17, 32, 16, 32, 32, 2, 2, 3, 0, "2", [3, 5], [[1, 2], [2, 6]], [10, 10, 2, 2], 32, [16, 16, 4, 4], 1, 16,
        40000]  # v1 40k geometry, test-size widths, ResBlock 2
TINY_HUBERT = {"hidden_size": 64, "num_hidden_layers": 9, "num_attention_heads": 2, "intermediate_size": 32,
               "conv_dim": (16,) * 7, "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 4,
               "classifier_proj_size": 256}


def load(kind: str, assets: Path, device: str) -> VoiceConverter:
    if kind == "full":
        manifest = ensure_demo_assets(assets)
        return VoiceConverter.from_files(assets / manifest["model"], assets / manifest["hubert"], device=device)
    from rvc_lora.config import SynthConfig
    from rvc_lora.models.synthesizer import build_synthesizer
    from rvc_lora.pipeline.content import build_random_hubert
    from rvc_lora.voice import LIBRARY_LAYOUT, SynthesizerLoRA

    torch.manual_seed(0)
    synth = build_synthesizer(SynthConfig.from_list(TINY, version="v1", f0=True), with_posterior=False)
    return VoiceConverter(SynthesizerLoRA(synth, LIBRARY_LAYOUT.lora), build_random_hubert(TINY_HUBERT, seed=0),
                          device=device)


def voices(vc: VoiceConverter, n: int, folder: Path) -> list[Path]:
    """n distinct random rank-8 adapters for this base."""
    files = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        vc.model.load_lora_weights({k: torch.randn(v.shape, generator=gen) * 0.02
                                    for k, v in vc.model.get_lora_state_dict().items()})
        files.append(save_adapter(folder / f"v{i}.safetensors", vc.model, name=f"v{i}"))
    vc.model.reset_adapter()
    return files


def serial_round(streams: list[StreamConverter], x: np.ndarray, done: list[float]) -> list[StreamBlock]:
    """One block per stream, each whole, one after another; `done` gets each block's finishing time."""
    out = []
    for s in streams:
        out.append(s.process(x))
        done.append(time.perf_counter())
    return out


def batched_round(streams: list[StreamConverter], x: np.ndarray, done: list[float], bank: AdapterBank,
                  max_frames: int) -> list[StreamBlock]:
    """Every stream's `begin` with one content-encoder forward for all (`begin_blocks`: their histories have one
    length), their rows in batches of at most `max_frames` padded frames through `bank`, then every `finish`;
    `done` gets each block's finishing time. A row's synth (and features) time is its batch's time / rows."""
    steps = begin_blocks(streams, [x] * len(streams))
    rows = [s.row(step) for s, step in zip(streams, steps, strict=True)]
    audio: list[torch.Tensor] = []
    per = max(1, max_frames // max(int(step.feats.shape[1]) for step in steps))
    for lo in range(0, len(rows), per):
        part = [r for r in rows[lo : lo + per] if r is not None]
        assert len(part) == len(rows[lo : lo + per]), "formant 0: every block has a row"
        start = time.perf_counter()
        with bank.hold([(s.bank_key, s.adapter) for s in streams[lo : lo + per]]) as slots:
            audio += [a.float() for a in bank.synthesize(part, slots)]
        if streams[0].device.type == "cuda":
            torch.cuda.synchronize(streams[0].device)
        for step in steps[lo : lo + per]:
            step.clock.times["synth"] += (time.perf_counter() - start) / len(part)
    out = []
    for s, step, a in zip(streams, steps, audio, strict=True):
        out.append(s.finish(step, a))
        done.append(time.perf_counter())
    return out


def run(vc: VoiceConverter, adapters: list[Path], n: int, rounds: int, bank: AdapterBank | None,
        max_frames: int) -> dict[str, float]:
    """n streams, `rounds` measured block rounds after one warm-up round -> latency stats and mean stage times
    (`bank`: batched mode, else serial); on CUDA also the device memory each stream keeps between blocks
    (`mem_stream`: its histories and caches) and the peak over the rounds beyond what was allocated before the
    streams opened (`mem_peak`), in bytes."""
    cuda = vc.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(vc.device)
        before = torch.cuda.memory_allocated(vc.device)
        torch.cuda.reset_peak_memory_stats(vc.device)
    streams = [StreamConverter(vc, PARAMS, sr=SR, adapter=adapters[i % len(adapters)],
                               bank_key=str(adapters[i % len(adapters)])) for i in range(n)]
    block = streams[0].block_frame
    audio = speech_like((rounds + 1) * block / SR + 0.01, SR, seed=3).astype(np.float32)

    def one_round(x: np.ndarray, done: list[float]) -> list[StreamBlock]:
        return serial_round(streams, x, done) if bank is None else batched_round(streams, x, done, bank, max_frames)

    one_round(audio[:block], [])  # warm-up round, not timed
    kept = (torch.cuda.memory_allocated(vc.device) - before) / n if cuda else 0.0
    latencies: list[float] = []
    offsets: list[int] = []
    stages = dict.fromkeys((*STAGES, "total"), 0.0)
    start = time.perf_counter()
    for r in range(1, rounds + 1):
        arrival = start + (r - 1) * PARAMS.block_time
        time.sleep(max(0.0, arrival - time.perf_counter()))
        done: list[float] = []
        for out in one_round(audio[r * block : (r + 1) * block], done):
            offsets.append(out.offset)
            for k, v in out.timings.items():
                stages[k] += v
        latencies += [t - arrival for t in done]
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    count = len(latencies)
    peak = float(torch.cuda.max_memory_allocated(vc.device) - before) if cuda else 0.0
    return {"p50": statistics.median(latencies), "p99": p99, "offset": statistics.mean(offsets),
            "mem_stream": kept, "mem_peak": peak, **{k: v / count for k, v in stages.items()}}


def search(vc: VoiceConverter, adapters: list[Path], rounds: int, max_n: int, budget_s: float,
           bank: AdapterBank | None, max_frames: int, fixed: list[int]) -> tuple[int, dict]:  # type: ignore[type-arg]
    """The largest N (doubling, then bisecting) whose p99 stays below the block time, within `budget_s`; with
    `fixed`, the largest of those Ns that holds (each measured, 1 always: the table's single-stream columns)."""
    deadline = time.perf_counter() + budget_s
    results: dict[int, dict[str, float]] = {}

    def holds(n: int) -> bool:
        if n not in results:
            results[n] = run(vc, adapters, n, rounds, bank, max_frames)
            r = results[n]
            print(f"  N={n:>3}: p50 {r['p50'] * 1000:7.1f} ms, p99 {r['p99'] * 1000:7.1f} ms, "
                  f"block compute {r['total'] * 1000:6.1f} ms" + (
                      f", device memory {r['mem_stream'] / 2**20:.1f} MiB kept per stream, peak "
                      f"{r['mem_peak'] / 2**20:.0f} MiB" if r["mem_peak"] else ""), flush=True)
        return results[n]["p99"] < PARAMS.block_time

    if fixed:
        return max([n for n in sorted({1, *fixed}) if holds(n)], default=0), results
    good, bad = 0, None
    n = 1
    while n <= max_n and time.perf_counter() < deadline and holds(n):
        good, n = n, n * 2
    bad = n if n <= max_n and good < n else None
    while bad is not None and bad - good > 1 and time.perf_counter() < deadline:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if holds(mid) else (good, mid)
    return good, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,full")
    parser.add_argument("--assets", default="demo-assets")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=8, help="measured block rounds per N")
    parser.add_argument("--max-streams", type=int, default=256)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of search per model and mode")
    parser.add_argument("--modes", default="serial,batched", help="serial (blocks one by one), batched (rows of "
                        "all streams synthesized together)")
    parser.add_argument("--max-batch-frames", type=int, default=8000, help="batched: padded frames per batch, as "
                        "RVC_LORA_MAX_BATCH_FRAMES")
    parser.add_argument("--streams", default="", help="comma-separated Ns to measure instead of the search "
                        "(block compute and server time at N streams, e.g. 1,4,8 to compare modes under load)")
    args = parser.parse_args()
    reuse_freed_memory(DEFAULT_MALLOC_REUSE_BYTES)  # as the service does
    fixed = [int(n) for n in args.streams.split(",") if n]
    modes = args.modes.split(",")
    if not set(modes) <= {"serial", "batched"}:
        parser.error(f"--modes: serial and/or batched, got {args.modes}")
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}; block "
          f"{PARAMS.block_time} s, crossfade {PARAMS.crossfade_time} s, extra {PARAMS.extra_time} s, pm, {SR} Hz")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            vc = load(kind, Path(args.assets), args.device)
            adapters = voices(vc, min(args.max_streams, 32), Path(tmp))
            bank = AdapterBank(vc.model, len(adapters)) if "batched" in modes else None  # one slot per voice
            for mode in modes:
                print(f"{kind}, {mode}:", flush=True)
                n, results = search(vc, adapters, args.rounds, args.max_streams, args.budget,
                                    bank if mode == "batched" else None, args.max_batch_frames, fixed)
                single = results[1]
                sizes = StreamConverter(vc, PARAMS, sr=SR).sizes
                algorithmic = (sizes.crossfade_frame + sizes.zc - single["offset"]) / SR
                rows.append((kind, mode, n, single, algorithmic, results.get(n, single)))
            del vc, bank
    print()
    print("| model | mode | streams holding realtime | block compute (1 stream) | " + " | ".join(STAGES)
          + " | p99 server time at that N | end-to-end latency (1 stream, p50) |")
    print("|---|---|---|---|" + "---|" * len(STAGES) + "---|---|")
    for kind, mode, n, single, algorithmic, at_n in rows:
        e2e = PARAMS.block_time + algorithmic + single["p50"]
        print(f"| {kind} | {mode} | {n} | {single['total'] * 1000:.1f} ms | "
              + " | ".join(f"{single[s] * 1000:.1f} ms" for s in STAGES)
              + f" | {at_n['p99'] * 1000:.0f} ms | {e2e * 1000:.0f} ms ({PARAMS.block_time * 1000:.0f} buffering + "
              f"{algorithmic * 1000:.0f} algorithmic + {single['p50'] * 1000:.0f} server) |")


if __name__ == "__main__":
    main()
