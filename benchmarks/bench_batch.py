"""Batched synthesis across voices vs the same rows one by one: synthesizer throughput in seconds of audio per second.

For each model (tiny, full-size v2 40k f0; random weights, serving layout: every layer plus full deltas), chunk
length and batch size B, B rows of B distinct voices (random adapters filling every slot) are synthesized
  - serially: per row, `swap` the voice into the resident slots and `infer` it (the one-at-a-time worker), and
  - batched: one `AdapterBank.synthesize` over the B rows (slots acquired before timing: loads not counted), its
    way (`vmap` or `by_voice`, see rvc_lora/voice/bank.py) the bank's default for the device (`by_voice` on a
    CPU, `auto` elsewhere: measured per batch shape, its trials run before timing) or `--way`; the table names
    the way it ran.
Rows are seeded; the table also gives the largest difference between a row's batched and serial audio.
On CUDA the table adds the device memory a batch takes at its peak beyond what was allocated before it
("peak MiB": activations per batch), the header the measured device bytes per bank slot, and after the table a
bank slot load (an adapter copied into a free bank slot on the device: `AdapterBank.acquire` of a voice not
resident) beside a single-voice `swap`.
Run:
    .venv/bin/python benchmarks/bench_batch.py [--device cpu|cuda] [--dtype float32|float16] [--models tiny,full]
        [--batches 1,2,4,8,16] [--chunks 1,0.25] [--full-batches 1,2,4] [--repeats 3] [--loads 50]
        [--way default|auto|by_voice|vmap]
`--full-batches` limits the full-size model's batch sizes (the 2-core CPU needs minutes per full-size batch of
16 one-second rows); pass the same list as `--batches` for the whole grid. Prints one table; every number comes
from this single run.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

from rvc_lora import SynthConfig, build_synthesizer
from rvc_lora.adapters import Adapter, AdapterInfo
from rvc_lora.demo import V2_40K_CONFIG
from rvc_lora.frames import FRAMES_PER_S
from rvc_lora.host_memory import DEFAULT_MALLOC_REUSE_BYTES, reuse_freed_memory
from rvc_lora.lora import FULL_DELTA_PREFIX
from rvc_lora.voice import AdapterBank, PreparedAdapter, SynthesizerLoRA, SynthRow, make_row, serving_layout
from rvc_lora.voice.bank import Strategy

TINY_CONFIG = [17, 32, 6, 8, 16, 2, 2, 3, 0, "1", [3, 7, 11], [[1, 3, 5]] * 3, [10, 10, 2, 2], 16, [16, 16, 4, 4],
               3, 8, 40000]  # the test suite's tiny v2 40k geometry
MODELS = {"tiny": (TINY_CONFIG, 4), "full": (V2_40K_CONFIG, 32)}  # config, serving rank
Out = TypeVar("Out")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_loads(model: SynthesizerLoRA, bank: AdapterBank, voices: list[PreparedAdapter], loads: int,
                device: str) -> None:
    """An adapter copied into a bank slot (a voice not resident: every key new), then the resident swap."""
    bank_ms, swap_ms = [], []
    for i in range(loads):
        sync(device)
        t = time.perf_counter()
        slot = bank.acquire(("load", i), voices[i % len(voices)])
        sync(device)
        bank_ms.append(1000 * (time.perf_counter() - t))
        bank.release(slot)
        t = time.perf_counter()
        model.swap(voices[(i + 1) % len(voices)])
        sync(device)
        swap_ms.append(1000 * (time.perf_counter() - t))
    print(f"bank slot load (adapter copied into a free slot) p50 / p99: {percentile(bank_ms, 0.5):.3f} / "
          f"{percentile(bank_ms, 0.99):.3f} ms; resident swap p50 / p99: {percentile(swap_ms, 0.5):.3f} / "
          f"{percentile(swap_ms, 0.99):.3f} ms ({loads} each)", flush=True)


def timed_pair(first: Callable[[], Out], second: Callable[[], Out], repeats: int,
               device: str) -> tuple[float, float, Out, Out]:
    """Median seconds of `repeats` runs of each after one warm-up, the two interleaved so that a shared
    machine's load falls on both alike; then the last outputs of each."""
    outs = [first(), second()]
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for k, fn in enumerate((first, second)):
            sync(device)
            t = time.perf_counter()
            outs[k] = fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return statistics.median(times[0]), statistics.median(times[1]), outs[0], outs[1]


def random_adapter(model: SynthesizerLoRA, seed: int) -> Adapter:
    """A random adapter filling every slot of `model`: LoRA pairs at the slot rank and every full delta."""
    gen = torch.Generator().manual_seed(seed)
    slots = model.slots
    tensors = {f"{n}.lora_A": torch.randn(layer.lora_A.shape, generator=gen) * 0.01
               for n, layer in zip(slots.layer_names, slots.layers, strict=True)}
    tensors |= {f"{n}.lora_B": torch.randn(layer.lora_B.shape, generator=gen) * 0.01
                for n, layer in zip(slots.layer_names, slots.layers, strict=True)}
    tensors |= {FULL_DELTA_PREFIX + n: torch.randn(b.shape, generator=gen) * 0.01
                for n, b in zip(slots.delta_names, slots.bases, strict=True)}
    r, cfg = model.layout.max_rank, model.cfg
    info = AdapterInfo(name=f"random{seed}", r=r, lora_alpha=float(r), target_modules=slots.layer_names,
                       base_fingerprint=model.fingerprint, sr=cfg.sr, version=cfg.version, f0=cfg.f0,
                       full_delta=slots.delta_names)
    return Adapter(info, tensors)


