"""The `rvc-lora` command: convert, inspect, demo, demo-assets, extract, prepare, train, models, stream, serve."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rvc_lora import cli_convert, cli_inspect
from rvc_lora.cli_progress import chunk_notes, step
from rvc_lora.errors import RVCLoraError
from rvc_lora.fetch import add_models_command
from rvc_lora.pipeline.f0.base import F0_METHODS
from rvc_lora.pipeline.params import BOUNDS, DEFAULTS, ConvertParams
from rvc_lora.stream import cli as stream_cli
from rvc_lora.voice.layout import (
    DEFAULT_B_LR_RATIO,
    DEFAULT_EXTRACT_METHOD,
    DEFAULT_EXTRACT_RANK,
    DEFAULT_EXTRACT_TARGETS,
    DEFAULT_FULL_DELTA,
    DEFAULT_TRAIN_ALPHA,
    DEFAULT_TRAIN_RANK,
    DEFAULT_TRAIN_TARGETS,
    EXTRACT_METHODS,
    EXTRACT_TARGETS,
)

log = logging.getLogger("rvc_lora")
F0_HELP = "pitch extractor (default: rmvpe when --rmvpe is given, else fcpe when torchfcpe is installed, else pm)"
RMVPE_HELP = "RVC's rmvpe.pt (`rvc-lora models fetch` downloads it); with it, rmvpe is the default --f0-method"


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _version() -> str:
    try:
        return version("rvc-lora")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class _HelpFormatter(argparse.HelpFormatter):
    """Appends to each option's help its default ('off' for flags, 'none' for unset) or 'required', unless the
    help already says what its default means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text:
            return text
        if action.required:
            return f"{text} (required)"
        if action.const is True and action.default is False:
            return f"{text} (default: off)"
        return f"{text} (default: {'none' if action.default is None else '%(default)s'})"


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's help shows each option's default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _bounded(name: str) -> Callable[[str], int | float]:
    """argparse `type` for conversion parameter `name`: parsed and checked against `BOUNDS` at parse time, so a
    bad value is a usage error naming the flag before any model loads."""
    bound = BOUNDS[name]

    def parse(text: str) -> int | float:
        try:
            value = bound.kind(text)
        except ValueError:
            value = None
        if value is None or bound.problem(name, value) is not None:
            raise argparse.ArgumentTypeError(f"must be {bound.expected()}, got {text!r}")
        return value

    return parse


def _add_convert_params(p: argparse.ArgumentParser) -> None:
    """One flag per `ConvertParams` field, its range, default and help taken from `BOUNDS` / `DEFAULTS`."""
    for name, bound in BOUNDS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=_bounded(name), default=DEFAULTS[name],
                       help=f"{bound.help}; {bound.lo}..{bound.hi}")
        if name == "f0_up_key":
            p.add_argument("--f0-method", default=DEFAULTS["f0_method"], choices=F0_METHODS, help=F0_HELP)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--rmvpe", default=None, help=RMVPE_HELP)
    p.add_argument("--f0-file", default=None,
                   help="RVC's f0 file (lines 'time_s,f0_hz'), written over the extracted f0 as RVC does")


def _params(args: argparse.Namespace) -> ConvertParams:
    return ConvertParams(**{f.name: getattr(args, f.name) for f in fields(ConvertParams)})


