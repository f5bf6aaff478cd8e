"""Soak test: a bounded open-loop run at about twice the measured capacity, mixed adapters, loopback only.

    python benchmarks/soak.py --seconds 600                  # starts its own server on tiny models
    python benchmarks/soak.py --url http://127.0.0.1:8000    # or drives a running server (adapters from its store)

1. Every distinct request (adapter or base voice x audio x seed) is sent alone: its bytes are the reference,
   and the mean latency of these solo requests gives the capacity (requests per second, one at a time).
2. Server RSS after this warm-up is the memory baseline.
3. Requests arrive as a Poisson process at `--load` x capacity (default 2x) for `--seconds` or until
   `--max-requests`, each a random one of the distinct requests, with at most `--max-in-flight` open.
4. Checked: every 200 has exactly its reference bytes; every refusal is 503 with Retry-After; no other 5xx (or
   any other status); server RSS after the run within 10% of the baseline; p50/p99 latency of accepted requests.

Prints a table; exits 1 when a check fails. Talks to 127.0.0.0/8 or ::1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import soundfile as sf

TINY_CONFIG = [17, 32, 6, 8, 16, 2, 2, 3, 0, "2", [3, 5], [[1, 2], [2, 6]], [10, 10, 2, 2], 16, [16, 16, 4, 4], 3, 8,
               40000]  # v1 f0 40k decoder geometry, tiny widths (as the service tests use)
TINY_HUBERT = {"hidden_size": 64, "num_hidden_layers": 9, "num_attention_heads": 2, "intermediate_size": 32,
               "conv_dim": (16,) * 7, "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 4,
               "classifier_proj_size": 256}


def make_tiny_assets(folder: Path, n_adapters: int) -> dict[str, object]:
    """A tiny random v1 base, content encoder and `n_adapters` rank-4 adapters (ups + resblocks)."""
    import torch

    from rvc_lora.checkpoint import save_rvc_checkpoint
    from rvc_lora.config import SynthConfig
    from rvc_lora.lora import LoRAConfig
    from rvc_lora.models.synthesizer import build_synthesizer
    from rvc_lora.pipeline.content import build_random_hubert, save_fairseq_hubert
    from rvc_lora.voice import load_synthesizer_with_lora, save_adapter

    gen = torch.Generator().manual_seed(0)
    model = build_synthesizer(SynthConfig.from_list(TINY_CONFIG, version="v1", f0=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("weight_g", "gamma")):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise * 0.6 / max(p[0].numel() if p.dim() > 1 else 4, 1) ** 0.5)
    base = save_rvc_checkpoint(folder / "base.pth", model.eval())
    hubert = save_fairseq_hubert(build_random_hubert(TINY_HUBERT, seed=1), folder / "hubert.pt")
    synth = load_synthesizer_with_lora(base, LoRAConfig(r=4, lora_alpha=4, target_modules=["ups", "resblocks"]))
    adapters = {}
    for i in range(n_adapters):
        synth.load_lora_weights({k: torch.randn(v.shape, generator=gen) * 0.1
                                 for k, v in synth.get_lora_state_dict().items()})
        adapters[f"soak-{i}"] = str(save_adapter(folder / f"soak-{i}.safetensors", synth, name=f"soak-{i}"))
    return {"model": str(base), "hubert": str(hubert), "adapters": adapters}


def speech(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = rng.uniform(110, 220) * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / 16000) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def loopback_only(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise SystemExit(f"{url}: soak.py only talks to loopback addresses")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pct(values: list[float], q: float) -> float:
    xs = sorted(values) or [float("nan")]
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass(frozen=True)
class Variant:
    adapter: str | None
    audio: int
    seed: int


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    server_s: list[float] = field(default_factory=list)  # sum of the Server-Timing stages
    queue_s: list[float] = field(default_factory=list)
    mismatched: int = 0
    no_retry_after: int = 0
    transport_errors: int = 0


async def send(client: httpx.AsyncClient, v: Variant, audios: list[bytes]) -> httpx.Response:
    data = {"seed": str(v.seed), "format": "wav"} | ({"adapter": v.adapter} if v.adapter else {})
    return await client.post("/convert", data=data, files={"audio": ("in.wav", audios[v.audio])})


async def soak(url: str, pid: int | None, args: argparse.Namespace) -> bool:
    audios = [speech(args.audio_s, seed) for seed in range(2)]
    async with httpx.AsyncClient(base_url=url, timeout=300,
                                 limits=httpx.Limits(max_connections=args.max_in_flight)) as client:
        ids = [a["id"] for a in (await client.get("/adapters")).json()["adapters"]][: args.adapters]
        variants = [Variant(a, audio, seed) for a in [None, *ids] for audio in range(len(audios)) for seed in (1, 2)]
        reference: dict[Variant, bytes] = {}
        solo: list[float] = []
        for _ in range(2):  # the first pass warms caches and allocator; the second is timed
            solo.clear()
            for v in variants:
                start = time.perf_counter()
                r = await send(client, v, audios)
                solo.append(time.perf_counter() - start)
                if r.status_code != 200:
                    raise SystemExit(f"reference request {v} failed: {r.status_code} {r.text[:200]}")
                if reference.setdefault(v, r.content) != r.content:
                    raise SystemExit(f"reference request {v} is not deterministic")
        capacity = 1 / statistics.mean(solo)
        rss_warm = rss_mb(pid) if pid else float("nan")
        rate = args.load * capacity
        print(f"{len(variants)} distinct requests ({len(ids)} adapters + base, {len(audios)} audios x 2 seeds, "
              f"{args.audio_s:g} s each); capacity {capacity:.2f} req/s alone; offering {rate:.2f} req/s "
              f"for {args.seconds:g} s (at most {args.max_requests} requests)", flush=True)

        tally, rss_peak, in_flight = Tally(), rss_warm, set()
        rng = random.Random(0)

        async def one(v: Variant) -> None:
            start = time.perf_counter()
            try:
                r = await send(client, v, audios)
            except httpx.TransportError:
                tally.transport_errors += 1
                return
            tally.statuses[r.status_code] += 1
            if r.status_code == 200:
                tally.latencies.append(time.perf_counter() - start)
                stages = dict(part.split(";dur=") for part in r.headers["Server-Timing"].split(", "))
                tally.queue_s.append(float(stages["queue"]) / 1000)
                tally.server_s.append(sum(float(ms) for ms in stages.values()) / 1000)
                tally.mismatched += r.content != reference[v]
            elif r.status_code == 503 and "Retry-After" not in r.headers:
                tally.no_retry_after += 1

        began = time.monotonic()
        sent = 0
        next_report = began + 60
        while time.monotonic() - began < args.seconds and sent < args.max_requests:
            await asyncio.sleep(rng.expovariate(rate))
            if len(in_flight) >= args.max_in_flight:  # the client's own bound; counted as offered but not sent
                tally.statuses[-1] += 1
                continue
            task = asyncio.create_task(one(rng.choice(variants)))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            sent += 1
            if pid and time.monotonic() > next_report:
                rss_peak = max(rss_peak, rss_mb(pid))
                next_report += 60
                print(f"  {time.monotonic() - began:5.0f} s: {sent} sent, {dict(tally.statuses)}, "
                      f"RSS {rss_mb(pid):.0f} MB", flush=True)
        await asyncio.gather(*in_flight)
        wall = time.monotonic() - began
        rss_after = rss_mb(pid) if pid else float("nan")

    ok200 = tally.statuses[200]
    rejected = tally.statuses[503]
    other = sum(n for s, n in tally.statuses.items() if s not in (200, 503, -1)) + tally.transport_errors
    lat = sorted(tally.latencies) or [float("nan")]
    p50, p99 = pct(lat, 0.5), pct(lat, 0.99)
    growth = (rss_after - rss_warm) / rss_warm
    checks = {"accepted bytes identical to solo": tally.mismatched == 0,
              "every refusal is 503 + Retry-After": tally.no_retry_after == 0,
              "no other status, no 5xx": other == 0,
              "RSS after within 10% of after warm-up": not pid or abs(growth) <= 0.10}
    print("\n| requests | accepted | rejected (503) | other / errors | mismatched | p50 (s) | p99 (s) | "
          "accepted/s | RSS warm (MB) | RSS peak (MB) | RSS after (MB) | RSS change |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {sent} | {ok200} | {rejected} | {other} | {tally.mismatched} | {p50:.3f} | {p99:.3f} | "
          f"{ok200 / wall:.2f} | {rss_warm:.0f} | {max(rss_peak, rss_after):.0f} | {rss_after:.0f} | "
          f"{100 * growth:+.1f}% |")
    print(f"\nserver-side (Server-Timing) of accepted requests: queue wait p50 {pct(tally.queue_s, 0.5):.3f} s, "
          f"p99 {pct(tally.queue_s, 0.99):.3f} s; all stages p50 {pct(tally.server_s, 0.5):.3f} s, "
          f"p99 {pct(tally.server_s, 0.99):.3f} s")
    print(f"wall {wall:.0f} s, capacity alone {capacity:.2f} req/s, offered {rate:.2f} req/s, "
          f"client-side skips (in-flight bound {args.max_in_flight}): {tally.statuses[-1]}")
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
    return all(checks.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (loopback); default: start one on tiny models")
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--max-requests", type=int, default=50_000)
    p.add_argument("--load", type=float, default=2.0, help="offered rate / measured capacity")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--audio-s", type=float, default=1.0)
    p.add_argument("--max-in-flight", type=int, default=64)
    p.add_argument("--queue-s", type=float, default=8.0, help="own server: max_queued_audio_s")
    p.add_argument("--pid", type=int, help="with --url: the server's pid, for its RSS")
    args = p.parse_args()
    if args.url:
        loopback_only(args.url)
        passed = asyncio.run(soak(args.url, args.pid, args))
        raise SystemExit(0 if passed else 1)

    folder = Path(tempfile.mkdtemp(prefix="rvc-soak-"))
    proc = None
    try:
        assets = make_tiny_assets(folder, args.adapters)
        port = free_port()
        env = {**os.environ, "RVC_LORA_MODEL": str(assets["model"]), "RVC_LORA_HUBERT": str(assets["hubert"]),
               "RVC_LORA_ADAPTER_DIR": str(folder / "store"), "RVC_LORA_WORK_DIR": str(folder / "work"),
               "RVC_LORA_MAX_RANK": "8", "RVC_LORA_SEED_ADAPTERS": json.dumps(assets["adapters"]),
               "RVC_LORA_MAX_QUEUED_AUDIO_S": str(args.queue_s), "RVC_LORA_MAX_AUDIO_S": str(min(args.queue_s, 120)),
               "RVC_LORA_DEVICE": "cpu", "RVC_LORA_LOG_LEVEL": "WARNING"}
        log = (folder / "server.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "rvc_lora.cli", "serve", "--host", "127.0.0.1", "--port",
                                 str(port)], env=env, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit((folder / "server.log").read_text()[-3000:])
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            raise SystemExit("the server did not become ready within 120 s")
        passed = asyncio.run(soak(url, proc.pid, args))
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(folder, ignore_errors=True)
    raise SystemExit(0 if passed else 1)


if __name__ == "__main__":
    main()
