"""The trained voice's retrieval `.index`, as RVC's "train index" step builds it: every prepared
segment's content features (the 20 ms `phone` frames, before the 2x repeat the loader applies) through
`build_index`, written beside the adapter."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rvc_lora.pipeline.index import build_index
from rvc_lora.train.data import PreparedInfo
from rvc_lora.train.errors import TrainingDataError


def build_voice_index(work_dir: str | os.PathLike[str], adapter: str | os.PathLike[str]) -> Path:
    """Features `[N, 256|768]` of every segment in `work_dir` -> `<adapter stem>.index` beside `adapter`."""
    info = PreparedInfo.read(Path(work_dir))
    parts = []
    for ref in info.segments:
        try:
            with np.load(ref.path) as z:
                parts.append(np.asarray(z["phone"], dtype=np.float32))
        except (OSError, KeyError, ValueError) as exc:
            raise TrainingDataError(f"{ref.path}: unreadable prepared segment ({exc}); run prepare again") from exc
    if not parts:
        raise TrainingDataError(f"{info.root}: no prepared segments to build an index from")
    return build_index(np.concatenate(parts), Path(adapter).with_suffix(".index"))
