"""Retrieval index: RVC's blend numbers (§3.6), the d = 0 and no-neighbour guards, typed errors, training (§4.8)."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rvc_lora.errors import IndexFileError, ModelUnavailableError, ParameterError
from rvc_lora.pipeline import index as index_module
from rvc_lora.pipeline.index import RetrievalIndex, build_index, n_ivf_for, probe_index_file

faiss = pytest.importorskip("faiss", reason="faiss is optional: pip install 'rvc-lora[index]'")

FIXTURES = Path(__file__).parents[1] / ".." / "shared" / "fixtures"
VOICE_INDEX = FIXTURES / "rvc-pipeline-reference" / "voice.index"
needs_voice_index = pytest.mark.skipif(
    not VOICE_INDEX.is_file(), reason="shared fixtures (../shared/fixtures) not present"
)


def rvc_retrieve(path: Path, query: np.ndarray) -> np.ndarray:
    """Spec §3.6, written out the way RVC computes it (no guards)."""
    index = faiss.read_index(str(path))
    big = index.reconstruct_n(0, index.ntotal)
    score, ix = index.search(query, k=8)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        weight = np.square(1 / score)
        weight /= weight.sum(axis=1, keepdims=True)
        return np.sum(big[ix] * np.expand_dims(weight, axis=2), axis=1)  # type: ignore[no-any-return]


def blobs(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


@pytest.fixture(scope="module")
def voice() -> RetrievalIndex:
    if not VOICE_INDEX.is_file():
        pytest.skip("shared fixtures (../shared/fixtures) not present")
    return RetrievalIndex.from_path(VOICE_INDEX, dim=768)


@pytest.fixture
def queries(voice: RetrievalIndex) -> np.ndarray:
    noise = 0.05 * np.random.default_rng(0).standard_normal((40, voice.dim)).astype(np.float32)
    near: np.ndarray = voice.big[::7][:40] + noise  # near stored vectors, never exactly on one
    return near


@needs_voice_index
def test_voice_index_loads_once(voice: RetrievalIndex) -> None:
    raw = faiss.read_index(str(VOICE_INDEX))
    assert (voice.ntotal, voice.dim, voice.big.shape) == (300, 768, (300, 768))
    assert voice.big.dtype == np.float32
    assert np.array_equal(voice.big, raw.reconstruct_n(0, raw.ntotal))
    assert (faiss.extract_index_ivf(raw).nlist, faiss.extract_index_ivf(raw).nprobe) == (7, 1)


@needs_voice_index
def test_retrieve_is_rvc_bit_for_bit(voice: RetrievalIndex, queries: np.ndarray) -> None:
    expected = rvc_retrieve(VOICE_INDEX, queries)
    assert np.isfinite(expected).all()
    assert np.array_equal(voice.retrieve(queries), expected)


@needs_voice_index
@pytest.mark.parametrize(("dtype", "rate"), [(torch.float32, 0.75), (torch.float16, 0.75), (torch.float32, 0.33)])
def test_blend_is_rvc_bit_for_bit(voice: RetrievalIndex, queries: np.ndarray, dtype: torch.dtype, rate: float) -> None:
    feats = torch.from_numpy(queries).to(dtype)[None]  # [1, F, 768] as HuBERT hands them over
    retrieved = rvc_retrieve(VOICE_INDEX, feats[0].float().numpy())
    if dtype == torch.float16:
        retrieved = retrieved.astype(np.float16)
    expected = torch.from_numpy(retrieved).unsqueeze(0) * rate + (1 - rate) * feats
    out = voice.blend(feats, rate)
    assert out.dtype == dtype and out.shape == feats.shape
    assert torch.equal(out, expected)


@needs_voice_index
def test_exact_match_takes_full_weight(voice: RetrievalIndex) -> None:
    query = voice.big[[0, 5, 299]]
    assert np.isnan(rvc_retrieve(VOICE_INDEX, query)).all()  # RVC divides by zero here
    assert np.array_equal(voice.retrieve(query), query)


def test_overflowing_weight_counts_as_exact(tmp_path: Path) -> None:
    stored = np.concatenate([blobs(50, 8, 10), np.zeros((1, 8), np.float32)])
    stored[-1, 0] = 1e-12  # squared distance to the origin 1e-24: 1/dist**2 overflows float32 to inf
    path = build_index(stored, tmp_path / "tiny.index")
    query = np.zeros((1, 8), np.float32)
    assert np.isnan(rvc_retrieve(path, query)).all()
    assert np.array_equal(RetrievalIndex.from_path(path).retrieve(query), stored[-1:])


def test_frames_without_neighbours_keep_their_features(tmp_path: Path) -> None:
    a, b = blobs(200, 8, 1) + 50, blobs(200, 8, 2) - 50
    raw = faiss.index_factory(8, "IVF2,Flat")
    raw.train(np.concatenate([a, b]))
    raw.add(a)  # blob b's list stays empty; nprobe 1 probes only it for a query near b
    faiss.write_index(raw, str(tmp_path / "half.index"))
    loaded = RetrievalIndex.from_path(tmp_path / "half.index")
    query = np.concatenate([b[:3], a[:2] + 0.1])
    assert np.isnan(rvc_retrieve(tmp_path / "half.index", query)[:3]).all()
    out = loaded.retrieve(query)
    assert np.array_equal(out[:3], query[:3])
    assert np.array_equal(out[3:], rvc_retrieve(tmp_path / "half.index", query)[3:])


def test_fewer_stored_vectors_than_k(tmp_path: Path) -> None:
    stored = blobs(3, 8, 3)
    build_index(stored, tmp_path / "three.index")
    query = blobs(4, 8, 4)
    out = RetrievalIndex.from_path(tmp_path / "three.index").retrieve(query)
    assert np.isfinite(out).all()
    d2 = ((query[:, None] - stored[None]) ** 2).sum(-1)  # [4, 3]
    weight = 1 / d2**2
    np.testing.assert_allclose(out, (weight / weight.sum(1, keepdims=True)) @ stored, rtol=1e-5, atol=1e-6)


def test_wrong_feature_width(tmp_path: Path) -> None:
    path = build_index(blobs(100, 768, 5), tmp_path / "v2.index")
    with pytest.raises(IndexFileError, match=r"v2\.index holds 768-d features but the model uses 256-d"):
        RetrievalIndex.from_path(path, dim=256)
    loaded = RetrievalIndex.from_path(path)
    with pytest.raises(IndexFileError, match=r"768-d.*256-d"):
        loaded.blend(torch.zeros(1, 4, 256), 0.5)


@pytest.mark.parametrize("content", [b"", b"\x89not a faiss index" * 100, "truncated", None])
def test_unreadable_files(tmp_path: Path, content: bytes | str | None) -> None:
    path = tmp_path / "voice.index"
    if content == "truncated":
        build_index(blobs(100, 8, 6), path)
        path.write_bytes(path.read_bytes()[:600])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(IndexFileError, match=str(path)):
        RetrievalIndex.from_path(path)


def crafted(path: Path, at: bytes, skip: int, value: int) -> Path:
    """`path` with the int64 `skip` bytes after the first `at` (a faiss section tag) replaced by `value`."""
    data = bytearray(path.read_bytes())
    pos = data.index(at) + skip
    data[pos : pos + 8] = struct.pack("<q", value)
    out = path.with_name("crafted.index")
    out.write_bytes(bytes(data))
    return out


def test_header_claiming_more_vectors_than_the_file_holds(tmp_path: Path) -> None:
    good = build_index(blobs(100, 8, 6), tmp_path / "voice.index")
    bad = crafted(good, b"IwFl", 8, 1 << 38)  # ntotal: 2^38 vectors would be 8 TiB of floats
    with pytest.raises(IndexFileError, match=r"crafted\.index claims 274877906944 vectors of 32 bytes"):
        RetrievalIndex.from_path(bad)
    with pytest.raises(IndexFileError, match="claims 274877906944 vectors"):
        probe_index_file(bad)


def test_probe_reads_untrusted_files_in_a_child(tmp_path: Path) -> None:
    good = build_index(blobs(100, 768, 6), tmp_path / "voice.index")
    assert probe_index_file(good, 768) == (100, 768)
    with pytest.raises(IndexFileError, match="768-d features but the model uses 256-d"):
        probe_index_file(good, 256)
    # an inverted list claiming 2^34 entries: faiss would try to allocate 2^34 * 3 KiB while reading it
    bad = crafted(good, b"full", 12, 1 << 34)
    with pytest.raises(IndexFileError, match=r"crafted\.index (is not a readable|would need more)"):
        probe_index_file(bad)


@pytest.mark.parametrize(("returncode", "message"), [(-11, "signal 11"), (1, "exit status 1"),
                                                     (index_module.PROBE_OUT_OF_MEMORY, "MiB of memory")])
def test_probe_reports_a_failed_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, returncode: int,
                                      message: str) -> None:
    good = build_index(blobs(100, 8, 6), tmp_path / "voice.index")
    failed = subprocess.CompletedProcess([], returncode, stdout="", stderr="")
    monkeypatch.setattr(index_module.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(IndexFileError, match=message):
        probe_index_file(good)


def test_without_faiss(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(ModelUnavailableError, match=r"rvc-lora\[index\]"):
        RetrievalIndex.from_path(tmp_path / "any.index")
    with pytest.raises(ModelUnavailableError, match=r"rvc-lora\[index\]"):
        build_index(blobs(10, 4, 0), tmp_path / "any.index")


def test_blend_rate_and_shape_checks(tmp_path: Path) -> None:
    loaded = RetrievalIndex.from_path(build_index(blobs(100, 8, 7), tmp_path / "i.index"))
    feats = torch.from_numpy(blobs(6, 8, 8))[None]
    assert loaded.blend(feats, 0.0) is feats  # RVC skips retrieval at index_rate 0
    full = torch.from_numpy(loaded.retrieve(feats[0].numpy()))[None]
    assert torch.equal(loaded.blend(feats, 1.0), full)
    for rate in (-0.1, 1.5):
        with pytest.raises(ParameterError, match="index_rate"):
            loaded.blend(feats, rate)
    with pytest.raises(ParameterError, match=r"\[1, frames, dim\]"):
        loaded.blend(feats[0], 0.5)


@pytest.mark.parametrize(("n", "n_ivf"), [(1, 1), (20, 1), (39, 1), (300, 7), (1000, 25), (10_000, 256)])
def test_n_ivf_is_rvcs(n: int, n_ivf: int) -> None:
    assert n_ivf_for(n) == n_ivf
    assert n_ivf_for(1_000_000) == 16_000  # the 16 sqrt(N) branch


@pytest.mark.parametrize("n", [20, 300, 1000])
def test_build_index_like_rvc(tmp_path: Path, n: int) -> None:
    features = blobs(n, 16, n)
    path = build_index(torch.from_numpy(features), tmp_path / "a.index", seed=3)
    raw = faiss.read_index(str(path))
    ivf = faiss.extract_index_ivf(raw)
    assert (raw.ntotal, raw.d, ivf.nlist, ivf.nprobe) == (n, 16, n_ivf_for(n), 1)
    perm = np.random.default_rng(3).permutation(n)  # ids follow the shuffled order
    assert np.array_equal(RetrievalIndex.from_path(path).big, features[perm])
    assert build_index(features, tmp_path / "b.index", seed=3).read_bytes() == path.read_bytes()
    assert not (tmp_path / "a.index.tmp").exists()


def test_build_index_clusters_large_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "KMEANS_ABOVE", 100)  # RVC: 200k rows -> 10k centres
    monkeypatch.setattr(index_module, "KMEANS_CENTRES", 16)
    raw = faiss.read_index(str(build_index(blobs(101, 8, 9), tmp_path / "k.index")))
    assert raw.ntotal == 16
    small = faiss.read_index(str(build_index(blobs(100, 8, 9), tmp_path / "s.index")))
    assert small.ntotal == 100


def test_build_index_rejects_bad_features(tmp_path: Path) -> None:
    bad = blobs(10, 4, 0)
    bad[3, 1] = np.nan
    for features in (bad, np.zeros((0, 4), np.float32), np.zeros(4, np.float32)):
        with pytest.raises(ParameterError, match=r"\[N, dim\]"):
            build_index(features, tmp_path / "x.index")
