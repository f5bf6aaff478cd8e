"""A whole conversion, stage by stage: the plain RVC architecture beside ours, in one process.

Both sides run `VoiceConverter`'s stages (f0, content encoder, index blend, synthesis, post-processing) on the
same input. "plain" is RVC's architecture built from the same checkpoint: no LoRA wrappers, weight norm removed,
and `torch.nn`'s own convolutions in the synthesizer and the content encoder (what RVC's inference runs). "ours"
is the library's (`VoiceConverter.from_files`, the library slot layout; its convolutions channels-last on the
CPU, `rvc_lora.convs`) in the base voice and with an r=8 adapter. Each row is a set of alternating pairs (plain
first in even pairs, ours first in odd ones), so that load on a shared machine hits both sides alike; the table
gives per-stage medians and the median of the per-pair total ratios.

Full-size v2 40k demo assets (`rvc-lora demo`, written on first use, random weights of the real shapes), pm,
index_rate 0.75, after a warm-up conversion of each side. Run (about 6 minutes on a quiet 2-core CPU):
    .venv/bin/python benchmarks/bench_pipeline.py [--assets demo-assets] [--seconds 10] [--pairs 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from rvc_lora.checkpoint import build_from_raw, read_rvc_checkpoint
from rvc_lora.convs import use_torch_convolutions
from rvc_lora.demo import ensure_demo_assets, speech_like
from rvc_lora.frames import SR_16K
from rvc_lora.models.synthesizer import RVCSynthesizer
from rvc_lora.pipeline.audio import prepare_16k
from rvc_lora.pipeline.converter import ChunkFeatures, ConvertParams, Stopwatch, VoiceConverter

STAGES = ("f0", "features", "index", "synth", "postprocess")


class PlainConverter(VoiceConverter):
    """`VoiceConverter` whose synthesis runs a plain RVC-architecture synthesizer (everything else is shared)."""

    plain: RVCSynthesizer

    def use_adapter(self, adapter: object) -> bool:
        return False  # the base voice only: the shared LoRA model's slots are ours' to set

    def synthesize(self, row: ChunkFeatures, clock: Stopwatch | None = None) -> NDArray[np.float32]:
        clock = clock or Stopwatch(self.device)
        lengths = torch.tensor([row.frames], device=self.device)
        sid = torch.tensor([row.sid], device=self.device)
        with torch.inference_mode(), clock.stage("synth"):
            if row.pitch is not None and row.pitchf is not None:
                audio = self.plain.infer(row.feats, lengths, row.pitch, row.pitchf, sid)[0]  # type: ignore[operator]
            else:
                audio = self.plain.infer(row.feats, lengths, sid)[0]  # type: ignore[operator]
            out: NDArray[np.float32] = audio[0, 0].float().cpu().numpy()
        return out


def plain_converter(ours: VoiceConverter, model_path: Path) -> PlainConverter:
    plain = build_from_raw(read_rvc_checkpoint(model_path)).eval()
    plain.remove_weight_norm()
    plain.drop_posterior()
    use_torch_convolutions(plain)
    content = use_torch_convolutions(copy.deepcopy(ours.content))  # RVC's HuBERT: torch's own convolutions
    vc = PlainConverter(ours.model, content, device=ours.device)
    vc.plain = plain.to(ours.device)
    return vc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default="demo-assets")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--f0-method", default="pm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(args.assets)
    manifest = ensure_demo_assets(folder)
    model_path = folder / manifest["model"]
    adapter = folder / next(iter(manifest["adapters"].values()))
    index = folder / manifest["indexes"]["demo-voice-a"]
    ours = VoiceConverter.from_files(model_path, folder / manifest["hubert"], device="cpu", adapters=[adapter])
    plain = plain_converter(ours, model_path)
    audio16k = prepare_16k(speech_like(args.seconds, SR_16K, seed=11), SR_16K)
    params = ConvertParams(f0_method=args.f0_method, seed=0, index_rate=0.75)

    def run(vc: VoiceConverter, voice: Path | None) -> dict[str, float]:
        start = time.perf_counter()
        result = vc.convert_16k(audio16k, params, adapter=voice, index=index)
        times = {s: result.timings[s] for s in STAGES}
        times["total"] = time.perf_counter() - start
        return times

    sides = {"ours, base voice": None, "ours, r=8 adapter": adapter}
    base_out = plain.convert_16k(audio16k, params, index=index).audio  # warm-up, and the outputs compared
    ours_out = ours.convert_16k(audio16k, params, index=index).audio
    ours.convert_16k(audio16k, params, adapter=adapter, index=index)
    peak = float(np.abs(base_out - ours_out).max())
    print(f"CPU, torch {torch.__version__}, threads {torch.get_num_threads()}, {args.seconds:g} s of audio, "
          f"v2 40k full size, f0 {args.f0_method}, index_rate 0.75, {args.pairs} alternating pairs per row "
          f"(medians, seconds); base voice vs plain: max |diff| {peak:.2e}")
    cols = (*STAGES, "total")
    print(f"{'row':<20} | " + " | ".join(f"{c:>11}" for c in cols) + " | ours / plain")
    print("-" * 21 + "|" + "|".join(["-" * 13] * len(cols)) + "|-------------")
    for label, voice in sides.items():
        pairs = []
        for i in range(args.pairs):
            if i % 2 == 0:
                p = run(plain, None)
                o = run(ours, voice)
            else:
                o = run(ours, voice)
                p = run(plain, None)
            pairs.append((p, o))
        ratio = statistics.median(o["total"] / p["total"] for p, o in pairs)
        for name, side in (("plain", 0), (label, 1)):
            med = {c: statistics.median(pair[side][c] for pair in pairs) for c in cols}
            tail = f" | {ratio:>12.3f}" if side else " |"
            print(f"{name:<20} | " + " | ".join(f"{med[c]:>11.3f}" for c in cols) + tail)


if __name__ == "__main__":
    main()
