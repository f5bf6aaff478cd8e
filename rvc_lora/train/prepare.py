"""`rvc-lora prepare`: recordings -> training segments, in RVC's order and numbers (spec §4.1-§4.2).

Per recording: decode, resample to the model rate, causal 5th-order Butterworth high-pass at 48 Hz,
slice at silences, cut into 3.7 s pieces overlapping by 0.3 s, normalise each piece
(`x / peak * 0.675 + 0.25 x`; pieces with a peak above 2.5 are dropped), resample to 16 kHz, then f0
(Hz and coarse ids, from the 16 kHz piece), content features (v1 256-d / v2 768-d) and the linear
spectrogram of the model-rate piece. RVC's mute sample is made the same way from silence.

Everything lands in `<work_dir>/segments/` (one `.npz` per piece) plus `<work_dir>/dataset.json`.
A recording is re-used from the cache when its bytes and every setting that shapes its output are
unchanged, so a second run only processes new or changed files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.signal
import torch
from numpy.typing import NDArray
from tqdm import tqdm

from rvc_lora.config import SynthConfig
from rvc_lora.errors import AudioError, ModelUnavailableError, ParameterError
from rvc_lora.frames import HOP_16K, SR_16K
from rvc_lora.pipeline.audio import AUDIO_SUFFIXES, decode_audio, resample
from rvc_lora.pipeline.content import ContentEncoder
from rvc_lora.pipeline.f0 import F0_METHODS, F0Extractor, get_f0_extractor
from rvc_lora.pipeline.f0.base import RMVPE_HINT
from rvc_lora.pipeline.steps import f0_to_coarse
from rvc_lora.train.data import DEFAULT_BOUNDARIES, FORMAT, FORMAT_VERSION, MANIFEST
from rvc_lora.train.errors import TrainingDataError
from rvc_lora.train.mel import spectrogram
from rvc_lora.train.pretrained import read_base_config
from rvc_lora.train.slicer import Slicer, segment

log = logging.getLogger(__name__)

HIGHPASS_ORDER, HIGHPASS_HZ = 5, 48
PEAK_LIMIT = 2.5  # pieces louder than this are dropped (clipped or broken input)
NORM_PEAK, NORM_ALPHA = 0.9, 0.75  # y = x / peak * (0.9 * 0.75) + (1 - 0.75) * x
MUTE_SECONDS = 3.0
MIN_PER_S, MAX_PER_S = 1.0, 6.0  # pieces up to per + 0.3 s must stay under the last bucket (6.75 s)
CACHE_VERSION = 1  # bump when the processing changes: every cached recording is then redone
SEGMENTS = "segments"


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclass(frozen=True)
class PrepareSummary:
    """What `run_prepare` did: recordings used, segments and minutes of audio kept, what was skipped."""

    work_dir: Path
    files: int
    segments: int
    minutes: float
    reused: int
    skipped: tuple[SkippedFile, ...] = ()
    dropped_segments: tuple[SkippedFile, ...] = ()

    def __str__(self) -> str:
        return self.format()

    def format(self) -> str:
        lines = [f"{self.files} files -> {self.segments} segments, {self.minutes:.1f} min of audio "
                 f"({self.reused} files from the cache) in {self.work_dir}"]
        lines += [f"skipped {s.path}: {s.reason}" for s in self.skipped]
        if self.dropped_segments:
            lines.append(f"{len(self.dropped_segments)} segments dropped (e.g. {self.dropped_segments[0].path}: "
                         f"{self.dropped_segments[0].reason})")
        return "\n".join(lines)


def highpass(audio: NDArray[np.floating], sr: int) -> NDArray[np.float64]:
    """RVC's training filter: causal `lfilter` with `butter(5, 48 Hz, "high")` at the model rate, float64 out."""
    b, a = scipy.signal.butter(HIGHPASS_ORDER, HIGHPASS_HZ, btype="high", fs=sr)
    return np.asarray(scipy.signal.lfilter(b, a, audio), dtype=np.float64)


