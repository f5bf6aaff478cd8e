"""Fidelity: how much of a fine-tuned voice an extracted adapter keeps, per rank and target set.

1. Voices made as RVC users make them: the whole generator (enc_p, flow, dec, emb_g and the posterior encoder
   enc_q, with RVC's GAN losses and discriminator) fine-tuned from a pretrained base on one speaker's speech,
   written as RVC's inference `.pth` (fp16, no enc_q). The speakers are espeak-ng voices in several languages
   and pitches, generated here (espeak-ng must be installed: `apt-get install espeak-ng`).
2. Per voice: adapters extracted (`rvc_lora.extract`) at ranks 4..128 and energy thresholds, per target set
   (dec, dec+flow, all; with and without the full deltas of the small tensors), each run against the full
   voice on held-out sentences of the same speaker, same input and same noise: waveform SNR, log-mel distance,
   f0 and voicing agreement of the output (Praat pitch of both renderings), adapter size.

Base: `--models-dir` (default `models/`) when `rvc-lora models fetch` put RVC's real `pretrained_v2/f0G40k.pth`,
`f0D40k.pth` and `hubert_base.pt` there; otherwise the demo assets (random weights, full-size v2 40k), written
under `--out` on first use. Nothing is downloaded.

Every result is appended to `<out>/fidelity.jsonl` as it is measured (a cut-off run still has a table; a
rerun with the same `--out` skips the voices and rows already there). Print the table from it alone with
`--table`. Run (niced, one thread; about an hour on 2 shared CPU cores with these defaults):
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_fidelity.py --out /tmp/fidelity
The full grid (5 voices, 400 steps at RVC's lr, every energy): add `--full`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rvc_lora.adapters import Adapter, adapter_file_bytes
from rvc_lora.calibration import CALIBRATION_SECONDS, prepared_inputs
from rvc_lora.checkpoint import RawCheckpoint, build_from_raw, read_rvc_checkpoint, save_rvc_checkpoint
from rvc_lora.demo import FILES, ensure_demo_assets
from rvc_lora.extract import extract_adapter, snr_db, synthetic_inputs
from rvc_lora.lora import FULL_DELTA_PREFIX
from rvc_lora.metrics import f0_agreement, log_mel_distance
from rvc_lora.pipeline.audio import resample
from rvc_lora.pipeline.f0 import get_f0_extractor
from rvc_lora.train.data import PreparedInfo, Sample, SegmentDataset, collate
from rvc_lora.train.discriminators import load_discriminator
from rvc_lora.train.prepare import run_prepare
from rvc_lora.train.pretrained import load_pretrained_base, train_params
from rvc_lora.train.step import WEIGHT_DECAY, GANTrainer
from rvc_lora.voice import adapter_layout, build_voice_model

RESULTS = "fidelity.jsonl"
RANKS = (4, 8, 16, 32, 64, 128)
ENERGIES = (0.5, 0.8, 0.9)
FULL_ENERGIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
F0_METHOD = "pm"  # Praat: CPU, no weights to fetch

# (name, espeak-ng voice, pitch 0-99, speed wpm, language of the text)
SPEAKERS = (("en-m", "en-us", 35, 165, "en"), ("de-f", "de+f3", 72, 150, "de"), ("fr-m", "fr+m3", 50, 160, "fr"),
            ("es-f", "es+f2", 85, 155, "es"), ("en-f", "en-gb+f4", 60, 170, "en"))
TEXTS = {
    "en": ["The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
           "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
           "A journey of a thousand miles begins with a single step, or so the old saying goes.",
           "Please call Stella and ask her to bring these things with her from the store.",
           "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother.",
           "We also need a small plastic snake and a big toy frog for the kids.",
           "The rainbow is a division of white light into many beautiful colors.",
           "When the sunlight strikes raindrops in the air, they act as a prism and form a rainbow.",
           "Bob was glad when his friends came over to watch the game on Sunday afternoon.",
           "The museum opens at nine, but the best time to visit is late in the evening."],
    "de": ["Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer zusieht.",
           "Im Sommer fahren wir oft an die See und essen frischen Fisch am Hafen.",
           "Die Sonne scheint heute besonders hell, und die Kinder spielen draußen im Garten.",
           "Bitte bringen Sie mir eine Tasse Kaffee und ein Stück Kuchen mit Sahne.",
           "Der Zug nach Berlin fährt um halb acht vom dritten Gleis ab.",
           "Meine Großmutter erzählt gern Geschichten aus ihrer Kindheit auf dem Land.",
           "Wir haben gestern Abend lange über Musik und Bücher gesprochen.",
           "Ein Regenbogen entsteht, wenn Sonnenlicht auf Regentropfen in der Luft trifft.",
           "Das Museum öffnet um neun Uhr, doch am schönsten ist es am späten Abend.",
           "Nach dem Essen gingen alle zusammen im Wald spazieren."],
    "fr": ["Le renard brun rapide saute par-dessus le chien paresseux pendant que le fermier regarde.",
           "En été, nous allons souvent à la mer pour manger du poisson frais au port.",
           "Le soleil brille particulièrement fort aujourd'hui et les enfants jouent dans le jardin.",
           "Apportez-moi une tasse de café et un morceau de gâteau, s'il vous plaît.",
           "Le train pour Paris part à sept heures et demie du troisième quai.",
           "Ma grand-mère aime raconter des histoires de son enfance à la campagne.",
           "Hier soir, nous avons longuement parlé de musique et de livres.",
           "Un arc-en-ciel apparaît quand la lumière du soleil traverse les gouttes de pluie.",
           "Le musée ouvre à neuf heures, mais le meilleur moment est tard le soir.",
           "Après le repas, tout le monde est allé se promener dans la forêt."],
    "es": ["El rápido zorro marrón salta sobre el perro perezoso mientras el granjero mira.",
           "En verano vamos a menudo al mar para comer pescado fresco en el puerto.",
           "Hoy el sol brilla con mucha fuerza y los niños juegan en el jardín.",
           "Tráigame una taza de café y un trozo de pastel, por favor.",
           "El tren a Madrid sale a las siete y media del tercer andén.",
           "Mi abuela cuenta historias de su infancia en el campo.",
           "Anoche hablamos mucho tiempo de música y de libros.",
           "Un arco iris aparece cuando la luz del sol atraviesa las gotas de lluvia.",
           "El museo abre a las nueve, pero el mejor momento es tarde por la noche.",
           "Después de comer, todos fueron a pasear por el bosque."],
}
HELD_OUT = 2  # the last sentences of each language are never trained on


# --- data ------------------------------------------------------------------------------------------------------------
def require_espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        sys.exit("bench_fidelity: espeak-ng is not installed; it makes the speakers' speech. Install it with "
                 "`apt-get install espeak-ng` (Debian/Ubuntu) and run again.")
    return exe


def speak(exe: str, voice: str, pitch: int, speed: int, sentences: Sequence[str], folder: Path) -> None:
    """One wav per sentence (espeak-ng's own rate, 22.05 kHz) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(sentences):
        path = folder / f"{i:02d}.wav"
        if not path.is_file():
            subprocess.run([exe, "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(path), text], check=True,
                           capture_output=True)


@dataclasses.dataclass(frozen=True)
class Models:
    pretrained: Path  # generator with enc_q (training start)
    discriminator: Path
    hubert: Path
    served: Path  # the base as served: RVC inference .pth written from `pretrained`
    source: str


def models(args: argparse.Namespace) -> Models:
    real = Path(args.models_dir)
    g, d, h = real / "pretrained_v2" / "f0G40k.pth", real / "pretrained_v2" / "f0D40k.pth", real / "hubert_base.pt"
    if g.is_file() and d.is_file() and h.is_file():
        source = f"RVC pretrained v2 40k from {real}"
    else:
        demo = Path(args.out) / "demo"
        ensure_demo_assets(demo)
        g, d, h = demo / FILES["pretrained"], demo / FILES["discriminator"], demo / FILES["hubert"]
        source = "demo pretrained base (random weights, full-size v2 40k); `rvc-lora models fetch` for RVC's"
    served = Path(args.out) / "base.pth"
    if not served.is_file():
        save_rvc_checkpoint(served, load_pretrained_base(g).model, info="bench_fidelity base")
    return Models(g, d, h, served, source)


# --- full fine-tune --------------------------------------------------------------------------------------------------
def batches(data: SegmentDataset, size: int, seed: int) -> Iterator[list[Sample]]:
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < size:
            order += rng.sample(range(len(data)), len(data))
        yield [data[i] for i in order[:size]]
        order = order[size:]


def fine_tune(m: Models, work: Path, voice_path: Path, args: argparse.Namespace, seed: int, log: Path) -> None:
    """The whole generator (enc_q included) and the discriminator, RVC's step and losses, `args.steps` steps."""
    torch.manual_seed(seed)
    base = load_pretrained_base(m.pretrained)
    params = train_params(base.config)
    model = base.model.train()
    model.segment_size = params.segment_frames
    disc = load_discriminator(m.discriminator).train()
    groups = [{"params": list(model.parameters()), "weight_decay": WEIGHT_DECAY}]
    gan = GANTrainer(model, groups, disc, params, f0=True, device=torch.device("cpu"), lr=args.lr)
    info = PreparedInfo.read(work)
    data = SegmentDataset(info.segments, f0=True, hop=info.hop)
    start = time.perf_counter()
    with log.open("a") as f:
        for step, items in zip(range(args.steps), batches(data, args.batch, seed), strict=False):
            losses = gan.step(collate(items))
            row = {"voice": voice_path.stem, "step": step + 1, "s": time.perf_counter() - start, **losses}
            f.write(json.dumps(row) + "\n")
            f.flush()
            if (step + 1) % 10 == 0 or step == 0:
                print(f"  {voice_path.stem} step {step + 1}/{args.steps}: mel {losses['loss_mel']:.2f}, "
                      f"{(time.perf_counter() - start) / (step + 1):.1f} s/step", flush=True)
    save_rvc_checkpoint(voice_path, model.eval(), info=f"bench_fidelity voice {voice_path.stem}: {args.steps} steps "
                        f"lr {args.lr} from {m.pretrained.name}")


# --- evaluation ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HeldOut:
    inputs: list[dict[str, torch.Tensor]]
    seeds: list[int]


def held_out(work: Path, limit: int, seconds: float) -> HeldOut:
    """The first `limit` held-out segments, each cut to `seconds` (10 ms frames)."""
    info = PreparedInfo.read(work)
    data = SegmentDataset(info.segments, f0=True, hop=info.hop)
    frames = int(seconds * 100)
    inputs = []
    for i in range(min(limit, len(data))):
        s = data[i]
        assert s.pitch is not None and s.pitchf is not None
        n = min(frames, s.phone.shape[0])
        inputs.append({"phone": s.phone[None, :n], "phone_lengths": torch.tensor([n]),
                       "pitch": s.pitch[None, :n], "nsff0": s.pitchf[None, :n], "sid": torch.tensor([0])})
    return HeldOut(inputs, list(range(len(inputs))))


def render(model: torch.nn.Module, clips: HeldOut) -> list[np.ndarray]:
    out = []
    for inputs, seed in zip(clips.inputs, clips.seeds, strict=True):
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)  # the same noise for every model: differences are the weights'
            out.append(model.infer(**inputs)[0].flatten().numpy().astype(np.float64))  # type: ignore[operator]
    return out


def pitch_track(audio: np.ndarray, sr: int) -> np.ndarray:
    x16 = resample(audio, sr, 16000)
    return np.asarray(get_f0_extractor(F0_METHOD)(x16, len(x16) // 160, filter_radius=0))


@dataclasses.dataclass
class Reference:
    audio: list[np.ndarray]
    f0: list[np.ndarray]
    sr: int


def distances(ref: Reference, audio: list[np.ndarray]) -> dict[str, float]:
    """Means over the held-out clips."""
    snr = [snr_db(torch.from_numpy(r), torch.from_numpy(a)) for r, a in zip(ref.audio, audio, strict=True)]
    mel = [log_mel_distance(r, a, ref.sr) for r, a in zip(ref.audio, audio, strict=True)]
    f0 = [f0_agreement(r, pitch_track(a, ref.sr)) for r, a in zip(ref.f0, audio, strict=True)]
    cents = [x.cents for x in f0 if not math.isnan(x.cents)]
    gross = [x.gross for x in f0 if not math.isnan(x.gross)]
    return {"snr_db": statistics.mean(snr), "mel_db": statistics.mean(mel),
            "voicing": statistics.mean(x.voicing for x in f0),
            "f0_cents": statistics.mean(cents) if cents else math.nan,
            "f0_gross": statistics.mean(gross) if gross else math.nan}


def subset(adapter: Adapter, prefixes: tuple[str, ...], with_full: bool) -> Adapter | None:
    """The adapter's layers and full deltas under `prefixes` (emb_g counts as any target set but dec's)."""
    def keep(name: str) -> bool:
        return name.startswith(prefixes) or (name == "emb_g.weight" and prefixes != ("dec.",))

    layers = tuple(n for n in adapter.info.target_modules if keep(n))
    full = tuple(n for n in adapter.info.full_delta if keep(n)) if with_full else ()
    tensors = {k: v for k, v in adapter.tensors.items()
               if (k.startswith(FULL_DELTA_PREFIX) and k.removeprefix(FULL_DELTA_PREFIX) in full)
               or (not k.startswith(FULL_DELTA_PREFIX) and k.rsplit(".", 1)[0] in layers)}
    if not tensors:
        return None
    return Adapter(dataclasses.replace(adapter.info, target_modules=layers, full_delta=full), tensors)


TARGET_SETS = {"dec": ("dec.",), "dec+flow": ("dec.", "flow."), "all": ("dec.", "flow.", "enc_p.")}


def configs(args: argparse.Namespace) -> Iterator[tuple[str, int, float | None]]:
    """(extraction targets, rank cap, energy) in the order they are measured: cheap and telling first."""
    for rank in args.ranks:
        yield "all", rank, None
    for energy in args.energies:
        yield "all", max(args.ranks), energy


def truncated(adapter: Adapter, k: int) -> Adapter:
    """The first k rank slots of every layer: exactly the rank-k extraction for SVD and data-aware alike (each
    slot is one singular / eigen direction, kept in order), without factoring again."""
    tensors = {key: t[:, :k] if key.endswith(".lora_B") else t[:k] if key.endswith(".lora_A") else t
               for key, t in adapter.tensors.items()}
    r = min(k, adapter.info.r)
    return Adapter(dataclasses.replace(adapter.info, r=r, lora_alpha=float(r)), tensors)


def evaluate_methods(name: str, served: RawCheckpoint, voice: RawCheckpoint, ref: Reference, clips: HeldOut,
                     args: argparse.Namespace, done: set[tuple[Any, ...]], emit: Any, calibration_dir: Path) -> None:
    """Data-aware extraction (`rvc_lora.calibration`) on every layer with full deltas, per rank: calibrated on
    the voice's training speech (`data`) or on synthetic inputs (`synth`, what needs no data)."""
    for method in args.methods:
        if method == "svd" or all(("all", rank, None, True, method) in done for rank in args.ranks):
            continue
        calib = (prepared_inputs(calibration_dir, args.calibration_s) if method == "data"
                 else synthetic_inputs(served.config, args.calibration_s))
        t0 = time.perf_counter()
        result = extract_adapter(served, voice, rank=max(args.ranks), targets="all", progress=False, evaluate=False,
                                 calibration=calib)
        extract_s = time.perf_counter() - t0
        for rank in args.ranks:
            if ("all", rank, None, True, method) in done:
                continue
            adapter = truncated(result.adapter, rank)
            model = build_voice_model(served, adapter_layout(adapter.info))
            model.load_adapter(adapter)
            size = len(adapter_file_bytes(adapter.tensors, adapter.info, torch.float16))
            emit({"method": f"all r{rank} {method}", "targets": "all", "rank": rank, "energy": None,
                  "full_delta": True, "extraction": method, "r": adapter.info.r, "adapter_bytes": size,
                  "extract_s": extract_s, **distances(ref, render(model, clips))})


def evaluate_voice(name: str, served: RawCheckpoint, voice: RawCheckpoint, clips: HeldOut,
                   args: argparse.Namespace, done: set[tuple[Any, ...]], results: Path, extra: dict[str, Any],
                   calibration_dir: Path) -> None:
    sr = served.config.sr
    full = build_from_raw(voice)
    ref_audio = render(full, clips)
    ref = Reference(ref_audio, [pitch_track(a, sr) for a in ref_audio], sr)
    del full
    voice_bytes = voice.path.stat().st_size

    def emit(row: dict[str, Any]) -> None:
        row = {"voice": name, "voice_bytes": voice_bytes, **extra, **row}
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"  {name:6} {row['method']:<22} {row.get('adapter_bytes', 0) / 1e6:8.3f} MB  SNR {row['snr_db']:6.2f}"
              f"  mel {row['mel_db']:5.2f} dB  voicing {row['voicing']:.3f}  f0 {row['f0_cents']:6.1f} c", flush=True)

    if ("base", None, None) not in done:
        emit({"method": "base alone", "targets": "none", "rank": 0, "energy": None, "full_delta": False,
              "adapter_bytes": 0, **distances(ref, render(build_from_raw(served), clips))})
    evaluate_methods(name, served, voice, ref, clips, args, done, emit, calibration_dir)
    for _targets, rank, energy in configs(args):
        if "svd" not in args.methods:
            break
        variants = [(t, w) for t in TARGET_SETS for w in (True, False)] if energy is None else [("all", True)]
        wanted = [(t, w) for t, w in variants if (t, rank, energy, w) not in done]
        if not wanted:
            continue
        t0 = time.perf_counter()
        result = extract_adapter(served, voice, rank=rank, energy=energy, targets="all", progress=False,
                                 evaluate=False)
        extract_s = time.perf_counter() - t0
        for targets, with_full in wanted:
            adapter = subset(result.adapter, TARGET_SETS[targets], with_full)
            if adapter is None:
                continue
            model = build_voice_model(served, adapter_layout(adapter.info))
            model.load_adapter(adapter)
            size = len(adapter_file_bytes(adapter.tensors, adapter.info, torch.float16))
            label = f"{targets}{'' if with_full else ' -full'} " + (f"e{energy:g}" if energy else f"r{rank}")
            emit({"method": label, "targets": targets, "rank": rank, "energy": energy, "full_delta": with_full,
                  "r": adapter.info.r, "adapter_bytes": size, "extract_s": extract_s,
                  **distances(ref, render(model, clips))})


# --- table -----------------------------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(rows: list[dict[str, Any]]) -> str:
    """Means over voices, one line per setting, sorted by target set then size."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if "method" in r:
            groups[r["method"]].append(r)
    voices = sorted({r["voice"] for r in rows if "method" in r})
    out = [f"means over {len(voices)} voices ({', '.join(voices)}); distances to the full voice on held-out speech",
           f"{'setting':<24} {'MB':>7} {'1/x .pth':>8} {'SNR dB':>7} {'mel dB':>7} {'voicing':>8} "
           f"{'f0 cents':>8} {'f0 gross':>8} {'n':>2}"]

    def key(item: tuple[str, list[dict[str, Any]]]) -> tuple[Any, ...]:
        r = item[1][0]
        return (r["targets"] != "none", r["targets"], not r["full_delta"], r.get("extraction", "svd"),
                r["energy"] is not None, statistics.mean(x["adapter_bytes"] for x in item[1]))

    for method, rs in sorted(groups.items(), key=key):
        mb = statistics.mean(x["adapter_bytes"] for x in rs) / 1e6
        ratio = statistics.mean(x["voice_bytes"] for x in rs) / max(mb * 1e6, 1)
        vals = {k: statistics.mean(x[k] for x in rs if x[k] is not None and not math.isnan(x[k]))
                if any(x[k] is not None and not math.isnan(x[k]) for x in rs) else math.nan
                for k in ("snr_db", "mel_db", "voicing", "f0_cents", "f0_gross")}
        out.append(f"{method:<24} {mb:>7.3f} {ratio if mb else 0:>8.1f} {vals['snr_db']:>7.2f} {vals['mel_db']:>7.2f} "
                   f"{vals['voicing']:>8.3f} {vals['f0_cents']:>8.1f} {vals['f0_gross']:>8.3f} {len(rs):>2}")
    return "\n".join(out)


# --- main ------------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/rvc-lora-fidelity", help="work folder (voices, results)")
    parser.add_argument("--models-dir", default="models", help="where `rvc-lora models fetch` put RVC's files")
    parser.add_argument("--voices", type=int, default=3, help=f"how many speakers (at most {len(SPEAKERS)})")
    parser.add_argument("--steps", type=int, default=12, help="fine-tune steps per voice")
    parser.add_argument("--lr", type=float, default=3e-4, help="fine-tune learning rate (RVC: 1e-4)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--clips", type=int, default=2, help="held-out clips (up to 3.7 s each) per voice")
    parser.add_argument("--clip-s", type=float, default=2.0, help="held-out clip length cap (seconds)")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--energies", type=float, nargs="*", default=list(ENERGIES))
    parser.add_argument("--methods", nargs="+", default=["svd"], choices=["svd", "data", "synth"],
                        help="extractions: plain SVD (every target set), data-aware calibrated on the voice's "
                        "training speech or on synthetic inputs (every layer)")
    parser.add_argument("--calibration-s", type=float, default=CALIBRATION_SECONDS,
                        help="seconds of calibration input for data-aware extraction")
    parser.add_argument("--full", action="store_true", help="the full grid: every speaker, 400 steps at lr 1e-4, "
                        "batch 4, 3 clips, more energies (hours on a CPU; minutes on a GPU)")
    parser.add_argument("--table", action="store_true", help="only print the table of what --out holds")
    args = parser.parse_args()
    out = Path(args.out)
    results = out / RESULTS
    if args.table:
        print(table(read_rows(results)))
        return
    if args.full:
        args.voices, args.steps, args.lr, args.batch, args.clips, args.clip_s = len(SPEAKERS), 400, 1e-4, 4, 3, 3.7
        args.energies = list(FULL_ENERGIES)
    exe = require_espeak()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster than two descheduled ones
    out.mkdir(parents=True, exist_ok=True)
    m = models(args)
    served = read_rvc_checkpoint(m.served)
    print(f"base: {m.source}; {args.voices} voices, {args.steps} steps lr {args.lr} batch {args.batch}; "
          f"results -> {results}", flush=True)
    for i, (name, voice, pitch, speed, lang) in enumerate(SPEAKERS[: args.voices]):
        vdir = out / "voices" / name
        texts = TEXTS[lang]
        speak(exe, voice, pitch, speed, texts[:-HELD_OUT], vdir / "train-wav")
        speak(exe, voice, pitch, speed, texts[-HELD_OUT:], vdir / "heldout-wav")
        for part in ("train", "heldout"):
            if not (vdir / part / "dataset.json").is_file():
                run_prepare(vdir / f"{part}-wav", vdir / part, m.served, m.hubert, F0_METHOD, min_total_s=1.0,
                            progress=False)
        voice_path = vdir / f"{name}.pth"
        if not voice_path.is_file():
            print(f"fine-tuning {name} ({voice}, pitch {pitch})", flush=True)
            fine_tune(m, vdir / "train", voice_path, args, seed=100 + i, log=out / "train_log.jsonl")
        done: set[tuple[Any, ...]] = {("base", None, None)} if any(r["voice"] == name and r["targets"] == "none"
                                             for r in read_rows(results) if "method" in r) else set()
        done |= {(r["targets"], r["rank"], r["energy"], r["full_delta"]) + ((r["extraction"],) if "extraction" in r
                 else ()) for r in read_rows(results) if r.get("voice") == name and "method" in r
                 and r["targets"] != "none"}
        extra = {"speaker": voice, "pitch": pitch, "steps": args.steps, "lr": args.lr, "base_source": m.source}
        clips = held_out(vdir / "heldout", args.clips, args.clip_s)
        evaluate_voice(name, served, read_rvc_checkpoint(voice_path), clips, args, done, results, extra,
                       vdir / "train")
    print(table(read_rows(results)))


if __name__ == "__main__":
    main()
