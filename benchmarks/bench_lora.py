"""Adapter hot swap vs full checkpoint reload vs the raw copy floor, LoRA overhead on `infer`, and file sizes.

Full-size RVC v2 40k f0 configuration with random weights. A swap is `SynthesizerLoRA.swap` of a
`PreparedAdapter` (validated once, when prepared), measured for two layouts: the library default (r=8 on
ups+resblocks) and the serving layout (every layer extraction writes, rank 32, plus full deltas). The floor
is `torch._foreach_copy_` of the same tensors into the same slots with nothing else around it; the reload is
what a server without adapters does to change voice (`torch.load` + build + `load_state_dict`). Run:
    .venv/bin/python benchmarks/bench_lora.py [--device cpu|cuda] [--swaps 300] [--reloads 10]
Prints one table; every number comes from this single run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from rvc_lora import SynthConfig, build_synthesizer, save_rvc_checkpoint
from rvc_lora.adapters import Adapter
from rvc_lora.checkpoint import build_from_raw, read_rvc_checkpoint
from rvc_lora.voice import LIBRARY_LAYOUT, PreparedAdapter, SlotLayout, SynthesizerLoRA, save_adapter, serving_layout

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


def random_adapter(model: SynthesizerLoRA, seed: int, rank: int | None = None) -> Adapter:
    """A random adapter on every slot of `model` (LoRA pairs at `rank`, default the slot rank; every full delta)."""
    from rvc_lora.adapters import AdapterInfo
    from rvc_lora.lora import FULL_DELTA_PREFIX

    gen = torch.Generator().manual_seed(seed)
    slots = model.slots
    r = rank or model.layout.max_rank
    tensors = {f"{n}.lora_A": torch.randn(r, layer.lora_A.shape[1], generator=gen) * 0.01
               for n, layer in zip(slots.layer_names, slots.layers, strict=True)}
    tensors |= {f"{n}.lora_B": torch.randn(layer.lora_B.shape[0], r, generator=gen) * 0.01
                for n, layer in zip(slots.layer_names, slots.layers, strict=True)}
    tensors |= {FULL_DELTA_PREFIX + n: torch.randn(b.shape, generator=gen) * 0.01
                for n, b in zip(slots.delta_names, slots.bases, strict=True)}
    cfg = model.cfg
    info = AdapterInfo(name=f"random{seed}", r=r, lora_alpha=float(r), target_modules=slots.layer_names,
                       base_fingerprint=model.fingerprint, sr=cfg.sr, version=cfg.version, f0=cfg.f0,
                       full_delta=slots.delta_names)
    return Adapter(info, tensors)


def swap_rows(label: str, layout: SlotLayout, fresh: Callable[[], Any], swaps: int, dev: str,
              reload_p50: float, rank: int | None = None) -> list[tuple[str, str]]:
    """Validated swap vs raw copy floor for one layout, two adapters on every slot at `rank`, alternating."""
    model = SynthesizerLoRA(fresh(), layout=layout).to(dev).eval()
    prepared: list[PreparedAdapter] = [model.prepare(random_adapter(model, seed, rank)) for seed in (1, 2)]
    i = iter(range(10**9))
    swap = timed(lambda: model.swap(prepared[next(i) % 2]), swaps, dev, warmup=5)
    dst = _slot_tensors(model, prepared[0])
    j = iter(range(10**9))

    @torch.no_grad()
    def raw_copy() -> None:
        torch._foreach_copy_(dst, list(prepared[next(j) % 2].tensors))

    floor = timed(raw_copy, swaps, dev, warmup=5)
    values = sum(t.numel() for t in prepared[0].tensors)
    # the machine's bound for moving these bytes at all: one contiguous copy, every thread (no per-tensor cost)
    flat = [torch.cat([t.reshape(-1) for t in p.tensors]) for p in prepared]
    flat_dst = torch.empty_like(flat[0])
    k = iter(range(10**9))
    memcpy = timed(lambda: flat_dst.copy_(flat[next(k) % 2]), swaps, dev, warmup=5)
    p50 = pct(swap, .5)
    return [(f"{label}: values copied", f"{values:,}"),
            (f"{label}: validated swap p50 / p99 (ms)", f"{1e3 * p50:.3f} / {1e3 * pct(swap, .99):.3f}"),
            (f"{label}: raw copy floor p50 (ms)", f"{1e3 * pct(floor, .5):.3f}"),
            (f"{label}: one contiguous copy of the same bytes p50 (ms)", f"{1e3 * pct(memcpy, .5):.3f}"),
            (f"{label}: reload / swap (p50)", f"{reload_p50 / p50:,.0f}x"),
            (f"{label}: reload / contiguous copy (the bound, p50)", f"{reload_p50 / pct(memcpy, .5):,.0f}x")]


def _slot_tensors(model: SynthesizerLoRA, prepared: PreparedAdapter) -> list[torch.Tensor]:
    """The slot memory `prepared` fills: the leading rank rows of A, columns of B, then the full deltas."""
    s = model.slots
    pairs = [(s.layers[i], r) for i, r in zip(prepared.layers, prepared.ranks, strict=True)]
    return [*(x.lora_A[:r] for x, r in pairs), *(x.lora_B[:, :r] for x, r in pairs), *s.params, *s.deltas]


WIDTH = 76


class Rows(list[tuple[str, str]]):
    """The table's rows, each printed as it is added: a run cut short by a time limit keeps what it measured."""

    def append(self, row: tuple[str, str]) -> None:
        super().append(row)
        print(f"{row[0]:<{WIDTH}} | {row[1]}", flush=True)

    def __iadd__(self, rows: Iterable[tuple[str, str]]) -> Rows:  # type: ignore[override,misc]
        for row in rows:
            self.append(row)
        return self


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--swaps", type=int, default=300)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--infer-repeats", type=int, default=3)
    parser.add_argument("--infer-seconds", default="1,10", help="audio lengths of the infer rows")
    args = parser.parse_args()
    dev = args.device
    torch.manual_seed(0)
    cfg = SynthConfig.from_list(V2_40K, version="v2", f0=True)
    base = build_synthesizer(cfg, with_posterior=False).eval()
    print(f"device: {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else 'CPU'}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'measure':<{WIDTH}} | value")
    print(f"{'-' * WIDTH}-|------", flush=True)
    rows = Rows()
    with tempfile.TemporaryDirectory() as tmp:
        pth = save_rvc_checkpoint(Path(tmp) / "voice.pth", base)
        def reload() -> None:  # what RVC servers do to change voice: torch.load + build + load_state_dict
            raw = read_rvc_checkpoint(pth)
            build_from_raw(raw, dev)

        reloads = timed(reload, args.reloads, dev)
        reload_p50 = pct(reloads, .5)
        rows.append(("reload p50 / p99 (ms)", f"{1e3 * reload_p50:.1f} / {1e3 * pct(reloads, .99):.1f}"))
        serving = serving_layout(cfg, 32)
        for label, layout, rank in (("r=8 ups+resblocks", LIBRARY_LAYOUT, None),
                                    ("serving r=32 slots, r=32 adapter, all layers", serving, 32),
                                    ("serving r=32 slots, r=8 adapter, all layers", serving, 8)):
            rows += swap_rows(label, layout, lambda: build_from_raw(read_rvc_checkpoint(pth)), args.swaps, dev,
                              reload_p50, rank)
        model = SynthesizerLoRA(build_from_raw(read_rvc_checkpoint(pth)), layout=LIBRARY_LAYOUT).to(dev).eval()
        plain = build_from_raw(read_rvc_checkpoint(pth), dev)
        plain.remove_weight_norm()  # fair baseline: LoRA models fold weight norm too
        model.load_adapter(random_adapter(model, 0))
        adapter_file = save_adapter(Path(tmp) / "voice.safetensors", model, dtype=torch.float16)

        for seconds in (int(x) for x in args.infer_seconds.split(",")):
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
        rows += [(".pth bytes / adapter bytes (r=8 ups+resblocks, fp16)",
                  f"{pth_bytes:,} / {ad_bytes:,} ({pth_bytes / ad_bytes:.0f}x)")]


if __name__ == "__main__":
    main()
