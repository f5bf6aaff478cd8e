"""Load benchmark: N concurrent clients over K adapters, and in the same run the baseline existing RVC servers
implement (reload the full checkpoint whenever the voice changes).

Self-contained (issue #14): two servers on the demo assets (full-size v2 40k, random weights), the pipelined
worker (RVC_LORA_BATCHING=true, RVC_LORA_BANK_SLOTS=K) and the one-at-a-time worker, each with K adapters
(each with the demo index); phases pm without and with the index, alternated between the servers for
--rounds rounds, then the reload baseline:

    python benchmarks/load.py --spawn --clients 16 --adapters 8 --requests 64 --audio-s 1

Against a running server (phases K=1 and K=K):

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
import os
import re
import shutil
import statistics
import subprocess
import sys
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
                    seconds: float, audio: bytes, audio_s: float, fields: dict[str, str] | None = None) -> PhaseResult:
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
            r = await client.post("/convert", data={"adapter": adapters[i % len(adapters)], "seed": str(i),
                                                    **(fields or {})}, files={"audio": ("in.wav", audio)})
            if r.status_code == 200:
                ok += 1
                latencies.append(time.monotonic() - start)
            elif r.status_code == 503:
                rejected += 1
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
            else:
                errors += 1

    print(f"phase {name}: {clients} clients, up to {requests} requests", file=sys.stderr, flush=True)
    swaps_before = await swaps_total(client)
    start = time.monotonic()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.monotonic() - start
    result = PhaseResult(name, ok, rejected, errors, wall, latencies, audio_s, await swaps_total(client) - swaps_before)
    print(result.row(), file=sys.stderr, flush=True)  # as it goes: a run cut short still tells something
    return result


def run_baseline(base: Path, hubert: Path, voices: int, requests: int, seconds: float, audio: bytes,
                 audio_s: float, device: str, index: Path | None = None) -> PhaseResult:
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
            converter.convert(pcm, 16000, ConvertParams(seed=i, f0_method="pm", index_rate=0.75 if index else 0.0),
                              index=index)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            latencies.append(time.monotonic() - t0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return PhaseResult("baseline (reload .pth)" + (" +index" if index else ""), len(latencies), 0, 0,
                       time.monotonic() - start, latencies, audio_s,
                       swaps)


async def fill_adapters(client: httpx.AsyncClient, base: Path, n: int, index: Path | None = None) -> None:
    """Upload `n` random rank-8 `ups`/`resblocks` adapters for `base` (as the demo's voices are made), each with
    `index` when given."""
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
            files = {"file": (path.name, path.read_bytes())}
            if index is not None:
                files["index"] = (index.name, index.read_bytes())
            r = await client.post("/adapters", files=files)
            r.raise_for_status()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Server:
    """`python -m service` in a child process on `port` with the demo base and `env` settings, its own store."""

    def __init__(self, name: str, assets: Path, port: int, env: dict[str, str]) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.store = Path(tempfile.mkdtemp(prefix="rvc-load-store-"))
        manifest = {"model": assets / "demo-base-v2-40k.pth", "hubert": assets / "demo-hubert_base.pt"}
        full_env = {**os.environ, "RVC_LORA_MODEL": str(manifest["model"]),
                    "RVC_LORA_HUBERT": str(manifest["hubert"]), "RVC_LORA_ADAPTER_DIR": str(self.store),
                    "RVC_LORA_PORT": str(port), "RVC_LORA_LOG_LEVEL": "WARNING",
                    "RVC_LORA_MAX_QUEUED_AUDIO_S": "3600", "RVC_LORA_REQUEST_TIMEOUT_S": "600", **env}
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], env=full_env,
                                     cwd=Path(__file__).resolve().parents[1])

    async def ready(self, client: httpx.AsyncClient, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server {self.name} exited with {self.proc.returncode}")
            try:
                if (await client.get(f"{self.url}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)
        raise SystemExit(f"server {self.name} not ready within {timeout:g} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.store, ignore_errors=True)


async def spawn_run(args: argparse.Namespace) -> None:
    from rvc_lora.demo import ensure_demo_assets

    assets = Path(args.assets)
    ensure_demo_assets(assets)
    print("demo assets ready; starting the servers", file=sys.stderr, flush=True)
    index = assets / "demo-voice-a.index"
    extra = dict(item.split("=", 1) for item in args.on_env)
    servers = [Server("batching on", assets, args.port, {"RVC_LORA_BATCHING": "true",
                                                         "RVC_LORA_BANK_SLOTS": str(args.adapters), **extra}),
               Server("batching off", assets, args.port + 1, {"RVC_LORA_BATCHING": "false"})]
    audio = test_audio(args.audio_s)
    results: dict[str, list[PhaseResult]] = {}
    try:
        ids: dict[str, list[str]] = {}
        async with httpx.AsyncClient(timeout=900) as probe:
            for server in servers:
                await server.ready(probe)
        for server in servers:
            async with httpx.AsyncClient(base_url=server.url, timeout=900) as client:
                print(f"{server.name}: uploading {args.adapters} adapters", file=sys.stderr, flush=True)
                await fill_adapters(client, assets / "demo-base-v2-40k.pth", args.adapters, index)
                ids[server.name] = [a["id"] for a in (await client.get("/adapters")).json()["adapters"]]
                await run_phase(client, "warm-up", ids[server.name], args.clients, 2 * args.adapters, 120, audio,
                                args.audio_s, {"f0_method": "pm"})
        for _ in range(args.rounds):
            for with_index in (False, True):
                for server in servers:
                    name = f"{server.name}, pm" + (" +index" if with_index else "")
                    async with httpx.AsyncClient(base_url=server.url, timeout=900) as client:
                        r = await run_phase(client, name, ids[server.name], args.clients, args.requests,
                                            args.seconds, audio, args.audio_s,
                                            {"f0_method": "pm", "index_rate": "0.75" if with_index else "0"})
                    results.setdefault(name, []).append(r)
    finally:
        for server in servers:
            server.stop()
    merged = [merge(name, runs) for name, runs in results.items()]
    if not args.no_baseline:
        merged.append(run_baseline(assets / "demo-base-v2-40k.pth", assets / "demo-hubert_base.pt", args.adapters,
                                   max(args.requests // 4, args.adapters), args.seconds, audio, args.audio_s,
                                   args.device, index))
    print(f"\nclients={args.clients} voices={args.adapters} audio={args.audio_s:g}s requests/phase={args.requests} "
          f"rounds={args.rounds} cores={len(os.sched_getaffinity(0))} (demo v2 40k, full size; servers on "
          f"{os.environ.get('RVC_LORA_DEVICE', 'auto')}, baseline on {args.device})\n")
    print(HEADER)
    for r in merged:
        print(r.row())
    rate = {r.name: r.ok / r.wall_s for r in merged}
    for suffix in ("pm", "pm +index"):
        on, off = rate.get(f"batching on, {suffix}"), rate.get(f"batching off, {suffix}")
        if on and off:
            print(f"{suffix}: batching on / off throughput = {on / off:.2f}x")
    base = next((r for r in merged if r.name.startswith("baseline")), None)
    for server in ("batching on", "batching off"):
        if base is not None and base.ok and rate.get(f"{server}, pm +index"):
            ratio = rate[f"{server}, pm +index"] / (base.ok / base.wall_s)
            print(f"{server}, pm +index / reload baseline = {ratio:.1f}x")


def merge(name: str, runs: list[PhaseResult]) -> PhaseResult:
    """Rounds of one phase as one: counts and wall time added, latencies pooled."""
    return PhaseResult(name, sum(r.ok for r in runs), sum(r.rejected for r in runs), sum(r.errors for r in runs),
                       sum(r.wall_s for r in runs), [x for r in runs for x in r.latencies], runs[0].audio_s,
                       sum(r.swaps for r in runs))


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
    p.add_argument("--device", default="cpu", help="baseline device (the server's: with --spawn, the servers take "
                   "RVC_LORA_DEVICE from the environment, auto by default)")
    p.add_argument("--fill", action="store_true",
                   help="with --baseline-model: upload random adapters for it until the server holds K")
    p.add_argument("--spawn", action="store_true", help="start the two servers (batching on/off) on the demo assets")
    p.add_argument("--assets", default=os.path.join(tempfile.gettempdir(), "rvc-lora-demo-assets"),
                   help="with --spawn: the demo assets folder (written on first use)")
    p.add_argument("--port", type=int, default=8710, help="with --spawn: first of two ports")
    p.add_argument("--rounds", type=int, default=2, help="with --spawn: phases alternate between servers this often")
    p.add_argument("--no-baseline", action="store_true", help="with --spawn: skip the reload baseline")
    p.add_argument("--on-env", action="append", default=[], metavar="KEY=VALUE",
                   help="with --spawn: an environment variable for the batching-on server only (repeatable), e.g. "
                        "RVC_LORA_BANK_SLOTS=1 or RVC_LORA_MAX_BATCH_FRAMES=2000")
    args = p.parse_args()
    if args.spawn:
        await spawn_run(args)
        return

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
