"""Request payloads in and audio out, run in threads off the event loop and off the device thread.

Audio uploads are copied to a temp file under the size cap, their duration is read from the header
before anything is decoded, then they are decoded and resampled to 16 kHz. `.npz` features are read
with pickles refused and every member's size checked before it is inflated.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format
from numpy.typing import NDArray

from rvc_lora.errors import AudioError, RVCLoraError
from rvc_lora.frames import FRAMES_PER_S, SR_16K
from rvc_lora.pipeline.audio import OUTPUT_FORMATS, EncodeFormat, encode_audio, load_audio_16k, probe_audio
from service.engine import Features, ModelInfo
from service.errors import BadFeatures, PayloadTooLarge, relabel
from service.spool import capture_upload, process_tag

CHUNK = 1 << 20
SPOOL_PREFIX = "rvc-upload-"  # + process tag: swept at start when stale or left by this host and pid
MEDIA_TYPES = {f.name: f.media_type for f in OUTPUT_FORMATS.values()}
FP16_MAX = 65504.0  # features beyond it become inf where inference runs in float16 (CUDA)
MAX_NPZ_DIRECTORY = 64 * 1024  # zip central directory of an .npz upload; numpy.savez of three arrays: ~250 bytes
ZIP_END_SEARCH = 22 + 0xFFFF  # the end record, after which a zip comment of up to 64 KB may follow
MAX_SOURCE_RATE = 192_000  # decoding holds max_audio_s of mono samples at the file's rate: 92 MB at 120 s


def spool(src: BinaryIO, limit: int, work_dir: Path | None, what: str) -> Path:
    """Copy an upload to a new temp file, refusing it (413) as soon as it passes `limit` bytes; 507 when the
    disk refuses the write (nothing is left behind either way)."""
    return capture_upload(src, work_dir, f"{SPOOL_PREFIX}{process_tag()}-", limit, what, "buffer",
                          retry_after=5)[0]


def read_audio(src: BinaryIO, *, limit: int, max_s: float, work_dir: Path | None) -> NDArray[np.float32]:
    """An audio upload -> mono float32 `[N]` at 16 kHz. 413 past `limit` bytes or `max_s` seconds (the
    header's duration is checked first: a 3-hour file is refused without decoding it); 422 above
    `MAX_SOURCE_RATE` (a few KB of FLAC can hold minutes of 8-channel 655 kHz audio)."""
    path = spool(src, limit, work_dir, "audio upload")
    try:
        sr = probe_audio(path).sr
        if sr > MAX_SOURCE_RATE:
            raise AudioError(f"audio is sampled at {sr} Hz, above the {MAX_SOURCE_RATE} Hz accepted here; "
                             "resample it first")
        return load_audio_16k(path, max_duration_s=max_s)  # refuses a header claiming more than max_s at once
    except RVCLoraError as exc:
        raise relabel(exc, path, "audio upload") from exc
    finally:
        path.unlink(missing_ok=True)


def audio_seconds(audio16k: NDArray[np.float32]) -> float:
    return len(audio16k) / SR_16K


def encode(audio: NDArray[np.float32], sr: int, fmt: EncodeFormat) -> bytes:
    return encode_audio(audio, sr, fmt)


def read_features(src: BinaryIO, *, info: ModelInfo, max_s: float, sid: int, seed: int | None) -> Features:
    """An `.npz` upload -> validated `Features` for the resident model (422 `bad_features` otherwise)."""
    max_frames = int(max_s * FRAMES_PER_S)
    if (directory := _zip_directory_bytes(src)) is not None and directory > MAX_NPZ_DIRECTORY:
        raise BadFeatures(f"features: the .npz lists {directory} bytes of members; phone, pitch and nsff0 take "
                          "a few hundred")
    try:
        with zipfile.ZipFile(src) as archive:
            for member in archive.infolist():  # before inflating anything: no zip bombs
                if member.file_size > (max_frames + 1) * info.content_dim * 8 + 4096:
                    raise PayloadTooLarge(f"features: member {member.filename[:64]!r} inflates to "
                                          f"{member.file_size} bytes, more than {max_s:g} s of features")
            for member in archive.infolist():
                _check_npy_header(archive, member)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, OSError, EOFError) as exc:
        raise BadFeatures(f"features: not a readable .npz file, numpy.savez output expected ({str(exc)[:120]})") \
            from exc
    src.seek(0)
    try:
        with np.load(src, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ("phone", "pitch", "nsff0") if key in npz.files}
            extra = sorted(set(npz.files) - {"phone", "pitch", "nsff0"})
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise BadFeatures(f"features: unreadable .npz ({str(exc)[:200]})") from exc
    if extra:
        raise BadFeatures(f"features: unexpected arrays {extra[:5]}; expected phone, pitch, nsff0")
    return _check_features(arrays, info, max_frames, sid, seed)


def _zip_directory_bytes(src: BinaryIO) -> int | None:
    """The size of the central directory a zip's end record declares (zip64 included), which `zipfile` parses
    whole into objects (~700 bytes per member) before anything else: None when there is no end record."""
    size = src.seek(0, os.SEEK_END)
    src.seek(max(0, size - ZIP_END_SEARCH))
    tail = src.read()
    src.seek(0)
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or len(tail) - end < 22:
        return None
    (directory,) = struct.unpack_from("<I", tail, end + 12)
    if end >= 76 and tail[end - 20 : end - 16] == b"PK\x06\x07":  # zip64: zipfile reads the record before it
        (directory,) = struct.unpack_from("<Q", tail, end - 76 + 40)
    return int(directory)


_NPY_HEADERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}


def _check_npy_header(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
    """Each member must be an `.npy` array holding the bytes its header declares: numpy allocates an array of
    the declared shape before reading, so a header may not claim more than the member holds."""
    name = member.filename[:64]
    with archive.open(member) as f:
        try:
            read_header = _NPY_HEADERS.get(npy_format.read_magic(f))
            if read_header is None:
                raise ValueError("unsupported .npy format version")
            shape, _, dtype = read_header(f)
        except ValueError as exc:
            raise BadFeatures(f"features: member {name!r} is not a .npy array ({str(exc)[:120]})") from exc
        header_bytes = f.tell()
    if dtype.hasobject:
        raise BadFeatures(f"features: member {name!r} holds pickled Python objects, which are refused")
    declared = math.prod(shape) * dtype.itemsize
    if declared > member.file_size - header_bytes:
        raise BadFeatures(f"features: member {name!r} declares shape {shape[:4]} of {dtype} ({declared} bytes) but "
                          f"holds {member.file_size - header_bytes} bytes")


def _check_features(arrays: dict[str, np.ndarray], info: ModelInfo, max_frames: int, sid: int,
                    seed: int | None) -> Features:
    phone = arrays.get("phone")
    if phone is None:
        raise BadFeatures("features: missing array 'phone' [T, C]")
    if phone.ndim != 2 or phone.shape[1] != info.content_dim or not 1 <= phone.shape[0] <= max_frames:
        raise BadFeatures(f"features: phone has shape {phone.shape}, expected [T, {info.content_dim}] with "
                          f"1 <= T <= {max_frames}")
    if not np.issubdtype(phone.dtype, np.floating) or not np.isfinite(phone).all():
        raise BadFeatures("features: phone must hold finite float values")
    if np.abs(phone).max() > FP16_MAX:
        raise BadFeatures(f"features: phone values must lie within +-{FP16_MAX:g} (float16, as inference may run)")
    frames = phone.shape[0]
    if not info.f0:
        if "pitch" in arrays or "nsff0" in arrays:
            raise BadFeatures("features: this model has no f0 input; send phone only")
        return Features(phone.astype(np.float32), None, None, sid, seed)
    pitch, nsff0 = arrays.get("pitch"), arrays.get("nsff0")
    if pitch is None or nsff0 is None:
        raise BadFeatures("features: an f0 model needs 'pitch' [T] and 'nsff0' [T] as well")
    if pitch.shape != (frames,) or nsff0.shape != (frames,):
        raise BadFeatures(f"features: pitch {pitch.shape} and nsff0 {nsff0.shape} must both be [{frames}]")
    if not np.issubdtype(pitch.dtype, np.integer) or pitch.min() < 1 or pitch.max() > 255:
        raise BadFeatures("features: pitch must be integers in 1..255 (RVC's coarse f0)")
    if not np.issubdtype(nsff0.dtype, np.floating) or not np.isfinite(nsff0).all() or nsff0.min() < 0:
        raise BadFeatures("features: nsff0 must be finite, non-negative float Hz")
    if nsff0.max() > FP16_MAX:
        raise BadFeatures(f"features: nsff0 values must lie within 0..{FP16_MAX:g} Hz (float16, as inference may run)")
    return Features(phone.astype(np.float32), pitch.astype(np.int64), nsff0.astype(np.float32), sid, seed)
