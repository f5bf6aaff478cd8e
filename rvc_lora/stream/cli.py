"""`rvc-lora convert --realtime` and `rvc-lora stream`: realtime conversion from the command line.

Registered from `rvc_lora.cli` with a line each (`add_realtime_options`, `add_stream_command`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from rvc_lora.pipeline.f0.base import F0_METHODS
from rvc_lora.stream.params import StreamParams

_D = StreamParams()


def add_realtime_options(p: argparse.ArgumentParser) -> None:
    """`--realtime` and the realtime-only settings, on the `convert` parser."""
    g = p.add_argument_group("realtime (with --realtime: RVC's block-by-block streaming algorithm)")
    g.add_argument("--realtime", action="store_true",
                   help="convert block by block as a realtime stream would (what a live session sounds like)")
    _add_stream_times(g)


def _add_stream_times(g: Any) -> None:
    g.add_argument("--block-time", type=float, default=_D.block_time, help="seconds per block (default %(default)s)")
    g.add_argument("--crossfade-time", type=float, default=_D.crossfade_time,
                   help="crossfade / lookahead seconds (default %(default)s)")
    g.add_argument("--extra-time", type=float, default=_D.extra_time,
                   help="left context seconds (default %(default)s)")
    g.add_argument("--threshold", type=float, default=_D.threshold,
                   help="noise gate dB, -60 = off (default %(default)s)")
    g.add_argument("--formant", type=float, default=_D.formant, help="formant shift, semitones (default %(default)s)")


def stream_params(args: argparse.Namespace) -> StreamParams:
    from rvc_lora.pipeline.f0 import default_f0_method

    return StreamParams(block_time=args.block_time, crossfade_time=args.crossfade_time, extra_time=args.extra_time,
                        threshold=args.threshold, f0_up_key=args.f0_up_key, formant=args.formant,
                        f0_method=args.f0_method or default_f0_method(getattr(args, "rmvpe", None)),
                        index_rate=args.index_rate, rms_mix_rate=args.rms_mix_rate,
                        seed=args.seed)


def stream_rate(sr: int, model_sr: int) -> int:
    """The file's rate when a stream can run at it (a multiple of 100 Hz), else the model's."""
    return sr if sr % 100 == 0 else model_sr


def convert_realtime(args: argparse.Namespace) -> int:
    """Run the realtime algorithm locally over the input file and write the blocks it emits."""
    from rvc_lora.cli_convert import output_format
    from rvc_lora.pipeline.audio import decode_audio, encode_audio, resample
    from rvc_lora.pipeline.converter import VoiceConverter
    from rvc_lora.stream.converter import StreamConverter

    params = stream_params(args)
    audio, sr = decode_audio(Path(args.input))
    vc = VoiceConverter.from_files(args.model, args.hubert, device=args.device, rmvpe=args.rmvpe,
                                   max_rank=args.max_rank, adapters=[args.adapter] if args.adapter else [])
    rate = stream_rate(sr, vc.sr)
    if rate != sr:
        audio = resample(audio, sr, rate)
    stream = StreamConverter(vc, params, sr=rate, adapter=args.adapter, index=args.index)
    start = time.perf_counter()
    out = stream.convert(audio)
    spent = time.perf_counter() - start
    dst = Path(args.output)
    fmt: Any = output_format(dst, args.format)  # checked before the model loaded (rvc_lora.cli_convert)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_bytes(encode_audio(out, rate, fmt, "FLOAT" if args.float else "PCM_16"))
    os.replace(tmp, dst)
    block_s = stream.block_frame / rate
    sys.stdout.write(f"wrote {dst} ({rate} Hz): {stream.blocks} blocks of {block_s * 1000:.0f} ms in {spent:.2f} s "
          f"({spent / stream.blocks * 1000:.0f} ms per block; realtime needs < {block_s * 1000:.0f} ms), "
          f"algorithmic latency {stream.sizes.latency_samples / rate * 1000:.0f} ms\n")
    return 0


def add_stream_command(sub: Any) -> None:
    """`rvc-lora stream IN OUT --server ws://... [--adapter NAME] [--fast]`."""
    p = sub.add_parser("stream", help="convert a file through a server's realtime WebSocket /stream")
    p.add_argument("input", help="audio file (any format `convert` reads)")
    p.add_argument("output", help="where to write what comes back (wav, flac or ogg by suffix)")
    p.add_argument("--server", required=True, help="the stream URL, e.g. ws://127.0.0.1:8000/stream")
    p.add_argument("--adapter", default=None, help="adapter id or name on the server (default: the base voice)")
    p.add_argument("--api-key", default=os.environ.get("RVC_LORA_API_KEY"),
                   help="bearer key (default: $RVC_LORA_API_KEY)")
    p.add_argument("--fast", action="store_true", help="send as fast as the server takes it, not in realtime")
    p.add_argument("--wire-format", choices=["float32", "pcm16"], default="float32",
                   help="samples on the wire (default %(default)s)")
    p.add_argument("--f0-up-key", dest="f0_up_key", type=int, default=_D.f0_up_key,
                   help="transpose, semitones (default %(default)s)")
    p.add_argument("--f0-method", default=_D.f0_method, choices=F0_METHODS,
                   help="pitch method on the server (default %(default)s)")
    p.add_argument("--index-rate", type=float, default=_D.index_rate,
                   help="how much of the voice's index to blend in, 0..1 (default %(default)s)")
    p.add_argument("--rms-mix-rate", type=float, default=_D.rms_mix_rate,
                   help="1 keeps the output's loudness, 0 follows the input's (default %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the stream's random draws, for repeatable output (default: random)")
    _add_stream_times(p)
    p.set_defaults(func=stream_file)


def stream_file(args: argparse.Namespace) -> int:
    """Send the file in blocks (realtime-paced unless --fast), write the blocks that come back."""
    import numpy as np

    from rvc_lora.pipeline.audio import decode_audio, encode_audio, resample
    from rvc_lora.stream.client import StreamClient

    audio, sr = decode_audio(Path(args.input))
    rate = stream_rate(sr, 48000)
    if rate != sr:
        audio = resample(audio, sr, rate)
    start = time.perf_counter()
    with StreamClient(args.server, sample_rate=rate, adapter=args.adapter, params=stream_params(args),
                      format=args.wire_format, api_key=args.api_key) as client:
        out, headers = client.convert(audio, realtime=not args.fast)
    spent = time.perf_counter() - start
    dst = Path(args.output)
    suffix = dst.suffix.lstrip(".").lower()
    fmt: Any = suffix if suffix in ("wav", "flac", "ogg") else "wav"
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_bytes(encode_audio(out, rate, fmt, "FLOAT" if fmt == "wav" else "PCM_16"))
    os.replace(tmp, dst)
    server_ms = np.array([h["server_ms"] for h in headers])
    late = headers[-1]["late_blocks"] if headers else 0
    sys.stdout.write(f"wrote {dst} ({rate} Hz): {len(headers)} blocks in {spent:.2f} s; server time per block "
                     f"median {np.median(server_ms):.0f} ms, max {server_ms.max():.0f} ms; {late} late blocks\n")
    return 0
