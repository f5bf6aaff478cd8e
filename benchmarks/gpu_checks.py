"""The CUDA checks no CPU test can make, on the full-size demo model, each printed as it finishes.

    python benchmarks/gpu_checks.py [--assets demo-assets] [--device cuda]
        [--only precision,f0,compile,oom,service-oom] [--seconds 10] [--swaps 100] [--oom-seconds 300]

- precision: fp16 vs fp32 per stage (content features, RMVPE f0, synthesizer, whole conversion) with the same
  padding, so the numbers measure precision only; and CUDA fp32 vs CPU fp32 of the whole conversion.
- f0: every f0 method this machine has (pm and harvest run on the CPU; rmvpe on random weights, crepe,
  crepe-tiny and fcpe on the device, fp16 where RVC uses it): extraction time, voiced fraction, and the whole
  conversion's real-time factor with it.
- compile: `torch.compile` of the decoder at a fixed shape (inductor; and CUDA graphs via "reduce-overhead"),
  then 100 adapter swaps, each followed by a replay that must equal the eager decoder holding that adapter,
  with no recompilation.
- oom: a forced out-of-memory in the library (memory capped with `set_per_process_memory_fraction`): the typed
  error, then an ordinary conversion on the same converter to show it survived.
- service-oom: the same through the service (in-process app, pipelined worker and one at a time): a long
  request under a 1 GiB cap (retried in shorter chunks: 200, or 503), one under a cap just above what the models
  hold (503 `device_out_of_memory`), then with the cap lifted a short request (200) and /readyz: the worker lives.
`--device cpu` rehearses every section on the CPU at the sizes given (compile with a graph-counting backend; no
memory cap, so oom is skipped and service-oom sends its requests uncapped).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from rvc_lora.demo import ensure_demo_assets, speech_like
from rvc_lora.pipeline.converter import ConvertParams, VoiceConverter
from rvc_lora.pipeline.f0 import F0_METHODS, f0_method_problem, get_f0_extractor
from rvc_lora.pipeline.f0.rmvpe_net import RMVPENet
from rvc_lora.pipeline.steps import PadConfig


def snr_db(reference: NDArray[np.floating], test: NDArray[np.floating]) -> float:
    n = min(len(reference), len(test))
    ref = np.asarray(reference[:n], dtype=np.float64)
    err = ref - np.asarray(test[:n], dtype=np.float64)
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum(err**2), 1e-30)))


def row(stage: str, ref: NDArray[np.floating], test: NDArray[np.floating]) -> str:
    n = min(len(ref), len(test))
    diff = np.abs(np.asarray(ref[:n], np.float64) - np.asarray(test[:n], np.float64))
    return f"| {stage:<28} | {snr_db(ref, test):>8.1f} | {diff.max():>10.3g} | {diff.mean():>10.3g} |"


def random_rmvpe(path: Path) -> Path:
    """Random weights in rmvpe.pt's layout (fp16, as distributed), BatchNorm statistics non-trivial."""
    if not path.exists():
        torch.manual_seed(0)
        net = RMVPENet()
        with torch.no_grad():
            for module in net.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    assert module.running_mean is not None and module.running_var is not None
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}, path)
    return path


def section_precision(folder: Path, manifest: dict, device: str, seconds: float) -> None:
    model, hubert = folder / manifest["model"], folder / manifest["hubert"]
    adapter = folder / next(iter(manifest["adapters"].values()))
    rmvpe: Path | None = random_rmvpe(folder / "random-rmvpe.pt")
    pad = PadConfig.select(is_half=False, gpu_mem_gib=None)
    full = VoiceConverter.from_files(model, hubert, device=device, is_half=False, rmvpe=rmvpe)
    half = VoiceConverter.from_files(model, hubert, device=device, is_half=True, rmvpe=rmvpe)
    half.pad = pad  # same padding as fp32: the difference is precision alone
    audio = speech_like(seconds, 16000, seed=11)
    print("| stage (fp16 vs fp32)         | SNR (dB) |   max |diff| |  mean |diff| |")
    print("|------------------------------|----------|------------|------------|")
    with torch.inference_mode():
        x = torch.from_numpy(audio.astype(np.float64))
        f_full = full.content.extract(x, full.model.cfg.version).float().cpu().numpy().ravel()
        f_half = half.content.extract(x, half.model.cfg.version).float().cpu().numpy().ravel()
        print(row("content features", f_full, f_half), flush=True)
        if rmvpe is not None:
            p_len = len(audio) // 160
            e_full = get_f0_extractor("rmvpe", device=device, rmvpe_path=rmvpe, is_half=False)
            e_half = get_f0_extractor("rmvpe", device=device, rmvpe_path=rmvpe, is_half=True)
            a, b = e_full(audio, p_len, filter_radius=3), e_half(audio, p_len, filter_radius=3)
            voiced_agree = float(np.mean((a > 0) == (b > 0)))
            print(row("rmvpe f0 (Hz)", a, b) + f" voicing agreement {voiced_agree:.4f}", flush=True)
    for method in ["pm"] + (["rmvpe"] if rmvpe is not None else []):
        params = ConvertParams(f0_method=method, seed=0)
        a = full.convert(audio, 16000, params, adapter=adapter).audio
        b = half.convert(audio, 16000, params, adapter=adapter).audio
        print(row(f"conversion, {method}, adapter", a, b), flush=True)
    if device != "cpu":
        cpu = VoiceConverter.from_files(model, hubert, device="cpu", is_half=False, rmvpe=rmvpe)
        params = ConvertParams(f0_method="pm", seed=0)
        a = cpu.convert(audio, 16000, params, adapter=adapter).audio
        b = full.convert(audio, 16000, params, adapter=adapter).audio
        print(row("conversion, CUDA vs CPU fp32", a, b) + " (noise drawn on each device)", flush=True)


def sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def section_f0(folder: Path, manifest: dict, device: str, seconds: float, methods: list[str]) -> None:
    rmvpe = random_rmvpe(folder / "random-rmvpe.pt")
    vc = VoiceConverter.from_files(folder / manifest["model"], folder / manifest["hubert"], device=device,
                                   rmvpe=rmvpe)
    audio = speech_like(seconds, 16000, seed=11)
    print(f"| f0 method  | where | extract {seconds:g} s (ms) | voiced | conversion RTF |")
    print("|------------|-------|------------------|--------|----------------|")
    for method in methods:
        problem = f0_method_problem(method, rmvpe)
        if problem is not None:
            print(f"| {method:<10} | skipped: {problem} |", flush=True)
            continue
        extractor = get_f0_extractor(method, device=device, rmvpe_path=rmvpe, is_half=vc.is_half)
        p_len = len(audio) // 160
        extractor(audio[:16000], 100)  # warm-up: model load, kernels
        sync(device)
        start = time.perf_counter()
        f0 = extractor(audio.astype(np.float64), p_len)
        sync(device)
        extract_s = time.perf_counter() - start
        params = ConvertParams(f0_method=method, seed=0)
        vc.convert(audio[:16000], 16000, params)  # warm-up of this method's conversion
        sync(device)
        start = time.perf_counter()
        vc.convert(audio, 16000, params)
        sync(device)
        rtf = (time.perf_counter() - start) / seconds
        where = "cpu" if method in ("pm", "harvest") else device
        print(f"| {method:<10} | {where:<5} | {1000 * extract_s:16.1f} | {float(np.mean(f0 > 0)):6.3f} | "
              f"{rtf:14.4f} |", flush=True)


def section_compile(folder: Path, manifest: dict, device: str, swaps: int) -> None:
    vc = VoiceConverter.from_files(folder / manifest["model"], folder / manifest["hubert"], device=device,
                                   is_half=False)
    adapters = [None] + [folder / p for p in manifest["adapters"].values()]
    dec = vc.model.base.dec
    graphs: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    gen = torch.Generator().manual_seed(0)
    frames = 100  # 1 s of features
    x = torch.randn(1, dec.conv_pre.in_channels, frames, generator=gen).to(device)
    g = torch.randn(1, dec.cond.in_channels, 1, generator=gen).to(device)
    f0 = (150 + 20 * torch.randn(1, frames, generator=gen)).clamp(min=60).to(device)
    modes = [("inductor", "default"), ("inductor", "reduce-overhead")] if device != "cpu" else [("count", "")]
    for backend, mode in modes:
        torch._dynamo.reset()
        if backend == "count":
            compiled = torch.compile(dec, backend=counting, dynamic=False)
        else:
            compiled = torch.compile(dec, mode=mode, dynamic=False)
        from torch._dynamo.utils import counters

        counters.clear()

        def run(fn: object) -> torch.Tensor:
            torch.manual_seed(7)
            with torch.inference_mode():
                return fn(x, f0, g).clone()  # type: ignore[operator]

        start = time.perf_counter()
        vc.use_adapter(None)
        run(compiled)
        run(compiled)
        compile_s = time.perf_counter() - start
        frames_compiled = counters["stats"]["unique_graphs"]
        eager_out = {}
        for i, a in enumerate(adapters):
            vc.use_adapter(a)
            eager_out[i] = run(dec)
        worst, follows = 0.0, 0
        start = time.perf_counter()
        for k in range(swaps):
            i = (k * 7 + 3) % len(adapters)
            vc.use_adapter(adapters[i])
            got = run(compiled)
            err = [float((got - eager_out[j]).abs().max()) for j in eager_out]
            worst = max(worst, err[i])
            follows += int(int(np.argmin(err)) == i)
        loop_s = time.perf_counter() - start
        recompiles = counters["stats"]["unique_graphs"] - frames_compiled
        print(f"compile {backend}/{mode or '-'}: first two calls {compile_s:.1f} s, {swaps} swaps+replays "
              f"{loop_s:.2f} s, replay nearest to its own adapter's eager output {follows}/{swaps}, "
              f"max |compiled - eager| {worst:.3g}, graphs recompiled after warm-up: {recompiles}", flush=True)
    torch._dynamo.reset()