def normalize(piece: NDArray[np.floating]) -> tuple[NDArray[np.float64] | None, str]:
    """RVC's per-piece loudness rule -> (normalised piece, "") or (None, why it is dropped)."""
    x = np.asarray(piece, dtype=np.float64)
    if not np.isfinite(x).all():
        return None, "contains NaN or inf"
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak > PEAK_LIMIT:
        return None, f"peak {peak:.2f} > {PEAK_LIMIT} (clipped or broken)"
    if peak == 0.0:
        return None, "silent"
    return x / peak * (NORM_PEAK * NORM_ALPHA) + (1 - NORM_ALPHA) * x, ""


@dataclass
class _Tools:
    """What turns a 16 kHz piece into features; models are loaded on first use (a cached run needs none)."""

    cfg: SynthConfig
    hubert: str | os.PathLike[str] | ContentEncoder
    f0_method: str | None
    rmvpe_path: str | os.PathLike[str] | None
    device: str
    n_fft: int
    _encoder: ContentEncoder | None = None
    _f0: F0Extractor | None = None

    def encoder(self) -> ContentEncoder:
        if self._encoder is None:
            enc = self.hubert if isinstance(self.hubert, ContentEncoder) else ContentEncoder.from_path(
                Path(self.hubert), device=self.device)
            if enc.feature_dim(self.cfg.version) != self.cfg.content_dim:
                raise TrainingDataError(f"{enc.source}: gives {enc.feature_dim(self.cfg.version)}-d "
                                        f"{self.cfg.version} features, the base model takes {self.cfg.content_dim}")
            self._encoder = enc
        return self._encoder

    def pitch(self, x16: NDArray[np.float32]) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        assert self.f0_method is not None
        if self._f0 is None:
            self._f0 = get_f0_extractor(self.f0_method, device=self.device,
                                       rmvpe_path=None if self.rmvpe_path is None else Path(self.rmvpe_path))
        f0 = self._f0(x16, len(x16) // HOP_16K, filter_radius=0)  # training: no median filter (spec §4.2)
        return f0_to_coarse(np.array(f0)), np.asarray(f0, dtype=np.float32)

    def features(self, y: NDArray[np.float32], x16: NDArray[np.float32], *, silent: bool = False) -> dict[str, Any]:
        """Arrays of one piece (model-rate `y`, 16 kHz `x16`) as stored in its `.npz`."""
        phone = self.encoder().extract(torch.from_numpy(x16), self.cfg.version)[0].float().cpu().numpy()
        hop = self.cfg.upp
        spec = spectrogram(torch.from_numpy(y)[None], self.n_fft, hop, self.n_fft)[0].numpy()
        out: dict[str, Any] = {"wav": y, "spec": spec, "phone": phone}
        if self.f0_method is not None:
            if silent:  # the mute sample: unvoiced throughout
                p_len = len(x16) // HOP_16K
                out["pitch"], out["pitchf"] = np.ones(p_len, np.int64), np.zeros(p_len, np.float32)
            else:
                out["pitch"], out["pitchf"] = self.pitch(x16)
        return out

    def identity(self) -> str:
        """What the outputs depend on besides the recording itself (part of every cache key)."""
        if isinstance(self.hubert, ContentEncoder):
            digest = hashlib.sha256()
            for k, v in self.hubert.state_dict().items():
                digest.update(k.encode())
                digest.update(v.detach().float().cpu().numpy().tobytes())
            hubert = f"module:{digest.hexdigest()}"
        else:
            p = Path(self.hubert).resolve()
            st = p.stat() if p.exists() else None
            hubert = f"{p}:{st.st_size if st else 0}:{st.st_mtime_ns if st else 0}"
        rmvpe = str(Path(self.rmvpe_path).resolve()) if self.rmvpe_path and self.f0_method == "rmvpe" else ""
        return json.dumps([CACHE_VERSION, self.cfg.sr, self.cfg.version, self.cfg.f0, self.cfg.upp, self.n_fft,
                           self.f0_method, hubert, rmvpe])


def _audio_files(data_dir: Path) -> tuple[list[Path], list[SkippedFile]]:
    if not data_dir.is_dir():
        raise TrainingDataError(f"{data_dir}: no such folder (expected a folder of recordings)")
    files, other = [], []
    for p in sorted(data_dir.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(data_dir).parts):
            continue
        if p.suffix.lower() in AUDIO_SUFFIXES:
            files.append(p)
        else:
            other.append(SkippedFile(str(p), f"not an audio file ({', '.join(sorted(AUDIO_SUFFIXES))})"))
    if not files:
        raise TrainingDataError(f"{data_dir}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in this folder")
    return files, other


def _file_key(path: Path, identity: str, per: float) -> str:
    digest = hashlib.sha256(f"{identity}|{per}".encode())
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:20]