def cmd_demo_assets(args: argparse.Namespace) -> int:
    from rvc_lora.demo import write_demo_assets

    with step(f"writing demo assets to {args.dir}") as s:
        manifest = write_demo_assets(args.dir, on_step=s.note)
    _out(f"demo assets in {args.dir} (random weights: not a real voice):")
    _out(json.dumps(manifest, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the demo assets: convert the demo input with the base voice and both adapters."""
    from rvc_lora.demo import ensure_demo_assets
    from rvc_lora.pipeline.converter import VoiceConverter

    folder = Path(args.dir)
    with step(f"demo assets in {folder}") as s:
        manifest = ensure_demo_assets(folder, on_step=s.note)
    with step("loading models (demo base, demo content encoder)") as s:
        adapters = {n: folder / f for n, f in manifest["adapters"].items()}
        vc = VoiceConverter.from_files(folder / manifest["model"], folder / manifest["hubert"], device=args.device,
                                       adapters=adapters.values())
    load_s = s.elapsed_s
    src = folder / manifest["input"]
    voices: dict[str, Any] = {"base": None} | adapters
    for name, adapter in voices.items():
        index = folder / manifest["indexes"][name] if name in manifest.get("indexes", {}) else None
        job = cli_convert.Job(src, folder / f"converted-{name}.wav", "wav")
        with step(f"converting {src.name} with {name}") as s:
            result = cli_convert.convert_one(vc, job, _params(args), adapter=adapter, index=index,
                                             f0_file=args.f0_file, progress=chunk_notes(s))
        _out(f"{name:>13}: wrote {job.dst} ({result.sr} Hz, swap {'yes' if result.adapter_swapped else 'no'}): "
             f"{cli_convert.timings(result)}")
    _out(f"(model loading, {load_s:.1f} s, is not in these times)")
    return 0


GOOD_SNR_DB = 20.0  # below this the adapter audibly differs from the full voice


def extraction_advice(report: Any) -> str | None:
    """A warning when base + adapter is far from the full voice (SNR below 20 dB), with what would do better:
    every layer (--targets all) first, then a higher rank."""
    if report.snr_db is None or report.snr_db >= GOOD_SNR_DB:
        return None
    better = "--targets all" if report.targets != "all" else f"--rank {min(4 * report.rank, 256)}"
    return (f"the adapter is {report.snr_db:.1f} dB SNR from the full voice (below {GOOD_SNR_DB:g} dB: audibly "
            f"different); try {better}, or use the full voice itself")


def cmd_extract(args: argparse.Namespace) -> int:
    import shutil

    from rvc_lora.extract import run_extract
    from rvc_lora.voicezip import voice_files

    with voice_files(args.voice) as (voice, index):  # a .pth, or a voice .zip (its .pth and .index)
        report = run_extract(args.base, voice, rank=args.rank, out=args.out, targets=args.targets,
                             energy=args.energy, method=args.method, calibrate=args.calibrate)
        _out(report.format())
        if (advice := extraction_advice(report)) is not None:
            sys.stderr.write(f"rvc-lora extract: warning: {advice}\n")
        _out(f"wrote {args.out} (the report without the timings is kept in its metadata: `rvc-lora inspect` and "
             "the service's GET /adapters/{id} show it)")
        if index is not None:  # the zip's index goes beside the adapter, as the service stores it
            index_out = Path(args.out).with_suffix(".index")
            shutil.copyfile(index, index_out)
            _out(f"wrote {index_out} (the voice's index, from the zip)")
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
                       seed=args.seed, discriminator=args.discriminator, device=args.device,
                       full_delta=args.full_deltas, b_lr_ratio=args.b_lr_ratio)
    _out(str(result))
    from rvc_lora.train.voice_index import build_voice_index

    _out(f"wrote {build_voice_index(args.work_dir, args.out)} (the voice's retrieval index: --index)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The service's own entry point (`python -m service`) in this process's place: the library never imports
    the service, and signals (SIGTERM drains the server) reach the server itself."""
    argv = [sys.executable, "-m", "service", *(["--demo"] if args.demo else []),
            *(["--host", args.host] if args.host is not None else []),
            *(["--port", str(args.port)] if args.port is not None else [])]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
    return 0  # not reached: execv replaces the process


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rvc-lora", description="RVC voice conversion with hot-swappable LoRA voices: library "
                     "commands and the HTTP service.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cli_convert.register(sub, _add_convert_params, _params)
    cli_inspect.register(sub)

    p = sub.add_parser("demo-assets", help="write the deterministic demo models and input to DIR")
    p.add_argument("dir", help="folder to write (created if missing)")
    p.set_defaults(func=cmd_demo_assets)

    p = sub.add_parser("demo", help="convert the demo input with the base voice and two adapters")
    p.add_argument("dir", nargs="?", default="demo-assets", help="demo assets folder (written first if missing)")
    _add_convert_params(p)
    p.set_defaults(func=cmd_demo, seed=0)

    p = sub.add_parser("extract", help="turn a full RVC voice .pth into a LoRA adapter over its base")
    p.add_argument("--base", required=True, help="the base .pth the voice was fine-tuned from")
    p.add_argument("--voice", required=True,
                   help="the full voice: a .pth, or a voice .zip (.pth + optional .index, written beside --out)")
    p.add_argument("--rank", type=int, default=DEFAULT_EXTRACT_RANK,
                   help="LoRA rank (the cap per layer with --energy); default %(default)s, as the server extracts")
    p.add_argument("--energy", type=float, default=None, help="smallest rank per layer keeping this share of the "
                   "delta's energy (e.g. 0.95; default: --rank everywhere)")
    p.add_argument("--targets", choices=list(EXTRACT_TARGETS), default=DEFAULT_EXTRACT_TARGETS,
                   help="layers to adapt: the decoder only, or every layer (default %(default)s, as the server "
                   "extracts)")
    p.add_argument("--method", choices=list(EXTRACT_METHODS), default=DEFAULT_EXTRACT_METHOD,
                   help="fit each layer's outputs on calibration input (data-aware, default) or its weights (svd); "
                   "docs/fidelity.md")
    p.add_argument("--calibrate", default=None, metavar="PREPARED_DIR",
                   help="data-aware on the voice's own speech: a folder `rvc-lora prepare` wrote from it "
                   "(default: synthetic input)")
    p.add_argument("--out", required=True, help="adapter .safetensors to write")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("prepare", help="preprocess recordings for LoRA training")
    p.add_argument("data_dir", help="folder of recordings")
    p.add_argument("work_dir", help="folder for the prepared features (created if missing)")
    p.add_argument("--base", required=True, help="the base .pth to train over")
    p.add_argument("--hubert", required=True, help="content encoder: hubert_base.pt or a Hugging Face folder")
    p.add_argument("--f0-method", default=None, choices=F0_METHODS, help=F0_HELP)
    p.add_argument("--rmvpe", default=None, help=RMVPE_HELP)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable files (listed) instead of stopping")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a voice as a LoRA adapter over a frozen base")
    p.add_argument("work_dir", help="folder written by `rvc-lora prepare` (checkpoints and log go here too)")
    p.add_argument("--base", required=True, help="a pretrained base with enc_q, e.g. f0G40k.pth")
    p.add_argument("--out", required=True, help="adapter .safetensors to write")
    p.add_argument("--rank", type=int, default=DEFAULT_TRAIN_RANK, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=DEFAULT_TRAIN_ALPHA,
                   help="LoRA alpha (the update is scaled by alpha / rank)")
    p.add_argument("--targets", default=",".join(DEFAULT_TRAIN_TARGETS),
                   help="comma-separated layer name patterns to adapt (default: every layer extraction writes; "
                   "the decoder alone: ups,resblocks)")
    p.add_argument("--epochs", type=int, default=20, help="passes over the prepared data")
    p.add_argument("--batch-size", type=int, default=4, help="segments per step")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (AdamW)")
    p.add_argument("--full-deltas", action=argparse.BooleanOptionalAction, default=DEFAULT_FULL_DELTA,
                   help="also train the small tensors (biases, norms, embeddings) whole, as extraction stores them")
    p.add_argument("--b-lr-ratio", type=float, default=DEFAULT_B_LR_RATIO,
                   help="LoRA B's learning rate over A's (LoRA+; 1: plain LoRA)")
    p.add_argument("--save-every", type=int, default=5, help="write a checkpoint every N epochs")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in WORK_DIR")
    p.add_argument("--seed", type=int, default=1234, help="random seed")
    p.add_argument("--discriminator", default=None,
                   help="pretrained discriminator, e.g. f0D40k.pth (default: a fresh one)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_train)

    add_models_command(sub)

    stream_cli.add_stream_command(sub)

    p = sub.add_parser("serve", help="run the HTTP service")
    p.add_argument("--demo", action="store_true", help="serve the demo assets (generated on first start)")
    p.add_argument("--host", default=None, help="address to listen on (default: RVC_LORA_HOST, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: RVC_LORA_PORT, else 8000)")
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
