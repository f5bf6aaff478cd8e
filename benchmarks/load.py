"""Load benchmark: N concurrent clients over K adapters against a running rvc-lora server, and in the same
run the baseline existing RVC servers implement (reload the full checkpoint whenever the voice changes).

    rvc-lora serve --demo &                      # or any server holding >= K adapters
    python benchmarks/load.py --url http://127.0.0.1:8000 --clients 8 --adapters 8 --requests 200 \
        --baseline-model BASE.pth --hubert HUBERT.pt [--fill]

Phases: K=1 (one voice), K=K (round-robin over K voices: a swap almost every request), and the baseline
(in this process, sequential as RVC's global-voice servers are: on each voice change the full `.pth` is
loaded and the synthesizer rebuilt; the content encoder stays loaded). Adapters are taken from the
server's store (`GET /adapters`). Bounded by --requests and --seconds per phase; it talks to --url only.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf


@dataclass
class PhaseResult:
    name: str
    ok: int
    rejected: int
    errors: int
    wall_s: float
    latencies: list[float]
    audio_s: float
    swaps: float

    def row(self) -> str:
        lat = sorted(self.latencies) or [float("nan")]
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        rps = self.ok / self.wall_s
        return (f"| {self.name:<22} | {self.ok:>5} | {self.rejected:>4} | {self.errors:>4} | {rps:>8.2f} | "
                f"{self.audio_s * self.ok / self.wall_s:>9.2f} | {p50 * 1000:>8.0f} | {p99 * 1000:>8.0f} | "
                f"{self.swaps / self.wall_s:>8.2f} |")


HEADER = ("| phase                  |    ok | 503s | errs |    req/s | audio s/s | p50 (ms) | p99 (ms) | swaps/s |\n"
          "|------------------------|-------|------|------|----------|-----------|----------|----------|---------|")


def test_audio(seconds: float, sr: int = 16000) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / sr) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def swaps_total(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    match = re.search(r"^rvc_lora_adapter_swaps_total ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def run_phase(client: httpx.AsyncClient, name: str, adapters: list[str], clients: int, requests: int,
                    seconds: float, audio: bytes, audio_s: float) -> PhaseResult:
    counter = iter(range(requests))
    latencies: list[float] = []
    ok = rejected = errors = 0
    deadline = time.monotonic() + seconds

    async def one_client() -> None:
        nonlocal ok, rejected, errors
        for i in counter:
            if time.monotonic() > deadline:
                return
            start = time.monotonic()
            r = await client.post("/convert", data={"adapter": adapters[i % len(adapters)], "seed": str(i)},
                                  files={"audio": ("in.wav", audio)})
            if r.status_code == 200:
                ok += 1
                latencies.append(time.monotonic() - start)
            elif r.status_code == 503:
                rejected += 1
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
            else:
                errors += 1

    swaps_before = await swaps_total(client)
    start = time.monotonic()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.monotonic() - start
    return PhaseResult(name, ok, rejected, errors, wall, latencies, audio_s, await swaps_total(client) - swaps_before)


def run_baseline(base: Path, hubert: Path, voices: int, requests: int, seconds: float, audio: bytes,
                 audio_s: float, device: str) -> PhaseResult:
    """RVC-style: one global voice; a voice change loads that voice's full checkpoint and rebuilds the
    synthesizer (the content encoder stays loaded). The voice files are copies of the base checkpoint:
    the same size and load cost as full voice models."""
    import torch

    from rvc_lora.pipeline.audio import load_audio_16k
    from rvc_lora.pipeline.content import ContentEncoder
    from rvc_lora.pipeline.converter import VoiceConverter
    from rvc_lora.pipeline.params import ConvertParams
    from rvc_lora.voice import LIBRARY_LAYOUT, load_synthesizer_with_lora

    workdir = Path(tempfile.mkdtemp(prefix="rvc-baseline-"))
    files = [shutil.copyfile(base, workdir / f"voice{i}.pth") for i in range(voices)]
    content = ContentEncoder.from_path(hubert)
    pcm = load_audio_16k(audio)
    current, converter, swaps = -1, None, 0
    latencies: list[float] = []
    start = time.monotonic()
    try:
        for i in range(requests):
            if time.monotonic() - start > seconds:
                break
            t0 = time.monotonic()
            if i % voices != current:  # what RVC's get_vc does on a voice change
                current, swaps = i % voices, swaps + 1
                synth = load_synthesizer_with_lora(files[current], LIBRARY_LAYOUT.lora)
                converter = VoiceConverter(synth, content, device=device)
            assert converter is not None
            converter.convert(pcm, 16000, ConvertParams(seed=i))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            latencies.append(time.monotonic() - t0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return PhaseResult("baseline (reload .pth)", len(latencies), 0, 0, time.monotonic() - start, latencies, audio_s,
                       swaps)


async def fill_adapters(client: httpx.AsyncClient, base: Path, n: int) -> None:
    """Upload `n` random rank-8 `ups`/`resblocks` adapters for `base` (as the demo's voices are made)."""
    import torch

    from rvc_lora.lora import LoRAConfig
    from rvc_lora.voice import load_synthesizer_with_lora, save_adapter

    synth = load_synthesizer_with_lora(base, LoRAConfig(r=8, lora_alpha=8, target_modules=["ups", "resblocks"]))
    folder = Path(tempfile.mkdtemp(prefix="rvc-load-"))
    try:
        for i in range(n):
            gen = torch.Generator().manual_seed(1000 + i)
            synth.load_lora_weights({k: 0.05 * torch.randn(v.shape, generator=gen)
                                     for k, v in synth.get_lora_state_dict().items()})
            path = save_adapter(folder / f"load-{i}.safetensors", synth, name=f"load-{i}", dtype=torch.float16)
            r = await client.post("/adapters", files={"file": (path.name, path.read_bytes())})
            r.raise_for_status()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--adapters", type=int, default=8, help="K: voices to spread the load over")
    p.add_argument("--requests", type=int, default=200, help="per phase")
    p.add_argument("--seconds", type=float, default=120.0, help="per phase")
    p.add_argument("--audio-s", type=float, default=3.0)
    p.add_argument("--baseline-model", type=Path, help="the server's base .pth (enables the baseline phase)")
    p.add_argument("--hubert", type=Path, help="the server's content encoder (for the baseline)")
    p.add_argument("--device", default="cpu", help="baseline device (the server's)")
    p.add_argument("--fill", action="store_true",
                   help="with --baseline-model: upload random adapters for it until the server holds K")
    args = p.parse_args()

    audio = test_audio(args.audio_s)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=600) as client:
        stored = (await client.get("/adapters")).json()["adapters"]
        if len(stored) < args.adapters and args.fill and args.baseline_model is not None:
            await fill_adapters(client, args.baseline_model, args.adapters - len(stored))
            stored = (await client.get("/adapters")).json()["adapters"]
        if len(stored) < args.adapters:
            raise SystemExit(f"the server holds {len(stored)} adapters; --adapters {args.adapters} needs that many")
        ids = [a["id"] for a in stored[: args.adapters]]
        await run_phase(client, "warm-up", ids, args.clients, 2 * args.adapters, 60, audio, args.audio_s)
        results = [await run_phase(client, name, voices, args.clients, args.requests, args.seconds, audio,
                                   args.audio_s) for name, voices in (("K=1", ids[:1]), (f"K={args.adapters}", ids))]
    if args.baseline_model is not None and args.hubert is not None:
        results.append(run_baseline(args.baseline_model, args.hubert, args.adapters, args.requests, args.seconds,
                                    audio, args.audio_s, args.device))
    print(f"clients={args.clients} adapters={args.adapters} audio={args.audio_s:g}s url={args.url}\n")
    print(HEADER)
    for r in results:
        print(r.row())
    rate = [r.ok / r.wall_s for r in results]
    print(f"\nK={args.adapters} / K=1 throughput: {rate[1] / rate[0]:.1%}")
    if len(rate) == 3:
        print(f"K={args.adapters} / baseline throughput: {rate[1] / rate[2]:.1f}x")


if __name__ == "__main__":
    asyncio.run(main())