def _save_npz(path: Path, arrays: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


@dataclass
class _FileResult:
    segments: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _process(path: Path, key: str, out_dir: Path, tools: _Tools, per: float, min_samples: int) -> _FileResult:
    sr = tools.cfg.sr
    decoded, file_sr = decode_audio(path)
    audio = highpass(resample(decoded, file_sr, sr), sr)
    result = _FileResult(seconds=len(audio) / sr)
    n = 0
    for chunk in Slicer(sr).slice(audio):
        for piece in segment(chunk, sr, per=per):
            name = f"{path.name} @ {n}"
            n += 1
            y, why = normalize(piece)
            if y is None or len(piece) < min_samples:
                result.dropped.append({"piece": name, "reason": why or f"{len(piece) / sr:.2f} s is too short"})
                continue
            y32 = y.astype(np.float32)
            x16 = np.asarray(resample(y, sr, SR_16K), dtype=np.float32)
            arrays = tools.features(y32, x16)
            if not np.isfinite(arrays["phone"]).all():
                result.dropped.append({"piece": name, "reason": "content features contain NaN"})
                continue
            file = f"{SEGMENTS}/{key}_{n - 1:04d}.npz"
            _save_npz(out_dir.parent / file, arrays)
            result.segments.append({"file": file, "samples": len(y32)})
    return result


def _mute(out_dir: Path, tools: _Tools) -> dict[str, Any]:
    key = hashlib.sha256(tools.identity().encode()).hexdigest()[:20]
    file = f"{SEGMENTS}/mute_{key}.npz"
    n = int(MUTE_SECONDS * tools.cfg.sr)
    if not (out_dir.parent / file).is_file():
        arrays = tools.features(np.zeros(n, np.float32), np.zeros(int(MUTE_SECONDS * SR_16K), np.float32),
                                silent=True)
        _save_npz(out_dir.parent / file, arrays)
    return {"file": file, "samples": n, "source": "<mute>"}


def _iter_files(files: list[Path], progress: bool) -> Iterator[Path]:
    yield from tqdm(files, desc="prepare", unit="file", disable=not progress)


def run_prepare(data_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str], base: str | os.PathLike[str],
                hubert: str | os.PathLike[str] | ContentEncoder, f0_method: str = "rmvpe", *,
                rmvpe_path: str | os.PathLike[str] | None = None, device: str = "cpu", per: float = 3.7,
                base_config: SynthConfig | None = None, min_total_s: float = 10.0, skip_bad: bool = False,
                progress: bool = True) -> PrepareSummary:
    """Prepare every recording under `data_dir` for training a LoRA over `base` into `work_dir`.

    `base` fixes the model rate, v1/v2 features and f0 (its `enc_q` is not needed here); `hubert` is the
    content encoder (`hubert_base.pt`, a HF folder, or a loaded `ContentEncoder`); `f0_method` one of
    pm / harvest / rmvpe / fcpe (rmvpe needs `rmvpe_path`); `per` the piece length in seconds (RVC: 3.7,
    3.0 on small GPUs). Raises `TrainingDataError` naming the path for a missing or empty folder, an
    undecodable file (unless `skip_bad`: then it is listed as skipped) and too little usable audio."""
    data_dir, work = Path(data_dir), Path(work_dir)
    cfg = read_base_config(base, base_config)
    files, skipped = _audio_files(data_dir)
    n_fft = 2 * (cfg.spec_channels - 1)
    tools = _Tools(cfg, hubert, f0_method if cfg.f0 else None, rmvpe_path, device, n_fft)
    if cfg.f0 and f0_method not in F0_METHODS:
        raise ParameterError(f"unknown f0_method {f0_method!r}; valid: {', '.join(F0_METHODS)}")
    if cfg.f0 and f0_method == "rmvpe" and (rmvpe_path is None or not Path(rmvpe_path).is_file()):
        raise ModelUnavailableError(RMVPE_HINT if rmvpe_path is None else f"rmvpe.pt {str(rmvpe_path)!r}: no such file "
                                    "(set by --rmvpe; `rvc-lora models fetch` downloads it)")
    if not MIN_PER_S <= per <= MAX_PER_S:
        raise ParameterError(f"per: pieces of {per} s; use {MIN_PER_S}..{MAX_PER_S} s (RVC: 3.7, or 3.0 on small GPUs)")
    out_dir = work / SEGMENTS
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = tools.identity()
    min_samples = -(-(DEFAULT_BOUNDARIES[0] + 1) * 3 * cfg.upp // 4)  # shorter pieces never reach a bucket
    segments: list[dict[str, Any]] = []
    dropped: list[SkippedFile] = []
    usable: dict[str, float] = {}
    reused = 0
    keys: set[str] = set()
    for path in _iter_files(files, progress):
        rel = str(path.relative_to(data_dir))
        key = _file_key(path, identity, per)
        keys.add(key)
        marker = out_dir / f"{key}.json"
        cached = json.loads(marker.read_text()) if marker.is_file() else None
        if cached is not None and all((work / s["file"]).is_file() for s in cached["segments"]):
            result = _FileResult(cached["segments"], cached["dropped"], cached["seconds"])
            reused += 1
        else:
            try:
                result = _process(path, key, out_dir, tools, per, min_samples)
            except AudioError as exc:
                if not skip_bad:
                    raise TrainingDataError(f"{path}: cannot be used: {exc}") from exc
                skipped.append(SkippedFile(str(path), str(exc)))
                continue
            _write_json(marker, {"source": rel, "segments": result.segments, "dropped": result.dropped,
                                 "seconds": result.seconds})
        dropped += [SkippedFile(d["piece"], d["reason"]) for d in result.dropped]
        if not result.segments:
            skipped.append(SkippedFile(str(path), f"no usable audio ({result.seconds:.2f} s; pieces shorter than "
                                                  f"{min_samples / cfg.sr:.2f} s, silent or clipped are dropped)"))
        usable[str(path)] = sum(s["samples"] for s in result.segments) / cfg.sr
        segments += [{**s, "source": rel} for s in result.segments]
    total = sum(usable.values())
    if total < min_total_s:
        detail = ", ".join(f"{p}: {s:.2f} s" for p, s in list(usable.items())[:5])
        raise TrainingDataError(f"{data_dir}: too little usable audio: {total:.2f} s ({detail or 'no usable file'}); "
                                f"at least {min_total_s:g} s is needed, 10-30 minutes recommended")
    mute = _mute(out_dir, tools)
    _prune(out_dir, keys, {Path(s["file"]).name for s in segments} | {Path(mute["file"]).name})
    _write_json(work / MANIFEST, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "sr": cfg.sr, "version": cfg.version, "f0": cfg.f0,
        "f0_method": tools.f0_method, "n_fft": n_fft, "hop": cfg.upp, "per": per,
        "segments": segments, "mute": mute,
        "skipped": [{"path": s.path, "reason": s.reason} for s in skipped]})
    summary = PrepareSummary(work, sum(1 for s in usable.values() if s > 0), len(segments), total / 60, reused,
                             tuple(skipped), tuple(dropped))
    log.info("%s", summary.format())
    return summary


def _prune(out_dir: Path, keys: set[str], keep: set[str]) -> None:
    """Drop what no current recording refers to (recordings removed or changed since a past run)."""
    for p in out_dir.iterdir():
        if (p.suffix == ".npz" and p.name not in keep) or (p.suffix == ".json" and p.stem not in keys):
            p.unlink()
