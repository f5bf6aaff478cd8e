"""The prepared training set: its manifest, the per-segment dataset, RVC's collate and bucketed batches.

`prepare.py` writes `<work_dir>/dataset.json` and one `.npz` per segment (`wav` at the model rate,
`spec` linear magnitude, `phone` content features at 20 ms, and for f0 models `pitch` coarse ids and
`pitchf` Hz at 10 ms). Loading follows RVC's `TextAudioLoaderMultiNSFsid` (spec §4.3): features repeated
x2, everything cut to 900 frames, then to the spectrogram's length when they differ.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from rvc_lora.train.errors import TrainingDataError

MANIFEST = "dataset.json"
FORMAT = "rvc-lora-prepared"
FORMAT_VERSION = 1
MAX_FRAMES = 900  # RVC cuts every item to 900 frames (9 s)
DEFAULT_BOUNDARIES = tuple(range(100, 1000, 100))  # RVC's bucket edges, in `bucket_length` units
MUTE_COPIES = 2  # RVC appends the mute sample twice to the file list


def bucket_length(samples: int, hop: int) -> int:
    """RVC's sampler length: the float32 wav's byte size // (3 hop), here without the ~58-byte header."""
    return samples * 4 // (3 * hop)


@dataclass(frozen=True)
class SegmentRef:
    """One prepared segment: its `.npz`, length at the model rate, and the recording it came from."""

    path: Path
    samples: int
    source: str


@dataclass(frozen=True)
class PreparedInfo:
    """`dataset.json`: what the segments were made for and where they are."""

    root: Path
    sr: int
    version: str
    f0: bool
    f0_method: str | None
    n_fft: int
    hop: int
    segments: tuple[SegmentRef, ...]
    mute: SegmentRef | None

    @classmethod
    def read(cls, work_dir: str | Path) -> PreparedInfo:
        root = Path(work_dir)
        path = root / MANIFEST
        if not path.is_file():
            raise TrainingDataError(f"{root}: no {MANIFEST}; run `rvc-lora prepare DATA_DIR {root}` first")
        try:
            meta: dict[str, Any] = json.loads(path.read_text())
            if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
                raise ValueError(f"format {meta.get('format')!r} v{meta.get('format_version')} is not readable here")

            def ref(item: dict[str, Any]) -> SegmentRef:
                return SegmentRef(root / str(item["file"]), int(item["samples"]), str(item.get("source", "")))

            mute = meta.get("mute")
            return cls(root, int(meta["sr"]), str(meta["version"]), bool(meta["f0"]), meta.get("f0_method"),
                       int(meta["n_fft"]), int(meta["hop"]), tuple(ref(s) for s in meta["segments"]),
                       ref(mute) if mute else None)
        except (ValueError, KeyError, TypeError) as exc:
            raise TrainingDataError(f"{path}: not a readable prepared-data manifest: {exc}") from exc

    def training_items(self) -> list[SegmentRef]:
        """The file list RVC trains on: every segment, then the mute sample twice."""
        return list(self.segments) + ([self.mute] * MUTE_COPIES if self.mute is not None else [])


class Sample(NamedTuple):
    """One aligned item: phone `[T, D]`, pitch `[T]` int64 / pitchf `[T]` (None without f0), spec `[C, T]`,
    wave `[T * hop]`, sid (int)."""

    phone: Tensor
    pitch: Tensor | None
    pitchf: Tensor | None
    spec: Tensor
    wave: Tensor
    sid: int


class Batch(NamedTuple):
    """RVC's collated batch (spec §4.3), sorted by spectrogram length, longest first. Shapes: phone
    `[B, T, D]`, pitch/pitchf `[B, T]` (None without f0), spec `[B, C, T]`, wave `[B, 1, T * hop]`."""

    phone: Tensor
    phone_lengths: Tensor
    pitch: Tensor | None
    pitchf: Tensor | None
    spec: Tensor
    spec_lengths: Tensor
    wave: Tensor
    wave_lengths: Tensor
    sid: Tensor

    def to(self, device: torch.device | str) -> Batch:
        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=True)

        return Batch(move(self.phone), move(self.phone_lengths), None if self.pitch is None else move(self.pitch),
                     None if self.pitchf is None else move(self.pitchf), move(self.spec), move(self.spec_lengths),
                     move(self.wave), move(self.wave_lengths), move(self.sid))


