"""Voice packages: a `.zip` holding one RVC voice `.pth` and optionally its retrieval `.index`, the way
voices circulate (and rvc-python's upload format).

A torch checkpoint is itself a zip, so a package is told apart by its members: a torch archive has a
`data.pkl` record at its top, a package has a `.pth` member. Only the `.pth` and `.index` members are
read, and only after the archive passed every check: at most `max_members` entries, no path that
climbs out (`..`, absolute, drive letters, backslashes), no encrypted or nested archive, and sizes
bounded before and while reading (declared uncompressed total, per-member compression ratio, and the
bytes actually produced, since the declared sizes can lie).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from rvc_lora.errors import RVCLoraError

GiB = 1 << 30
ARCHIVE_SUFFIXES = (".zip", ".7z", ".rar", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst")
ZIP_MAGIC = b"PK\x03\x04"
_COPY_CHUNK = 1 << 20


class VoicePackageError(RVCLoraError):
    """A voice `.zip` is unreadable, unsafe (path traversal, nested archive, encrypted) or not one voice."""

    code = "bad_voice_package"


class VoicePackageTooLarge(VoicePackageError):
    """A voice `.zip` unpacks to more than the limits allow (total size, or a zip bomb's ratio)."""

    code = "voice_package_too_large"


@dataclass(frozen=True)
class ZipLimits:
    """Bounds on a voice package: uncompressed bytes of the members read, compression ratio of any member,
    entries in the archive."""

    max_total_bytes: int = 2 * GiB
    max_ratio: float = 100.0  # weights and index vectors compress about 1.1x; 100x is a bomb
    max_members: int = 64


@dataclass(frozen=True)
class VoicePackage:
    """The checked members of a voice zip: the voice model and its index (None when the zip has none)."""

    model: zipfile.ZipInfo
    index: zipfile.ZipInfo | None


def is_voice_zip(path: str | os.PathLike[str]) -> bool:
    """True for a zip that is not itself a torch checkpoint (a package to open with `open_voice_zip`)."""
    with open(path, "rb") as f:
        if f.read(4) != ZIP_MAGIC:
            return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False  # left to the checkpoint reader, which names the problem
    return not any(PurePosixPath(n).name == "data.pkl" and len(PurePosixPath(n).parts) <= 2 for n in names)


def _unsafe(name: str) -> bool:
    path = PurePosixPath(name)
    return (name.startswith(("/", "\\")) or "\\" in name or ".." in path.parts
            or (len(name) > 1 and name[1] == ":"))  # C:foo: a Windows drive


def _pick_index(indexes: list[zipfile.ZipInfo], source: str) -> zipfile.ZipInfo | None:
    """RVC writes `trained_*.index` and `added_*.index`; inference reads the `added_` one."""
    if len(indexes) <= 1:
        return indexes[0] if indexes else None
    added = [i for i in indexes if PurePosixPath(i.filename).name.startswith("added")]
    if len(added) == 1:
        return added[0]
    raise VoicePackageError(f"{source}: holds {len(indexes)} .index files "
                            f"({', '.join(i.filename for i in indexes)}); a voice zip holds one")


def check_voice_zip(zf: zipfile.ZipFile, source: str, limits: ZipLimits = ZipLimits()) -> VoicePackage:
    """Check an open archive against `limits` and the package layout -> its `.pth` and `.index` members."""
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise VoicePackageError(f"{source}: {len(infos)} entries; a voice zip has at most {limits.max_members}")
    models, indexes = [], []
    for info in infos:
        name = info.filename
        if _unsafe(name):
            raise VoicePackageError(f"{source}: entry {name!r} points outside the archive; refused")
        if info.flag_bits & 0x1:
            raise VoicePackageError(f"{source}: entry {name!r} is encrypted")
        if info.is_dir():
            continue
        lower = name.lower()
        if lower.endswith(ARCHIVE_SUFFIXES):
            raise VoicePackageError(f"{source}: entry {name!r} is an archive inside the archive; send the voice's "
                                    ".pth and .index in one zip")
        if info.compress_size and info.file_size / info.compress_size > limits.max_ratio:
            raise VoicePackageTooLarge(f"{source}: entry {name!r} expands {info.file_size / info.compress_size:.0f}x "
                                    f"(more than {limits.max_ratio:g}x): refused as a zip bomb")
        if lower.endswith(".pth"):
            models.append(info)
        elif lower.endswith(".index"):
            indexes.append(info)
    if len(models) != 1:
        found = ", ".join(m.filename for m in models) or "none"
        raise VoicePackageError(f"{source}: a voice zip holds one .pth voice model, found {len(models)} ({found})")
    index = _pick_index(indexes, source)
    total = models[0].file_size + (index.file_size if index else 0)
    if total > limits.max_total_bytes:
        raise VoicePackageTooLarge(f"{source}: its .pth and .index unpack to {total:,} bytes, more than the "
                                f"{limits.max_total_bytes:,} allowed")
    return VoicePackage(models[0], index)


class _Bounded:
    """A member's stream that stops with `VoicePackageError` once it yields more than the member declared (a
    forged header) or than `budget` bytes."""

    def __init__(self, raw: IO[bytes], info: zipfile.ZipInfo, budget: int, source: str) -> None:
        self._raw, self._left, self._info, self._source = raw, min(info.file_size, budget), info, source

    def read(self, size: int = -1, /) -> bytes:
        data = self._raw.read(self._left + 1 if size < 0 else min(size, self._left + 1))
        if len(data) > self._left:
            raise VoicePackageTooLarge(f"{self._source}: entry {self._info.filename!r} unpacks past its declared "
                                    f"{self._info.file_size:,} bytes: refused")
        self._left -= len(data)
        return data


@contextmanager
def open_voice_zip(path: str | os.PathLike[str], limits: ZipLimits = ZipLimits(), *, label: str | None = None
                   ) -> Iterator[tuple[VoicePackage, zipfile.ZipFile]]:
    """Open and check a voice zip; yields the package and the archive (read members with `member_stream`).
    Errors name the file as `label` (default: its file name)."""
    source = label or Path(path).name
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise VoicePackageError(f"{source}: not a readable zip file: {exc}") from exc
    with zf:
        yield check_voice_zip(zf, source, limits), zf


def member_stream(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ZipLimits = ZipLimits(), *,
                  label: str | None = None) -> _Bounded:
    """A bounded reader of one checked member (errors name the archive as `label`)."""
    source = label or Path(zf.filename or "voice zip").name
    try:
        return _Bounded(zf.open(info), info, limits.max_total_bytes, source)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError) as exc:  # bad header, unknown method, password
        raise VoicePackageError(f"{source}: entry {info.filename!r} cannot be read: {exc}") from exc


def _copy(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, limits: ZipLimits) -> None:
    src = member_stream(zf, info, limits)
    try:
        with dest.open("wb") as out:
            while chunk := src.read(_COPY_CHUNK):
                out.write(chunk)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:  # a CRC mismatch or a truncated member
        raise VoicePackageError(f"{Path(zf.filename or '').name}: entry {info.filename!r} is damaged: {exc}") from exc


@contextmanager
def voice_files(path: str | os.PathLike[str], limits: ZipLimits = ZipLimits()
                ) -> Iterator[tuple[Path, Path | None]]:
    """(voice .pth, its .index or None) for a voice given as a `.pth` or as a voice zip; a zip's members are
    unpacked, under fixed names, to a temporary folder that is removed afterwards."""
    if not is_voice_zip(path):
        yield Path(path), None
        return
    folder = Path(tempfile.mkdtemp(prefix="rvc-lora-voice-"))
    try:
        with open_voice_zip(path, limits) as (package, zf):
            model = folder / "voice.pth"
            _copy(zf, package.model, model, limits)
            index = None
            if package.index is not None:
                index = folder / "voice.index"
                _copy(zf, package.index, index, limits)
        yield model, index
    finally:
        shutil.rmtree(folder, ignore_errors=True)
