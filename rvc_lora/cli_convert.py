"""`rvc-lora convert`: one file, or every audio file under a folder, with one model load.

Everything that can be wrong with the request (missing input, a folder where a file is meant, audio
that does not decode, an output suffix that is not a format, `--format` against the suffix, missing
model files) is found before any model loads, which takes seconds to minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rvc_lora.cli_progress import chunk_notes, step
from rvc_lora.errors import AudioError, ParameterError, RVCLoraError
from rvc_lora.host_memory import DEFAULT_MALLOC_REUSE_BYTES, reuse_freed_memory
from rvc_lora.pipeline.audio import AUDIO_SUFFIXES, OUTPUT_FORMATS, encode_audio, format_for_suffix, probe_audio
from rvc_lora.stream import cli as stream_cli
from rvc_lora.voicezip import voice_files

if TYPE_CHECKING:
    from rvc_lora.pipeline.converter import ConversionResult, VoiceConverter
    from rvc_lora.pipeline.params import ConvertParams

ParamsFrom = Callable[[argparse.Namespace], "ConvertParams"]
_SUFFIXES = " ".join(s for f in OUTPUT_FORMATS.values() for s in f.suffixes)


def register(sub: Any, add_params: Callable[[argparse.ArgumentParser], None], params_from: ParamsFrom) -> None:
    """Add the `convert` subcommand to `sub` (argparse subparsers); `add_params` adds the conversion-parameter
    flags and `params_from` reads them back as `ConvertParams`."""
    p = sub.add_parser(
        "convert", help="convert an audio file, or a folder of them, with a base model (+ adapter, + index) or "
                        "a full voice (.pth or .zip)",
        description="Convert INPUT to OUTPUT. INPUT is an audio file (wav, flac, ogg, opus, mp3, m4a, webm, ...) "
                    "or a folder: then every audio file under it is converted into the folder OUTPUT, keeping "
                    "the layout, with one model load; a file that fails is reported and the rest go on.")
    p.add_argument("input", help="audio file, or folder of audio files")
    p.add_argument("output", help=f"output file (its suffix picks the format: {_SUFFIXES}), or a folder when INPUT "
                                  "is a folder")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="base RVC .pth (voices then come as --adapter)")
    model.add_argument("--voice", help="a full RVC voice, run as it is (its own sound exactly, no extraction): a "
                                       ".pth, or a voice .zip (.pth + optional .index, whose index is used like "
                                       "--index); instead of --model")
    p.add_argument("--hubert", required=True,
                   help="content encoder: hubert_base.pt (fairseq) or a Hugging Face HuBERT folder")
    p.add_argument("--adapter", default=None, help="voice adapter .safetensors (default: the base voice)")
    p.add_argument("--index", default=None, help="retrieval .index (used when --index-rate > 0)")
    p.add_argument("--max-rank", type=int, default=None, help="LoRA slot rank (default: what the adapter needs)")
    p.add_argument("--format", choices=list(OUTPUT_FORMATS), default=None,
                   help="output format (default: from OUTPUT's suffix; wav for a folder); must agree with the suffix")
    p.add_argument("--float", action="store_true", help="write 32-bit float WAV instead of PCM16 (wav only)")
    add_params(p)
    stream_cli.add_realtime_options(p)
    p.set_defaults(func=cmd_convert, params_from=params_from)


@dataclass
class Job:
    """One file to convert: source, destination and output format."""

    src: Path
    dst: Path
    fmt: str


@dataclass
class Batch:
    """What a folder conversion found before loading anything: the jobs, and the files refused up front."""

    jobs: list[Job] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def output_format(dst: Path, requested: str | None) -> str:
    """The format to write `dst` in: `requested` (`--format`) or the one its suffix names; a disagreement, or a
    suffix that is no output format, is a `ParameterError`."""
    suffix = dst.suffix.lower()
    implied = format_for_suffix(suffix)
    if requested is not None:
        if suffix and implied != requested:
            raise ParameterError(f"output {str(dst)!r} ends in {suffix!r} but --format is {requested}: name it "
                                 f"*{OUTPUT_FORMATS[requested].suffixes[0]} or drop --format")
        return requested
    if implied is None:
        raise ParameterError(f"output {str(dst)!r}: {suffix or 'no suffix'} is not an output format; use one of "
                             f"{_SUFFIXES} or pass --format")
    return implied


def _check_file(path: str | None, what: str) -> None:
    if path is not None and not os.path.exists(path):
        raise ParameterError(f"{what} {path!r} does not exist")


def plan_single(src: Path, dst: Path, args: argparse.Namespace) -> Job:
    """Check one conversion before any model loads: INPUT decodes (header), OUTPUT can be written."""
    fmt = output_format(dst, args.format)
    probe_audio(src)  # typed errors: missing, a directory, not decodable, absurd header
    if dst.is_dir():
        raise ParameterError(f"output {str(dst)!r} is a directory; give a file name (or convert a folder INPUT)")
    if not dst.parent.is_dir():
        raise ParameterError(f"output folder {str(dst.parent)!r} does not exist")
    return Job(src, dst, fmt)


def plan_folder(src: Path, dst: Path, args: argparse.Namespace) -> Batch:
    """Every audio file under `src` (by suffix, hidden files and `dst` itself skipped) -> a job writing
    `dst/<same relative path>.<format>`; files whose header does not decode are listed as failed at once."""
    fmt = args.format or "wav"
    if dst.exists() and not dst.is_dir():
        raise ParameterError(f"output {str(dst)!r} is a file; when INPUT is a folder, OUTPUT is a folder")
    out_root = dst.resolve()
    batch = Batch()
    taken: set[Path] = set()
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if (not path.is_file() or path.suffix.lower() not in AUDIO_SUFFIXES
                or any(part.startswith(".") for part in rel.parts)
                or out_root == path.resolve() or out_root in path.resolve().parents):
            continue
        target = dst / rel.with_suffix(OUTPUT_FORMATS[fmt].suffixes[0])
        if target in taken:  # voice.wav and voice.mp3 side by side: keep both
            target = dst / rel.with_name(f"{rel.name}{OUTPUT_FORMATS[fmt].suffixes[0]}")
        taken.add(target)
        try:
            probe_audio(path)
        except RVCLoraError as exc:
            batch.failed.append((path, f"[{exc.code}] {exc}"))
            continue
        batch.jobs.append(Job(path, target, fmt))
    if not batch.jobs and not batch.failed:
        raise AudioError(f"input folder {str(src)!r} holds no audio files (looked for: "
                         f"{' '.join(sorted(AUDIO_SUFFIXES))})")
    return batch


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def convert_one(vc: VoiceConverter, job: Job, params: ConvertParams, *, adapter: Any = None, index: Any = None,
                f0_file: str | None = None, float32: bool = False,
                progress: Callable[[int, int], None] | None = None) -> ConversionResult:
    """Decode, convert, encode and write one job (`float32`: 32-bit float WAV); the result's timings include
    `encode` (and the write)."""
    result = vc.convert_file(job.src, params, adapter=adapter, index=index, f0_file=f0_file, progress=progress)
    start = time.perf_counter()
    data = encode_audio(result.audio, result.sr, job.fmt,  # type: ignore[arg-type]  # checked by output_format
                        "FLOAT" if float32 else "PCM_16")
    job.dst.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(job.dst, data)
    result.timings["encode"] = time.perf_counter() - start
    return result


def timings(result: ConversionResult) -> str:
    """'5.00 s of audio in 2.10 s (RTF 0.42; f0 method rmvpe; decode 0.01 s, f0 ..., encode 0.02 s)': decoding the
    input to writing the output; model loading is not in it."""
    total = sum(result.timings.values())
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items() if v > 0)
    f0 = f"f0 method {result.f0_method}; " if result.f0_method else ""
    return f"{result.duration_s:.2f} s of audio in {total:.2f} s (RTF {total / result.duration_s:.2f}; {f0}{stages})"


def load_converter(args: argparse.Namespace) -> tuple[VoiceConverter, float]:
    """The converter for `args` (model files checked to exist first), and the seconds loading took."""
    from rvc_lora.pipeline.converter import VoiceConverter

    reuse_freed_memory(DEFAULT_MALLOC_REUSE_BYTES)  # large signals reuse the heap instead of faulting in pages
    with step(f"loading models ({Path(args.voice or args.model).name}, {Path(args.hubert).name})") as s:
        vc = VoiceConverter.from_files(args.model, args.hubert, device=args.device, rmvpe=args.rmvpe,
                                       max_rank=args.max_rank, adapters=[args.adapter] if args.adapter else [])
    return vc, s.elapsed_s


def _postfix(bar: Any, name: str) -> Callable[[int, int], None]:
    return lambda done, total: bar.set_postfix_str(f"{name} chunk {done}/{total}")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {"adapter": args.adapter, "index": args.index, "f0_file": args.f0_file, "float32": args.float}


def cmd_convert(args: argparse.Namespace) -> int:
    args.params_from(args)  # bad values fail here, before anything loads
    for path, what in ((args.model, "--model"), (args.voice, "--voice"), (args.hubert, "--hubert"),
                       (args.adapter, "--adapter"), (args.index, "--index"), (args.f0_file, "--f0-file"),
                       (args.rmvpe, "--rmvpe")):
        _check_file(path, what)
    if args.voice is None:
        return _convert(args)
    with voice_files(args.voice) as (model, index):  # a zip's members unpacked (checked) for the duration
        if index is not None and args.index is not None:
            raise ParameterError(f"--voice {args.voice!r} holds an index already; drop --index (or use the .pth)")
        return _convert(argparse.Namespace(**{**vars(args), "model": str(model),
                                              "index": args.index if index is None else str(index)}))


def _convert(args: argparse.Namespace) -> int:
    """`cmd_convert` once the model is a `.pth` on disk (`args.model`)."""
    src, dst = Path(args.input), Path(args.output)
    params = args.params_from(args)
    if args.float and (args.format or format_for_suffix(dst.suffix) or "wav") != "wav":
        raise ParameterError("--float applies to wav output only")
    if not src.exists():
        raise AudioError(f"input {str(src)!r} does not exist")
    if src.is_dir():
        if args.realtime or args.f0_file:
            raise ParameterError(f"{'--realtime' if args.realtime else '--f0-file'} applies to one file, and input "
                                 f"{str(src)!r} is a folder")
        return _convert_folder(src, dst, args, params)
    job = plan_single(src, dst, args)
    if args.realtime:
        return stream_cli.convert_realtime(args)
    vc, load_s = load_converter(args)
    with step(f"converting {src.name}") as s:
        result = convert_one(vc, job, params, progress=chunk_notes(s), **_options(args))
    sys.stdout.write(f"wrote {dst} ({job.fmt}, {result.sr} Hz): {timings(result)}; model loading "
                     f"{load_s:.1f} s not included\n")
    return 0


def _convert_folder(src: Path, dst: Path, args: argparse.Namespace, params: ConvertParams) -> int:
    from tqdm import tqdm

    batch = plan_folder(src, dst, args)
    for path, why in batch.failed:
        sys.stderr.write(f"skipping {path}: {why}\n")
    if not batch.jobs:
        raise AudioError(f"none of the {len(batch.failed)} audio files in {str(src)!r} decodes")
    dst.mkdir(parents=True, exist_ok=True)
    vc, load_s = load_converter(args)
    start, audio_s, converted = time.perf_counter(), 0.0, 0
    live = sys.stderr.isatty()
    with tqdm(batch.jobs, desc="converting", unit="file", file=sys.stderr, disable=not live) as bar:
        for i, job in enumerate(bar):
            bar.set_postfix_str(str(job.src.relative_to(src)))
            try:
                result = convert_one(vc, job, params, **_options(args),
                                     progress=_postfix(bar, str(job.src.relative_to(src))))
            except (RVCLoraError, OSError) as exc:
                why = f"[{getattr(exc, 'code', 'os_error')}] {exc}"
            except Exception as exc:  # one file's bug must not lose the others' work
                why = f"[internal] {type(exc).__name__}: {exc}"
            else:
                audio_s, converted = audio_s + result.duration_s, converted + 1
                if not live:
                    sys.stderr.write(f"[{i + 1}/{len(batch.jobs)}] wrote {job.dst}: {timings(result)}\n")
                continue
            batch.failed.append((job.src, why))
            (bar.write if live else sys.stderr.write)(f"failed {job.src}: {why}" + ("" if live else "\n"))
    sys.stdout.write(f"converted {converted} of {converted + len(batch.failed)} files into {dst} ({audio_s:.1f} s of "
                     f"audio in {time.perf_counter() - start:.1f} s; model loading {load_s:.1f} s not included)\n")
    if batch.failed:
        sys.stdout.write(f"{len(batch.failed)} failed:\n" + "".join(f"  {p}: {why}\n" for p, why in batch.failed))
        return 1
    return 0