def make_rows(model: SynthesizerLoRA, n: int, frames: int, device: str) -> tuple[list[SynthRow], list[dict[str, Any]]]:
    """n seeded rows of `frames` frames (and the same inputs for the solo `infer`)."""
    rows, solo = [], []
    cfg = model.cfg
    for i in range(n):
        gen = torch.Generator().manual_seed(1000 + i)
        phone = torch.randn(frames, cfg.content_dim, generator=gen)
        nsff0 = 100 + 200 * torch.rand(frames, generator=gen)
        pitch = torch.randint(1, 256, (frames,), generator=gen)
        rows.append(make_row(model, phone, pitch, nsff0, sid=0, generator=torch.Generator().manual_seed(i),
                             device=device))
        solo.append({"phone": phone[None].to(device, model.base.emb_g.weight.dtype),
                     "phone_lengths": torch.tensor([frames], device=device),
                     "pitch": pitch[None].to(device), "nsff0": nsff0[None].to(device),
                     "sid": torch.tensor([0], device=device)})
    return rows, solo


def run_serial(model: SynthesizerLoRA, voices: list[PreparedAdapter], solo: list[dict[str, Any]]) -> list[torch.Tensor]:
    """The rows one by one, as the one-at-a-time worker runs them: swap the row's voice in, seed, `infer`."""
    out = []
    for i, (voice, inputs) in enumerate(zip(voices, solo, strict=True)):
        model.swap(voice)
        torch.manual_seed(i)
        out.append(model.infer(**inputs)[0][0, 0])
    return out


@torch.no_grad()
def bench_model(name: str, batches: list[int], chunks: list[float], repeats: int, device: str,
                dtype: torch.dtype, loads: int, way: str = "default") -> list[str]:
    config, rank = MODELS[name]
    cfg = SynthConfig.from_list(config, version="v2", f0=True)
    torch.manual_seed(0)
    model = SynthesizerLoRA(build_synthesizer(cfg, with_posterior=False), layout=serving_layout(cfg, rank))
    model = model.to(device, dtype).eval()
    most = max(batches)
    voices: list[PreparedAdapter] = [model.prepare(random_adapter(model, seed)) for seed in range(most)]
    before = allocated(device)
    bank = AdapterBank(model, most + 1)
    if way != "default":
        bank.strategy = cast(Strategy, way)  # one of Strategy's values (argparse choices)
    measured = (allocated(device) - before) / (bank.size - 1)  # slot 0 is the model's own memory
    bank.acquire("serial", voices[0])  # pins slot 0 for good: the serial runs swap their voices through it
    slot_note = f" (device allocation per slot measured: {measured / 2**20:.2f} MiB)" if device == "cuda" else ""
    print(f"{name}: serving layout r={rank}, {dtype}, bank of {bank.size} slots, {bank.slot_nbytes / 2**20:.2f} MiB "
          f"per slot{slot_note}, several voices: {bank.strategy}", flush=True)
    lines = []
    for chunk_s in chunks:
        frames = round(chunk_s * FRAMES_PER_S)
        for b in batches:
            rows, solo = make_rows(model, b, frames, device)

            serial = functools.partial(run_serial, model, voices[:b], solo)
            with bank.hold([(i, voices[i]) for i in range(b)]) as slots:
                batch = functools.partial(bank.synthesize, rows, slots)
                for _ in range(2 * bank.chooser.trials if bank.strategy == "auto" else 1):  # warm-up; auto: its trials
                    batch()
                peak = ""
                if device == "cuda":  # activations of one batch, the way the chooser settled on
                    sync(device)
                    base = allocated(device)
                    torch.cuda.reset_peak_memory_stats()
                    batch()
                    sync(device)
                    peak = f" {(torch.cuda.max_memory_allocated() - base) / 2**20:9.1f}"
                t_serial, t_batch, reference, batched = timed_pair(serial, batch, repeats, device)
            diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(batched, reference, strict=True))
            audio_s = b * frames / FRAMES_PER_S
            lines.append(f"{name:5} {chunk_s:6.2f} {b:5d} {audio_s / t_serial:13.2f} {audio_s / t_batch:13.2f} "
                         f"{t_serial / t_batch:8.2f}x {diff:10.1e} {bank.last_way}{peak}")
            print(lines[-1], flush=True)
    if loads:
        bench_loads(model, bank, voices, loads, device)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="tiny,full")
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--full-batches", default="1,2,4", help="batch sizes for the full-size model")
    parser.add_argument("--chunks", default="1,0.25", help="chunk lengths in seconds")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                        help="model and rows (the service runs float16 on CUDA)")
    parser.add_argument("--loads", type=int, default=50, help="bank slot loads timed after the table (0: none)")
    parser.add_argument("--way", choices=["default", "auto", "by_voice", "vmap"], default="default",
                        help="how several voices run (the bank's strategy; default: the bank's own for the device, "
                             "by_voice on a CPU, auto elsewhere)")
    args = parser.parse_args()
    reuse_freed_memory(DEFAULT_MALLOC_REUSE_BYTES)  # as the service and `rvc-lora convert` do
    batches = [int(x) for x in args.batches.split(",")]
    full_batches = [int(x) for x in args.full_batches.split(",")]
    chunks = [float(x) for x in args.chunks.split(",")]
    print(f"device: {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}; median of {args.repeats}; distinct voice per row")
    print("model chunk     B  serial aud/s   batch aud/s  speedup   max|diff| way" +
          ("  peak MiB" if args.device == "cuda" else ""))
    for name in args.models.split(","):
        bench_model(name, full_batches if name == "full" else batches, chunks, args.repeats, args.device,
                    getattr(torch, args.dtype), args.loads, args.way)


if __name__ == "__main__":
    main()
