"""A store of thousands of adapters: start-up, listing, lookups, delete and memory of the service.

    .venv/bin/python -m benchmarks.bench_store_scale --adapters 5000

Builds a store of `--adapters` tiny adapters (rank 1, distinct bytes) through `AdapterStore.stage/commit` in a
temp folder (fsync skipped while building it: the store's own durability is not what is measured), then, in
this process, starts the app on the fake engine of the service tests and times each route in-process
(`TestClient`: no network). For each operation it also counts the files opened and the directory listings made
under the store (audit hooks `open` and `os.scandir`): a per-request cost that grows with the store shows there.
Prints a table; nothing is kept.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from rvc_lora.adapters import AdapterInfo, save_adapter_tensors
from service.store import SETTLED_S, AdapterStore
from tests.test_service_engine import FAKE_FINGERPRINT, FAKE_LAYER, FakeEngine, running_app

_counting: list[Path] = []
_counts = {"open": 0, "os.scandir": 0}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _counting and event in _counts and args and str(args[0]).startswith(str(_counting[0])):
        _counts[event] += 1


@contextmanager
def counting(root: Path) -> Iterator[dict[str, float]]:
    """Files opened and directories listed under `root` inside the block."""
    for key in _counts:
        _counts[key] = 0
    _counting.append(root)
    out: dict[str, float] = {}
    try:
        yield out
    finally:
        _counting.clear()
        out.update(_counts)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def adapter_bytes(folder: Path, i: int) -> bytes:
    gen = torch.Generator().manual_seed(i)
    tensors = {f"{FAKE_LAYER}.lora_A": torch.randn(1, 12, generator=gen),
               f"{FAKE_LAYER}.lora_B": torch.randn(6, 1, generator=gen)}
    info = AdapterInfo(name=f"voice-{i}", r=1, lora_alpha=1.0, target_modules=(FAKE_LAYER,),
                       base_fingerprint=FAKE_FINGERPRINT, sr=40000, version="v2", f0=True)
    return save_adapter_tensors(folder / "a.safetensors", tensors, info).read_bytes()


def build_store(root: Path, n: int) -> float:
    """`n` adapters named voice-<i>, committed one by one -> seconds taken."""
    engine, scratch = FakeEngine(), root.parent / "scratch"
    scratch.mkdir()
    store = AdapterStore(root)
    fsync, os.fsync = os.fsync, lambda fd: None
    start = time.perf_counter()
    try:
        for i in range(n):
            staged = store.stage(io.BytesIO(adapter_bytes(scratch, i)), 1 << 20, "adapter file")
            store.commit(staged, None, f"voice-{i}", engine.describe_adapter(staged.path))
    finally:
        os.fsync = fsync
    return time.perf_counter() - start


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median milliseconds of `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result


def wav(seconds: float = 0.1) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(np.arange(int(16000 * seconds)) * 0.1)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    n, reps = args.adapters, args.repeats
    sys.addaudithook(_audit)
    rows: list[tuple[str, str, str, str]] = []

    def row(what: str, ms: float | str, counts: dict[str, float] | None, note: str = "") -> None:
        io_ = "" if counts is None else f"{counts['open']:g} / {counts['os.scandir']:g}"
        rows.append((what, ms if isinstance(ms, str) else f"{ms:.2f}", io_, note))

    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        tmp_path = Path(tmp)
        root = tmp_path / "store"
        build_s = build_store(root, n)
        row(f"build: {n} commits through AdapterStore", build_s * 1000, None, f"{build_s / n * 1000:.2f} ms each")
        time.sleep(SETTLED_S)  # steady state: nothing changed in the store for a while

        with counting(root) as c:
            ms, _ = timed(lambda: AdapterStore(root), 1)
        row("AdapterStore(root): start-up scan", ms, c)

        rss_before = rss_mb()
        audio = wav()
        start = time.perf_counter()
        with counting(root) as c, running_app(tmp_path, adapter_dir=root, warmup=False) as client:
            started_ms = (time.perf_counter() - start) * 1000
        row("app start (lifespan, fake engine) until ready", started_ms, c)  # the opens: start and stop
        with running_app(tmp_path, adapter_dir=root, warmup=False) as client:
            rss_up = rss_mb()
            row("RSS: app with the store loaded (MB)", f"{rss_up:.0f}", None,
                f"{rss_up - rss_before:+.1f} MB vs before the app")

            def measure(what: str, fn: Callable[[], Any], note: Callable[[Any], str] = lambda _: "") -> Any:
                with counting(root) as c:
                    ms, result = timed(fn, reps)
                per_call = {k: round(v / reps, 2) for k, v in c.items()}
                row(what, ms, per_call, note(result))
                return result

            r = measure("GET /adapters (default)", lambda: client.get("/adapters"),
                        lambda r: f"{r.status_code}, {len(r.content):,} bytes, {len(r.json()['adapters'])} items")

            def walk() -> tuple[int, int]:
                offset, pages, size = 0, 0, 0
                while offset is not None:
                    r = client.get("/adapters", params={"offset": offset, "limit": 1000})
                    body = r.json()
                    offset, pages, size = body.get("next_offset"), pages + 1, size + len(r.content)
                return pages, size

            if "next_offset" in r.json():
                measure("GET /adapters: every page (limit=1000)", walk, lambda p: f"{p[0]} pages, {p[1]:,} bytes")
            mid = n // 2
            rec_id = client.get(f"/adapters/voice-{mid}").json()["id"]
            measure("GET /adapters/{id}", lambda: client.get(f"/adapters/{rec_id}"), lambda r: str(r.status_code))
            measure("GET /adapters/{name}", lambda: client.get(f"/adapters/voice-{mid}"), lambda r: str(r.status_code))
            measure("GET /adapters/{unknown name}", lambda: client.get("/adapters/nobody"),
                    lambda r: str(r.status_code))
            measure("GET /adapters/{unknown id}", lambda: client.get("/adapters/0123456789abcdef"),
                    lambda r: str(r.status_code))

            def convert(ref: str) -> Any:
                return client.post("/convert", data={"adapter": ref}, files={"audio": ("a.wav", audio)})

            measure("POST /convert adapter=<id> (0.1 s audio)", lambda: convert(rec_id), lambda r: str(r.status_code))
            measure("POST /convert adapter=<name>", lambda: convert(f"voice-{mid}"), lambda r: str(r.status_code))
            measure("POST /convert adapter=<unknown name>", lambda: convert("nobody"), lambda r: str(r.status_code))
            victims = iter(range(reps))
            measure("DELETE /adapters/{name}", lambda: client.delete(f"/adapters/voice-{next(victims)}"),
                    lambda r: str(r.status_code))

    width = max(len(r[0]) for r in rows)
    out = [f"adapters: {n}; median of {args.repeats} calls; in-process TestClient, fake engine; "
           "'opens / listings': files opened and directory listings under the store per call",
           f"{'operation':<{width}} | {'ms':>9} | opens / listings | note",
           f"{'-' * width}-|-{'-' * 9}-|------------------|-----"]
    out += [f"{w:<{width}} | {ms:>9} | {io_:>16} | {note}" for w, ms, io_, note in rows]
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
