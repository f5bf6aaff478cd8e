"""The `rvc-lora` command: convert, inspect, demo, demo-assets, extract, prepare, train, serve."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rvc_lora.errors import RVCLoraError
from rvc_lora.pipeline.f0.base import F0_METHODS
from rvc_lora.stream import cli as stream_cli

log = logging.getLogger("rvc_lora")
F0_HELP = "pitch extractor (default: rmvpe when --rmvpe is given, else fcpe when torchfcpe is installed, else pm)"
RMVPE_HELP = "RVC's rmvpe.pt (`rvc-lora models fetch` downloads it); with it, rmvpe is the default --f0-method"
DEFAULTS = {"f0_method": None, "index_rate": 0.75, "filter_radius": 3, "rms_mix_rate": 0.25, "protect": 0.33}


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _add_convert_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sid", type=int, default=0, help="speaker id (row of the model's emb_g)")
    p.add_argument("--pitch", "--f0-up-key", dest="f0_up_key", type=int, default=0, help="transpose, semitones")
    p.add_argument("--f0-method", default=DEFAULTS["f0_method"], choices=F0_METHODS, help=F0_HELP)
    p.add_argument("--index-rate", type=float, default=DEFAULTS["index_rate"])
    p.add_argument("--filter-radius", type=int, default=DEFAULTS["filter_radius"])
    p.add_argument("--rms-mix-rate", type=float, default=DEFAULTS["rms_mix_rate"])
    p.add_argument("--protect", type=float, default=DEFAULTS["protect"])
    p.add_argument("--resample-sr", type=int, default=0, help="output rate (0 = the model's)")
    p.add_argument("--seed", type=int, default=None, help="torch.manual_seed before the first chunk")
    p.add_argument("--format", choices=["wav", "flac", "ogg"], default=None,
                   help="default: from OUT's suffix, else wav")
    p.add_argument("--float", action="store_true", help="write 32-bit float WAV instead of PCM16")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--rmvpe", default=None, help=RMVPE_HELP)
    p.add_argument("--f0-file", default=None,
                   help="RVC's f0 file (lines 'time_s,f0_hz'), written over the extracted f0 as RVC does")


def _params(args: argparse.Namespace) -> Any:
    from rvc_lora.pipeline.params import ConvertParams

    return ConvertParams(sid=args.sid, f0_up_key=args.f0_up_key, f0_method=args.f0_method, index_rate=args.index_rate,
                         filter_radius=args.filter_radius, rms_mix_rate=args.rms_mix_rate, protect=args.protect,
                         resample_sr=args.resample_sr, seed=args.seed)


def _convert_one(vc: Any, src: Path, dst: Path, args: argparse.Namespace, adapter: Any, index: Any) -> Any:
    from tqdm import tqdm

    from rvc_lora.pipeline.audio import encode_audio

    suffix = dst.suffix.lstrip(".").lower()
    fmt: Any = args.format or (suffix if suffix in ("wav", "flac", "ogg") else "wav")
    with tqdm(total=1, desc=f"converting {src.name}", unit="chunk", leave=False, disable=None) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = vc.convert_file(src, _params(args), adapter=adapter, index=index, f0_file=args.f0_file,
                                 progress=progress)
    start = time.perf_counter()
    data = encode_audio(result.audio, result.sr, fmt, "FLOAT" if args.float else "PCM_16")
    _write_atomic(dst, data)
    result.timings["encode"] = time.perf_counter() - start
    return result


def _timings(result: Any) -> str:
    total = sum(result.timings.values())
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items() if v > 0)
    f0 = f"f0 {result.f0_method}; " if result.f0_method else ""
    return f"{result.duration_s:.2f} s of audio in {total:.2f} s (RTF {total / result.duration_s:.2f}; {f0}{stages})"


def cmd_convert(args: argparse.Namespace) -> int:
    from rvc_lora.pipeline.converter import VoiceConverter

    if args.realtime:
        return stream_cli.convert_realtime(args)

    vc = VoiceConverter.from_files(args.model, args.hubert, device=args.device, rmvpe=args.rmvpe,
                                   max_rank=args.max_rank)
    result = _convert_one(vc, Path(args.input), Path(args.output), args, args.adapter, args.index)
    _out(f"wrote {args.output} ({result.sr} Hz): {_timings(result)}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.file)
    info: dict[str, Any]
    if path.suffix == ".safetensors":
        from rvc_lora.adapters import load_adapter

        adapter = load_adapter(path)
        i = adapter.info
        info = {"kind": "adapter", "name": i.name, "rank": i.r, "lora_alpha": i.lora_alpha, "layers": len(i.layers),
                "targets": sorted({_family(n) for n in i.layers}), "full_deltas": len(i.full_delta),
                "base_fingerprint": i.base_fingerprint, "version": i.version, "sr": i.sr, "f0": i.f0,
                "bytes": path.stat().st_size}
    elif path.suffix == ".index":
        from rvc_lora.pipeline.index import RetrievalIndex

        index = RetrievalIndex.from_path(path)
        info = {"kind": "index", "vectors": index.ntotal, "dim": index.dim, "version": "v1" if index.dim == 256 else
                "v2" if index.dim == 768 else "unknown"}
    else:
        from rvc_lora.checkpoint import read_rvc_checkpoint

        raw = read_rvc_checkpoint(path)
        cfg = raw.config
        info = {"kind": "voice model", "class": cfg.class_name, "version": cfg.version, "sr": cfg.sr, "f0": cfg.f0,
                "speakers": cfg.spk_embed_dim, "info": raw.info, "fingerprint": raw.fingerprint,
                "has_posterior_encoder": any(k.startswith("enc_q.") for k in raw.weights),
                "parameters": sum(v.numel() for v in raw.weights.values()), "bytes": path.stat().st_size}
    if args.json:
        _out(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            _out(f"{k:<{width}}  {v}")
    return 0


def _family(layer: str) -> str:
    parts = layer.split(".")
    return ".".join(p for p in parts if not p.isdigit())


def cmd_demo_assets(args: argparse.Namespace) -> int:
    from rvc_lora.demo import write_demo_assets

    manifest = write_demo_assets(args.dir)
    _out(f"demo assets in {args.dir} (random weights: not a real voice):")
    _out(json.dumps(manifest, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the demo assets: convert the demo input with the base voice and both adapters."""
    from rvc_lora.demo import ensure_demo_assets
    from rvc_lora.pipeline.converter import VoiceConverter

    folder = Path(args.dir)
    manifest = ensure_demo_assets(folder)
    vc = VoiceConverter.from_files(folder / manifest["model"], folder / manifest["hubert"], device=args.device)
    src = folder / manifest["input"]
    voices: dict[str, Any] = {"base": None} | {n: folder / f for n, f in manifest["adapters"].items()}
    for name, adapter in voices.items():
        index = folder / manifest["indexes"][name] if name in manifest.get("indexes", {}) else None
        dst = folder / f"converted-{name}.wav"
        result = _convert_one(vc, src, dst, args, adapter, index)
        _out(f"{name:>13}: wrote {dst} ({result.sr} Hz, swap {'yes' if result.adapter_swapped else 'no'}): "
             f"{_timings(result)}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from rvc_lora.extract import run_extract

    report = run_extract(args.base, args.voice, rank=args.rank, out=args.out, targets=args.targets,
                         energy=args.energy)  # with --energy, --rank caps the per-layer rank
    _out(report.format())
    _out(f"wrote {args.out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from rvc_lora.pipeline.f0 import default_f0_method
    from rvc_lora.train import run_prepare

    f0_method = args.f0_method or default_f0_method(args.rmvpe)
    summary = run_prepare(args.data_dir, args.work_dir, base=args.base, hubert=args.hubert, f0_method=f0_method,
                          rmvpe_path=args.rmvpe, device=args.device or "cpu", skip_bad=args.skip_bad)
    _out(str(summary))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from rvc_lora.train import run_train

    result = run_train(args.work_dir, base=args.base, out=args.out, rank=args.rank, alpha=args.alpha,
                       targets=tuple(t for t in args.targets.split(",") if t), epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, save_every=args.save_every, resume=args.resume,
                       seed=args.seed, discriminator=args.discriminator, device=args.device)
    _out(str(result))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from service.app import serve

    serve(host=args.host, port=args.port, demo=args.demo)  # unset flags fall back to RVC_LORA_HOST / _PORT
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rvc-lora", description="RVC voice conversion with hot-swappable LoRA "
                                     "voices: library commands and the HTTP service.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert an audio file with a base model (+ adapter, + index)")
    p.add_argument("input", help="any audio file soundfile reads (wav, flac, ogg, mp3)")
    p.add_argument("output")
    p.add_argument("--model", required=True, help="base RVC .pth")
    p.add_argument("--hubert", required=True, help="hubert_base.pt (fairseq) or a Hugging Face HuBERT folder")
    p.add_argument("--adapter", default=None, help="voice adapter .safetensors")
    p.add_argument("--index", default=None, help="retrieval .index (used when --index-rate > 0)")
    p.add_argument("--max-rank", type=int, default=None, help="LoRA slot rank (default: the adapter's)")
    _add_convert_params(p)
    stream_cli.add_realtime_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="describe a .pth voice model, an adapter or an index")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo-assets", help="write the deterministic demo models and input to DIR")
    p.add_argument("dir")
    p.set_defaults(func=cmd_demo_assets)

    p = sub.add_parser("demo", help="convert the demo input with the base voice and two adapters")
    p.add_argument("dir", nargs="?", default="demo-assets")
    _add_convert_params(p)
    p.set_defaults(func=cmd_demo, seed=0)

    p = sub.add_parser("extract", help="turn a full RVC voice .pth into a LoRA adapter over its base")
    p.add_argument("--base", required=True)
    p.add_argument("--voice", required=True)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (the cap per layer with --energy)")
    p.add_argument("--energy", type=float, default=None, help="smallest rank per layer keeping this share of the "
                   "delta's energy (e.g. 0.95)")
    p.add_argument("--targets", choices=["dec", "all"], default="dec")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("prepare", help="preprocess recordings for LoRA training")
    p.add_argument("data_dir")
    p.add_argument("work_dir")
    p.add_argument("--base", required=True)
    p.add_argument("--hubert", required=True)
    p.add_argument("--f0-method", default=None, choices=F0_METHODS, help=F0_HELP)
    p.add_argument("--rmvpe", default=None, help=RMVPE_HELP)
    p.add_argument("--device", default=None)
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable files (listed) instead of stopping")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a voice as a LoRA adapter over a frozen base")
    p.add_argument("work_dir")
    p.add_argument("--base", required=True, help="a pretrained base with enc_q (e.g. f0G40k.pth)")
    p.add_argument("--out", required=True)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--targets", default="ups,resblocks")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--discriminator", default=None, help="pretrained discriminator (e.g. f0D40k.pth)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("serve", help="run the HTTP service")
    p.add_argument("--demo", action="store_true", help="serve the demo assets (generated on first start)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        code: int = args.func(args)
        return code
    except RVCLoraError as exc:
        sys.stderr.write(f"rvc-lora {args.command}: error [{exc.code}]: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