def load_segment(ref: SegmentRef, f0: bool, hop: int, max_frames: int = MAX_FRAMES) -> Sample:
    """Read one `.npz` and align it as RVC's loader does."""
    try:
        with np.load(ref.path) as z:
            phone = np.repeat(z["phone"], 2, axis=0)  # 20 ms content frames -> 10 ms
            pitch, pitchf = (z["pitch"], z["pitchf"]) if f0 else (None, None)
            spec, wave = z["spec"], z["wav"]
    except (OSError, KeyError, ValueError) as exc:
        raise TrainingDataError(f"{ref.path}: unreadable prepared segment ({exc}); run prepare again") from exc
    n = min(len(phone), max_frames)
    frames = min(n, spec.shape[1])
    if n != spec.shape[1]:  # RVC cuts the wave only when the lengths disagree
        wave = wave[: frames * hop]
    return Sample(torch.from_numpy(np.ascontiguousarray(phone[:frames], dtype=np.float32)),
                  None if pitch is None else torch.from_numpy(pitch[:frames].astype(np.int64)),
                  None if pitchf is None else torch.from_numpy(pitchf[:frames].astype(np.float32)),
                  torch.from_numpy(np.ascontiguousarray(spec[:, :frames], dtype=np.float32)),
                  torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), 0)


class SegmentDataset(Dataset[Sample]):
    """The prepared segments as aligned `Sample`s (read from disk on access)."""

    def __init__(self, items: Sequence[SegmentRef], f0: bool, hop: int) -> None:
        self.items, self.f0, self.hop = list(items), f0, hop

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        return load_segment(self.items[i], self.f0, self.hop)

    def lengths(self) -> list[int]:
        return [bucket_length(item.samples, self.hop) for item in self.items]


def _pad_stack(tensors: Sequence[Tensor], length: int) -> Tensor:
    """Zero-pad the last axis of each tensor to `length` and stack."""
    out = tensors[0].new_zeros((len(tensors), *tensors[0].shape[:-1], length))
    for i, t in enumerate(tensors):
        out[i, ..., : t.shape[-1]] = t
    return out


def collate(samples: Sequence[Sample]) -> Batch:
    """RVC's collate: sort by spectrogram length (descending), zero-pad every field."""
    order = sorted(range(len(samples)), key=lambda i: -samples[i].spec.shape[1])
    items = [samples[i] for i in order]
    lengths = torch.tensor([s.phone.shape[0] for s in items], dtype=torch.long)
    spec_lengths = torch.tensor([s.spec.shape[1] for s in items], dtype=torch.long)
    wave_lengths = torch.tensor([s.wave.shape[0] for s in items], dtype=torch.long)
    phone = _pad_stack([s.phone.t() for s in items], int(lengths.max())).transpose(1, 2)  # [B, T, D]
    pitch = pitchf = None
    if items[0].pitch is not None:
        pitch = _pad_stack([s.pitch for s in items if s.pitch is not None], int(lengths.max()))
        pitchf = _pad_stack([s.pitchf for s in items if s.pitchf is not None], int(lengths.max()))
    spec = _pad_stack([s.spec for s in items], int(spec_lengths.max()))
    wave = _pad_stack([s.wave.unsqueeze(0) for s in items], int(wave_lengths.max()))
    sid = torch.tensor([s.sid for s in items], dtype=torch.long)
    return Batch(phone, lengths, pitch, pitchf, spec, spec_lengths, wave, wave_lengths, sid)


class BucketBatchSampler(Sampler[list[int]]):
    """RVC's `DistributedBucketSampler` on one process (spec §4.3).

    Item i goes to bucket j when `boundaries[j] < lengths[i] <= boundaries[j + 1]`; items outside every
    bucket are dropped and empty buckets removed. Each epoch a generator seeded with `seed + epoch`
    permutes every bucket, pads it to a multiple of `batch_size` by repeating its own permuted indices,
    cuts it into batches, and permutes the batch order."""

    def __init__(self, lengths: Sequence[int], batch_size: int, boundaries: Sequence[int] = DEFAULT_BOUNDARIES,
                 *, seed: int = 0, shuffle: bool = True) -> None:
        if batch_size < 1:
            raise TrainingDataError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.shuffle, self.epoch = batch_size, seed, shuffle, 0
        buckets: list[list[int]] = [[] for _ in range(len(boundaries) - 1)]
        for i, length in enumerate(lengths):
            j = int(np.searchsorted(boundaries, length, side="left")) - 1  # boundaries[j] < length <= [j + 1]
            if 0 <= j < len(buckets):
                buckets[j].append(i)
        self.buckets = [b for b in buckets if b]
        self.dropped = len(lengths) - sum(len(b) for b in self.buckets)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _padded(self, n: int) -> int:
        return n + (-n) % self.batch_size

    def __len__(self) -> int:
        return sum(self._padded(len(b)) // self.batch_size for b in self.buckets)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        batches: list[list[int]] = []
        for bucket in self.buckets:
            order = torch.randperm(len(bucket), generator=g).tolist() if self.shuffle else list(range(len(bucket)))
            need = self._padded(len(bucket)) - len(bucket)
            order = order + order * (need // len(bucket)) + order[: need % len(bucket)]
            batches += [[bucket[k] for k in order[j : j + self.batch_size]]
                        for j in range(0, len(order), self.batch_size)]
        if self.shuffle:
            batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        return iter(batches)