def section_oom(folder: Path, manifest: dict, device: str) -> None:
    if device == "cpu":
        print("oom: skipped on CPU")
        return
    vc = VoiceConverter.from_files(folder / manifest["model"], folder / manifest["hubert"], device=device)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    cap_gib = 2.0
    torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total)
    long = speech_like(600.0, 16000, seed=3)
    try:
        res = vc.convert(long, 16000, ConvertParams(f0_method="pm", seed=0))
        print(f"oom: 600 s converted under a {cap_gib} GiB cap ({res.duration_s:.0f} s out)", flush=True)
    except Exception as exc:  # noqa: BLE001 - the point is to see which error comes out
        print(f"oom: 600 s under a {cap_gib} GiB cap -> {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()
    res = vc.convert(speech_like(2.0, 16000, seed=4), 16000, ConvertParams(f0_method="pm", seed=0))
    print(f"oom: afterwards a 2 s conversion on the same converter: {res.duration_s:.2f} s out, "
          f"finite {bool(np.isfinite(res.audio).all())}", flush=True)


def section_service_oom(folder: Path, manifest: dict, device: str, seconds: float) -> None:
    import io
    import logging
    import tempfile

    import soundfile as sf
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    class Tail(logging.Handler):  # the worker's out-of-memory warnings, to print beside the statuses
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            if "memory" in record.getMessage():
                self.lines.append(record.getMessage())

    def wav(duration: float, seed: int) -> bytes:
        buf = io.BytesIO()
        sf.write(buf, speech_like(duration, 16000, seed=seed), 16000, format="WAV", subtype="PCM_16")
        return buf.getvalue()

    long, medium, short = wav(seconds, 3), wav(min(seconds, 30.0), 5), wav(2.0, 4)
    tail = Tail()
    logging.getLogger().addHandler(tail)
    logging.getLogger().setLevel(logging.WARNING)
    cuda = device != "cpu"
    for batching in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(model=folder / manifest["model"], hubert=folder / manifest["hubert"], device=device,
                                adapter_dir=Path(tmp) / "store", work_dir=Path(tmp), batching=batching,
                                max_audio_s=max(seconds, 120.0) + 1, max_queued_audio_s=4 * max(seconds, 120.0),
                                request_timeout_s=600.0, upload_timeout_s=600.0)
            app = create_app(settings)
            with TestClient(app, raise_server_exceptions=False) as client:
                assert client.portal is not None
                client.portal.call(app.state.worker.wait_loaded)
                label = "pipelined" if batching else "one at a time"
                held = torch.cuda.memory_allocated() if cuda else 0
                for name, body, cap in ((f"{seconds:g} s under a 1 GiB cap", long, 2**30),
                                        (f"{min(seconds, 30.0):g} s under a cap 64 MiB above the models", medium,
                                         held + 64 * 2**20),
                                        ("2 s, cap lifted", short, None)):
                    if cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                        total = torch.cuda.get_device_properties(0).total_memory
                        torch.cuda.set_per_process_memory_fraction(1.0 if cap is None else cap / total)
                    elif cap is not None:
                        name += " (CPU: no cap)"
                    tail.lines.clear()
                    start = time.perf_counter()
                    r = client.post("/convert", data={"seed": "0", "f0_method": "pm"},
                                    files={"audio": ("a.wav", body)})
                    took = time.perf_counter() - start
                    code = r.json()["error"]["code"] if r.status_code != 200 else "ok"
                    peak = f", peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if cuda else ""
                    print(f"service-oom, {label}: {name}: HTTP {r.status_code} {code} in {took:.1f} s{peak}"
                          + (f"; log: {' | '.join(tail.lines)[:300]}" if tail.lines else ""), flush=True)
                ready = client.get("/readyz")
                print(f"service-oom, {label}: afterwards /readyz {ready.status_code}; device memory held "
                      f"{held / 2**20:.0f} MiB by the loaded models", flush=True)
    logging.getLogger().removeHandler(tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default="demo-assets")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default="precision,f0,compile,oom,service-oom")
    parser.add_argument("--swaps", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0, help="input length of the precision and f0 sections")
    parser.add_argument("--f0-methods", default=",".join(F0_METHODS), help="f0: the methods to run")
    parser.add_argument("--oom-seconds", type=float, default=300.0, help="service-oom: the long request's length")
    args = parser.parse_args()
    folder = Path(args.assets)
    manifest = ensure_demo_assets(folder)
    print(f"device {args.device}, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if args.device != "cpu" else ""), flush=True)
    sections = args.only.split(",")
    for name, fn in (("precision", lambda: section_precision(folder, manifest, args.device, args.seconds)),
                     ("f0", lambda: section_f0(folder, manifest, args.device, args.seconds,
                                                        args.f0_methods.split(","))),
                     ("compile", lambda: section_compile(folder, manifest, args.device, args.swaps)),
                     ("oom", lambda: section_oom(folder, manifest, args.device)),
                     ("service-oom", lambda: section_service_oom(folder, manifest, args.device, args.oom_seconds))):
        if name in sections:
            start = time.perf_counter()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - one failing section must not hide the others' numbers
                print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            print(f"-- {name}: {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
