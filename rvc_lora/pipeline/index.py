"""Retrieval index: RVC's faiss `.index` files and the feature blend (spec §3.6), and index training (§4.8).

faiss is optional (`pip install rvc-lora[index]`); it is imported only when an index is loaded or built.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rvc_lora.errors import IndexFileError, ModelUnavailableError, ParameterError

__all__ = ["RetrievalIndex", "build_index", "n_ivf_for", "probe_index_file"]

K = 8  # neighbours per frame (RVC)
KMEANS_ABOVE = 200_000  # RVC replaces larger feature sets by k-means centres before training
KMEANS_CENTRES = 10_000
ADD_BATCH = 8192
PROBE_HEADROOM = 512 << 20  # address space the probe may take beyond 4x the file, on top of what it has mapped
PROBE_TIMEOUT_S = 120.0
PROBE_REFUSED, PROBE_OUT_OF_MEMORY = 3, 4  # exit statuses of rvc_lora.pipeline.index_probe


def faiss_module() -> ModuleType:
    try:
        import faiss
    except ImportError as e:
        raise ModelUnavailableError(
            "retrieval index needs faiss, which is not installed: pip install 'rvc-lora[index]' (faiss-cpu)"
        ) from e
    return faiss


def _reason(e: Exception) -> str:
    """faiss errors read 'Error in <signature> at <file>:<line>: [Error: ]<reason>'; keep the reason."""
    lines = str(e).strip().splitlines()
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", lines[0]) if lines else type(e).__name__


class RetrievalIndex:
    """A loaded `.index` with its stored vectors (`big`, `[ntotal, dim]` float32, reconstructed once at load)."""

    def __init__(self, index: Any, big: np.ndarray, path: Path) -> None:
        self._index = index
        self.big = big
        self.path = path
        self._file_bytes = path.stat().st_size if path.is_file() else 0

    @property
    def nbytes(self) -> int:
        """Host memory held: the reconstructed vectors, plus the faiss index itself (about its file's size)."""
        return int(self.big.nbytes) + self._file_bytes

    @classmethod
    def from_path(cls, path: str | Path, dim: int | None = None, *, max_bytes: int | None = None) -> RetrievalIndex:
        """Read an RVC index (any faiss index that can `reconstruct_n`; RVC writes `IVF{n},Flat`, nprobe 1, which is
        kept as stored). `dim`: the feature width the model produces (256 v1 / 768 v2), checked here. `max_bytes`:
        the most its vectors may take once reconstructed (`ntotal * d` float32), checked before they are: a
        product-quantized index of 1 MB can hold 470 MB of them."""
        faiss = faiss_module()
        path = Path(path)
        if not path.is_file():
            raise IndexFileError(f"index file {path} does not exist")
        try:
            index = faiss.read_index(str(path))
        except Exception as e:  # faiss raises RuntimeError for every malformed file
            raise IndexFileError(f"{path} is not a readable faiss index ({_reason(e)})") from e
        if index.ntotal == 0:
            raise IndexFileError(f"{path} holds no vectors")
        _check_claimed_size(index, path)
        loaded_bytes = int(index.ntotal) * int(index.d) * 4
        if max_bytes is not None and loaded_bytes > max_bytes:
            raise IndexFileError(f"{path} holds {index.ntotal} vectors of {index.d} dimensions: {loaded_bytes >> 20} "
                                 f"MiB once loaded, more than the limit of {max_bytes >> 20} MiB")
        try:
            big = np.ascontiguousarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)
        except Exception as e:
            raise IndexFileError(f"{path}: cannot read back its vectors ({_reason(e)})") from e
        if not np.isfinite(big).all():  # retrieval would blend NaN into every frame near them
            raise IndexFileError(f"{path} holds NaN or infinite vectors")
        loaded = cls(index, big, path)
        if dim is not None:
            loaded.check_dim(dim)
        return loaded

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def check_dim(self, dim: int) -> None:
        if dim != self.dim:
            raise IndexFileError(
                f"{self.path} holds {self.dim}-d features but the model uses {dim}-d features "
                "(v1 models: 256, v2 models: 768); use an index trained for this model version"
            )

    def search(self, query: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
        """`[F, dim]` float32 queries -> (squared L2 distances `[F, k]`, row ids `[F, k]`, -1 = no neighbour)."""
        dist, ix = self._index.search(np.ascontiguousarray(query, dtype=np.float32), k)
        return dist, ix

    def retrieve(self, query: np.ndarray) -> np.ndarray:
        """`[F, dim]` float32 queries -> `[F, dim]` float32 weighted mean of their K nearest stored vectors.

        RVC's weights are `(1 / dist)**2` with dist the squared L2 distance, normalised per frame. Where RVC gets
        inf/NaN we do what a user expects: an exact match (dist 0, or so small that the weight overflows) takes
        all the weight (shared between exact matches), and a frame with no neighbour at all (an empty IVF list
        under nprobe 1) keeps its own features."""
        query = np.ascontiguousarray(query, dtype=np.float32)
        if query.ndim != 2:
            raise ParameterError(f"index query must be [frames, {self.dim}], got shape {query.shape}")
        self.check_dim(query.shape[1])
        dist, ix = self._index.search(query, K)
        with np.errstate(divide="ignore", over="ignore"):
            weight = np.square(1 / dist)
        weight[ix < 0] = 0  # missing hit: faiss gives dist FLT_MAX, so RVC's weight is already exactly 0
        exact = np.isinf(weight)
        rows = exact.any(axis=1)
        weight[rows] = exact[rows]
        total = weight.sum(axis=1, keepdims=True)
        empty = total[:, 0] == 0
        total[empty] = 1
        weight /= total
        out: np.ndarray = np.sum(self.big[np.maximum(ix, 0)] * np.expand_dims(weight, axis=2), axis=1)
        out[empty] = query[empty]
        return out

    def blend(self, feats: Tensor, index_rate: float) -> Tensor:
        """Content features `[1, F, dim]` -> `index_rate * retrieved + (1 - index_rate) * feats`, same shape, dtype
        and device, computed in RVC's order: search in float32 numpy, retrieved cast to the features' dtype."""
        if not 0.0 <= index_rate <= 1.0:
            raise ParameterError(f"index_rate must be within [0, 1], got {index_rate}")
        if feats.dim() != 3 or feats.shape[0] != 1:
            raise ParameterError(f"features must be [1, frames, dim], got shape {tuple(feats.shape)}")
        self.check_dim(int(feats.shape[-1]))
        if index_rate == 0:
            return feats
        query = feats[0].detach().to(device="cpu", dtype=torch.float32).numpy()
        retrieved = torch.from_numpy(self.retrieve(query)).to(dtype=feats.dtype).unsqueeze(0).to(feats.device)
        return retrieved * index_rate + (1 - index_rate) * feats


def _check_claimed_size(index: Any, path: Path) -> None:
    """Refuse a header that claims more vectors than the file can hold, before `reconstruct_n` allocates
    `[ntotal, d]` floats for them (a few bytes of a crafted header could otherwise ask for terabytes)."""
    per_vector = max(int(getattr(index, "code_size", 0) or 0), 1)  # Flat / IVF-Flat store d*4 bytes a vector
    size = path.stat().st_size
    if index.ntotal * per_vector > size:
        raise IndexFileError(f"{path} claims {index.ntotal} vectors of {per_vector} bytes, more than its {size} bytes "
                             "can hold (a damaged or crafted file)")


def probe_index_file(path: str | Path, dim: int | None = None, *, max_bytes: int | None = None,
                     timeout_s: float = PROBE_TIMEOUT_S) -> tuple[int, int]:
    """Read an untrusted `.index` in a child process -> `(ntotal, dim)`; IndexFileError if it is unreadable.

    faiss's reader trusts the sizes in the file: a crafted header makes it allocate what the header says, and a
    damaged one can crash it. The child runs under an address-space limit (4x the file + 512 MiB beyond what
    it has mapped once loaded, ample for a real index, plus `max_bytes`) and a timeout, so a hostile upload
    costs a failed child, never the server's memory or life. `max_bytes`: as for `RetrievalIndex.from_path`,
    checked in the child before the vectors are reconstructed.
    """
    path = Path(path)
    if not path.is_file():
        raise IndexFileError(f"index file {path} does not exist")
    faiss_module()  # a missing faiss is the caller's configuration error, not the file's
    budget = PROBE_HEADROOM + 4 * path.stat().st_size + (max_bytes or 0)
    cmd = [sys.executable, "-m", "rvc_lora.pipeline.index_probe", str(path), str(dim or 0), str(budget),
           str(max_bytes or 0)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired as e:
        raise IndexFileError(f"{path} took longer than {timeout_s:g} s to read") from e
    if done.returncode == 0:
        info = json.loads(done.stdout)
        return int(info["ntotal"]), int(info["dim"])
    message = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    if done.returncode == PROBE_REFUSED and message:
        raise IndexFileError(message)
    if done.returncode == PROBE_OUT_OF_MEMORY:
        raise IndexFileError(f"{path} would need more than {budget >> 20} MiB of memory to read (its header "
                             "claims far more data than the file holds)")
    cause = f"signal {-done.returncode}" if done.returncode < 0 else f"exit status {done.returncode}"
    raise IndexFileError(f"{path} is not a readable faiss index (the reader failed: {cause})")


def n_ivf_for(n: int) -> int:
    """RVC's IVF list count `min(int(16 sqrt(N)), N // 39)`, at least 1 (RVC's classic UI fails below 39 rows)."""
    return max(1, min(int(16 * math.sqrt(n)), n // 39))


def build_index(features: np.ndarray | Tensor, path: str | Path, *, seed: int = 0) -> Path:
    """Train and write an index the way RVC's index training does: rows shuffled (seeded here, RVC's is not),
    more than 200k rows replaced by 10k k-means centres (faiss k-means here, RVC uses scikit-learn's
    MiniBatchKMeans), `IVF{n_ivf},Flat` with nprobe 1, vectors added in batches of 8192 (ids = shuffled order).
    `features`: `[N, dim]`, e.g. the concatenated 3_feature768 files."""
    faiss = faiss_module()
    data = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    if data.ndim != 2 or data.shape[0] == 0 or not np.isfinite(data).all():
        raise ParameterError(f"index features must be a finite, non-empty [N, dim] array, got shape {data.shape}")
    data = np.ascontiguousarray(data[np.random.default_rng(seed).permutation(data.shape[0])], dtype=np.float32)
    if data.shape[0] > KMEANS_ABOVE:
        kmeans = faiss.Kmeans(data.shape[1], KMEANS_CENTRES, seed=seed)
        kmeans.train(data)
        data = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
    n, dim = data.shape
    index = faiss.index_factory(dim, f"IVF{n_ivf_for(n)},Flat")
    faiss.extract_index_ivf(index).nprobe = 1
    index.train(data)
    for start in range(0, n, ADD_BATCH):
        index.add(data[start : start + ADD_BATCH])
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)  # a reader never sees a half-written index
    return path
