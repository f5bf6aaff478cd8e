"""Issue 5's bad-input corpus and faults, through the HTTP API.

Every case of the corpus is generated here (no binary files): audio, parameters of every route, adapter files,
names and indexes. Each must get its documented status with a clear JSON error (a 4xx; a few decodable
oddities are converted, 200), the server must stay up, and nothing partial may be left on disk (store and
temp folder as before). `python -m tests.test_service_reliability` prints the corpus as a markdown table
(the one in RELIABILITY.md). Faults: device out of memory (retried in shorter chunks, else 503), disk full or
write errors on every write path (507, nothing stored). The other faults of the issue are tested beside the
code they exercise (RELIABILITY.md lists where).
"""

from __future__ import annotations

import errno
import io
import os
import struct
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from fastapi.testclient import TestClient

from rvc_lora.pipeline.params import BOUNDS
from tests.test_service_adapters import _bad_adapters, _safetensors_with
from tests.test_service_app import _flac_claiming, _float_wav, _npz, _silence, _wav_with_sizes
from tests.test_service_engine import FAKE_LAYER, GOOD_INDEX, adapter_bytes, running_app, sine_wav

Payload = Callable[[Path], dict[str, Any]]  # tmp dir -> {"data": form fields, "files": uploads}
LIMITS = {"max_audio_bytes": 1 << 20, "max_audio_s": 5.0, "max_queued_audio_s": 10.0, "max_adapter_bytes": 64 << 10,
          "max_index_bytes": 4096, "max_voice_bytes": 64 << 10}


@dataclass(frozen=True)
class Case:
    group: str
    name: str
    route: str
    payload: Payload
    status: int
    codes: tuple[str, ...] = ()  # the error codes accepted (empty for 200)
    note: str = field(default="", compare=False)


def _audio(data: bytes | Callable[[], bytes], filename: str = "in.wav", **fields: object) -> Payload:
    def build(_: Path) -> dict[str, Any]:
        body = data() if callable(data) else data
        return {"data": {k: str(v) for k, v in fields.items()}, "files": {"audio": (filename, body)}}

    return build


def _mp3(seconds: float = 1.0) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(np.arange(int(16000 * seconds)) / 10)).astype(np.float32), 16000, format="MP3")
    return buf.getvalue()


def _mp3_broken_frame() -> bytes:
    data = bytearray(_mp3())
    mid = len(data) // 2
    data[mid : mid + 64] = b"\xff" * 64  # a frame's header and payload overwritten: the decoder resyncs past it
    return bytes(data)


def _mp3_broken_headers() -> bytes:
    data = bytearray(_mp3())
    syncs = [i for i in range(1, len(data) - 1) if data[i] == 0xFF and data[i + 1] & 0xE0 == 0xE0]
    for i in syncs[2:4]:
        data[i + 1] = 0
    return bytes(data)


def _eight_channels_192k() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.random.default_rng(0).uniform(-0.3, 0.3, (38400, 8)).astype(np.float32), 192000, format="WAV")
    return buf.getvalue()


def _png() -> bytes:
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sIIBBBBB", 13, b"IHDR", 1, 1, 8, 2, 0, 0, 0) + bytes(64)


AUDIO_CASES = [
    Case("audio", "zero bytes", "/convert", _audio(b""), 422, ("bad_audio",)),
    Case("audio", "truncated WAV (header, 100 bytes of samples)", "/convert", _audio(lambda: sine_wav(0.5)[:144]), 422,
         ("bad_audio",)),
    Case("audio", "WAV header declaring 4 GB of samples", "/convert",
         _audio(lambda: _wav_with_sizes(0xFFFFFFF0, 0xFFFFFFD0)), 200,
         note="the 0.5 s actually present are converted; streaming writers put 0xFFFFFFFF there"),
    Case("audio", "WAV with 0 channels", "/convert", _audio(lambda: _wav_with_sizes(36 + 16000, 16000, channels=0)),
         422, ("bad_audio",), note="a malformed header of a supported format, named in the message"),
    Case("audio", "one sample", "/convert", _audio(lambda: sine_wav(1 / 16000)), 422, ("bad_audio",)),
    Case("audio", "all-NaN float samples", "/convert", _audio(lambda: _float_wav(np.full(8000, np.nan))), 422,
         ("bad_audio",)),
    Case("audio", "all-inf float samples", "/convert", _audio(lambda: _float_wav(np.full(8000, np.inf))), 422,
         ("bad_audio",)),
    Case("audio", "3-hour FLAC (header; refused before decoding)", "/convert", _audio(lambda: _flac_claiming(3.0)),
         413, ("audio_too_long",)),
    Case("audio", "longer than max_audio_s (6 s, limit 5 s)", "/convert", _audio(lambda: sine_wav(6.0, sr=8000)), 413,
         ("audio_too_long",)),
    Case("audio", "larger than max_audio_bytes", "/convert", _audio(lambda: sine_wav(40.0)), 413,
         ("payload_too_large",)),
    Case("audio", "random bytes named .wav", "/convert",
         _audio(lambda: np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()), 415,
         ("unsupported_audio",)),
    Case("audio", "a PNG", "/convert", _audio(_png, "in.png"), 415, ("unsupported_audio",)),
    Case("audio", "a text file", "/convert", _audio(b"hello, this is text\n" * 20, "in.txt"), 415,
         ("unsupported_audio",)),
    Case("audio", "MP3 with a broken frame", "/convert", _audio(_mp3_broken_frame, "in.mp3"), 200,
         note="the decoder skips the broken frame and resyncs"),
    Case("audio", "MP3 with broken frame headers", "/convert", _audio(_mp3_broken_headers, "in.mp3"), 200,
         note="PyAV's decoder resyncs on the next valid header and converts what it finds"),
    Case("audio", "MP3 cut mid-frame", "/convert", _audio(lambda: _mp3()[:700], "in.mp3"), 422, ("bad_audio",),
         note="the frames before the cut decode; too little audio is left"),
    Case("audio", "8 channels at 192 kHz", "/convert", _audio(_eight_channels_192k), 200,
         note="downmixed and resampled to 16 kHz"),
    Case("audio", "silence", "/convert", _audio(_silence), 422, ("bad_audio",)),
    Case("audio", "no audio field", "/convert", lambda _: {"data": {"seed": "1"}}, 422, ("invalid_request",)),
]

# every field of every form: a wrong type and values out of range (all 422 invalid_request unless said); the
# ranges are ConvertParams' BOUNDS (tests/test_convert_params.py checks the form has exactly them)
_KEY = int(BOUNDS["f0_up_key"].hi)
CONVERT_FIELDS: dict[str, list[object]] = {
    "sid": ["x", -1, 65536, 2], "f0_up_key": ["x", "1.5", -_KEY - 1, _KEY + 1, 1000, -1000],
    "f0_method": ["yin", "rmvpe", 3],
    "index_rate": ["x", -0.1, 1.5, "nan", "inf"], "filter_radius": ["x", -1, 8],
    "rms_mix_rate": ["x", -0.5, 1.5, "-inf"], "protect": ["x", -0.1, 0.51],
    "resample_sr": ["x", -1, 100, BOUNDS["resample_sr"].hi + 1],
    "format": ["wma", "WAV", 1], "seed": ["x", -1, 2**32, 1.5], "adapter": ["x" * 129], "bogus": [1],
}
PARAMETER_CASES = [
    Case("parameters", f"/convert {name}={value!r:.40}", "/convert", _audio(lambda: sine_wav(0.25), **{name: value}),
         422, ("invalid_request",))
    for name, values in CONVERT_FIELDS.items() for value in values
] + [
    Case("parameters", "/convert unknown adapter id", "/convert", _audio(lambda: sine_wav(0.25), adapter="0" * 16), 404,
         ("adapter_not_found",)),
    Case("parameters", "/convert unknown adapter name", "/convert", _audio(lambda: sine_wav(0.25), adapter="nobody"),
         404, ("adapter_not_found",)),
] + [
    Case("parameters", f"/infer {name}={value!r}", "/infer",
         lambda _, n=name, v=value: {"data": {n: str(v)}, "files": {"features": ("f.npz", _npz())}}, 422,
         ("invalid_request",))
    for name, value in (("sid", "x"), ("sid", -1), ("sid", 2), ("seed", -1), ("seed", "x"), ("adapter", "x" * 129))
] + [
    Case("parameters", "/infer unknown adapter", "/infer",
         lambda _: {"data": {"adapter": "nobody"}, "files": {"features": ("f.npz", _npz())}}, 404,
         ("adapter_not_found",)),
    Case("parameters", "/infer features: not an .npz", "/infer",
         lambda _: {"files": {"features": ("f.npz", b"not a zip")}}, 422, ("bad_features",)),
    Case("parameters", "/infer features: 256-d phone for a 768-d model", "/infer",
         lambda _: {"files": {"features": ("f.npz", _npz(dim=256))}}, 422, ("bad_features",)),
    Case("parameters", "/infer features: NaN f0", "/infer",
         lambda _: {"files": {"features": ("f.npz", _npz(nsff0=np.full(20, np.nan, dtype=np.float32)))}}, 422,
         ("bad_features",)),
    Case("parameters", "/infer features: a pickled object array", "/infer",
         lambda _: {"files": {"features": ("f.npz", _pickled_npz())}}, 422, ("bad_features",)),
] + [
    Case("parameters", f"/adapters rank={value!r}", "/adapters",
         lambda tmp, v=value: {"data": {"rank": str(v)}, "files": {"file": ("v.pth", adapter_bytes(tmp, 1))}}, 422,
         ("invalid_request",))
    for value in ("x", 0, 513)
]


def _pickled_npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, phone=np.array([{"evil": 1}], dtype=object))
    return buf.getvalue()


def _adapter_file(name: str) -> Payload:
    return lambda tmp: {"files": {"file": ("v.safetensors", _bad_adapters(tmp)[name])}}


def _named(name: str) -> Payload:
    return lambda tmp: {"data": {"name": name}, "files": {"file": ("v.safetensors", adapter_bytes(tmp, 1))}}


class _Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch /tmp/rvc-lora-pwned",))


def _evil_pth() -> bytes:
    buf = io.BytesIO()
    torch.save({"weight": {"x": _Exploit()}, "config": []}, buf)
    return buf.getvalue()


ADAPTER_CASES = [
    Case("adapters", "a pickle named .safetensors", "/adapters", _adapter_file("pickle"), 422, ("bad_checkpoint",),
         note="read as a voice model by its content, with weights_only=True"),
    Case("adapters", "a .pth whose pickle runs code", "/adapters",
         lambda _: {"files": {"file": ("v.safetensors", _evil_pth())}}, 422, ("bad_checkpoint",),
         note="torch.load(weights_only=True) refuses it; nothing runs"),
    Case("adapters", "safetensors header claiming 1 TB", "/adapters", _adapter_file("huge header"), 422,
         ("bad_adapter",)),
    Case("adapters", "empty file", "/adapters", _adapter_file("empty"), 422, ("bad_adapter",)),
    Case("adapters", "text file", "/adapters", _adapter_file("text"), 422, ("bad_adapter",)),
    Case("adapters", "int32 tensors", "/adapters", _adapter_file("int dtype"), 422, ("bad_adapter",)),
    Case("adapters", "NaN weights", "/adapters", _adapter_file("nan"), 422, ("bad_adapter",)),
    Case("adapters", "inf weights", "/adapters", _adapter_file("inf"), 422, ("bad_adapter",)),
    Case("adapters", "missing key", "/adapters", _adapter_file("missing key"), 422,
         ("bad_adapter", "adapter_mismatch")),
    Case("adapters", "extra key", "/adapters", _adapter_file("extra key"), 422, ("bad_adapter", "adapter_mismatch")),
    Case("adapters", "metadata lying about the rank", "/adapters", _adapter_file("rank lie"), 422,
         ("bad_adapter", "adapter_mismatch")),
    Case("adapters", "made for another base (fingerprint)", "/adapters", _adapter_file("other base"), 422,
         ("adapter_mismatch",)),
    Case("adapters", "rank above the server's max_rank", "/adapters", _adapter_file("rank above max"), 422,
         ("bad_adapter", "adapter_mismatch")),
    Case("adapters", "larger than max_adapter_bytes", "/adapters",
         lambda _: {"files": {"file": ("v.safetensors", bytes(70 << 10))}}, 413, ("payload_too_large",)),
    Case("adapters", "index of the wrong dimension (256 vs 768)", "/adapters",
         lambda tmp: {"files": {"file": ("v.safetensors", adapter_bytes(tmp, 1)), "index": ("v.index", b"x256")}},
         422, ("bad_index",)),
    Case("adapters", "index larger than max_index_bytes", "/adapters",
         lambda tmp: {"files": {"file": ("v.safetensors", adapter_bytes(tmp, 1)),
                                "index": ("v.index", GOOD_INDEX + bytes(5000))}}, 413, ("payload_too_large",)),
    Case("adapters", "no file field", "/adapters", lambda _: {"data": {"name": "x"}}, 422, ("invalid_request",)),
] + [
    Case("adapters", f"name {label}", "/adapters", _named(name), 422, ("invalid_request",))
    for label, name in (("'../etc/passwd'", "../etc/passwd"), ("with a slash", "a/b"), ("with a backslash", "a\\b"),
                        ("with NUL", "nul\x00byte"), ("of 10,000 characters", "x" * 10_000),
                        ("with an emoji", "voice\U0001f3a4"), ("starting with a dot", ".hidden"),
                        ("of 16 hex digits (an id)", "0123456789abcdef"), ("a space", " "))
]



# found by red-teaming a live server: each was a 500, a silent acceptance or a memory/CPU blow-up before its fix

def _duplicate_entry(tmp: Path) -> bytes:
    """A valid adapter whose header names its lora_A twice (safetensors would keep one and ignore the other)."""
    data = adapter_bytes(tmp, 1)
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n].rstrip(b" ")
    start = header.index(f'"{FAKE_LAYER}.lora_A":'.encode())
    entry = header[start : header.index(b"}", start) + 1]
    text = header[:-1] + b"," + entry + b"}"
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def _adapter_with(tensors: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]], **meta: str) -> Payload:
    def build(tmp: Path) -> dict[str, Any]:
        a, b = torch.randn(4, 12, generator=torch.Generator().manual_seed(0)), torch.full((6, 4), 0.1)
        return {"files": {"file": ("v.safetensors", _safetensors_with(tmp, tensors(a, b), **meta))}}

    return build


def _pair(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{FAKE_LAYER}.lora_A": a, f"{FAKE_LAYER}.lora_B": b}


def _npz_claiming(frames: int) -> bytes:
    """An .npz whose phone.npy header declares `frames` rows but holds 20 (numpy allocates the declared shape)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros((20, 768), dtype=np.float32))
    raw = buf.getvalue()
    (length,) = struct.unpack("<H", raw[8:10])
    header = raw[10 : 10 + length].decode("latin1").replace("(20, 768)", f"({frames}, 768)").rstrip("\n ")
    raw = raw[:10] + (header + " " * (length - 1 - len(header)) + "\n").encode("latin1") + raw[10 + length :]
    return _zipped({"phone.npy": raw}, _npz())


def _zipped(members: dict[str, bytes], base: bytes | None = None, flags: int = 0) -> bytes:
    """The members of the .npz `base` with `members` added or replaced; `flags` set in the central directory
    entries (1: encrypted)."""
    old = {} if base is None else dict(np.load(io.BytesIO(base)).items())
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, array in old.items():
            if f"{name}.npy" not in members:
                npy = io.BytesIO()
                np.save(npy, array)
                archive.writestr(f"{name}.npy", npy.getvalue())
        for name, data in members.items():
            archive.writestr(name, data)
        for info in archive.infolist():
            info.flag_bits |= flags  # written with the central directory when the archive closes
    return out.getvalue()


def _many_members(count: int) -> bytes:
    return _zipped({f"{i:x}": b"" for i in range(count)})


def _wav_at(sr: int, seconds: float = 0.2) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(np.arange(int(sr * seconds)) / 10)).astype(np.float32), sr, format="WAV")
    return buf.getvalue()


def _twice(field: str, upload: Callable[[Path], tuple[str, bytes]], upload_field: str) -> Payload:
    """`field` sent twice: the upload itself (`field == upload_field`) or a form field beside the upload."""
    def build(tmp: Path) -> dict[str, Any]:
        if field == upload_field:
            return {"files": [(field, upload(tmp)), (field, upload(tmp))]}
        return {"files": [(upload_field, upload(tmp)), (field, (None, b"0")), (field, (None, b"1"))]}

    return build


def _features(tmp: Path) -> tuple[str, bytes]:
    return ("f.npz", _npz())


def _sine(tmp: Path) -> tuple[str, bytes]:
    return ("a.wav", sine_wav(0.25))


def _adapter_upload(tmp: Path) -> tuple[str, bytes]:
    return ("v.safetensors", adapter_bytes(tmp, 1))


HOSTILE_CASES = [
    Case("hostile", "adapter with float8 tensors (was 500)", "/adapters",
         _adapter_with(lambda a, b: _pair(a.to(torch.float8_e4m3fn), b)), 422, ("bad_adapter",)),
    Case("hostile", "adapter whose lora_alpha/r folds B past float16 (was stored, then every conversion failed)",
         "/adapters", _adapter_with(_pair, lora_alpha="1e300"), 422, ("bad_adapter",)),
    Case("hostile", "adapter with a value past float16 (was stored)", "/adapters",
         _adapter_with(lambda a, b: _pair(a, b * 1e6)), 422, ("bad_adapter",)),
    Case("hostile", "adapter header naming a tensor twice (was stored)", "/adapters",
         lambda tmp: {"files": {"file": ("v.safetensors", _duplicate_entry(tmp))}}, 422, ("bad_adapter",)),
    Case("hostile", "adapter with format_version 0 (was stored)", "/adapters",
         _adapter_with(_pair, format_version="0"), 422, ("bad_adapter",)),
    Case("hostile", "adapter with a 10,000-character name in its metadata (was stored, echoed in every listing)",
         "/adapters", _adapter_with(_pair, name="x" * 10_000), 422, ("bad_adapter",)),
    Case("hostile", "file part sent twice (the first was dropped silently)", "/adapters",
         _twice("file", _adapter_upload, "file"), 422, ("invalid_request",)),
    Case("hostile", "audio part sent twice (one was dropped silently)", "/convert",
         _twice("audio", _sine, "audio"), 422, ("invalid_request",)),
    Case("hostile", "sid sent twice (one was dropped silently)", "/convert", _twice("sid", _sine, "audio"),
         422, ("invalid_request",)),
    Case("hostile", "features part sent twice", "/infer", _twice("features", _features, "features"), 422,
         ("invalid_request",)),
    Case("hostile", "WAV at 384 kHz (a few KB of FLAC at such rates decoded to GBs)", "/convert",
         _audio(lambda: _wav_at(384_000)), 422, ("bad_audio",)),
    Case("hostile", "features: phone.npy header claiming 10^10 rows (was 500: numpy allocated them)", "/infer",
         lambda _: {"files": {"features": ("f.npz", _npz_claiming(10**10))}}, 422, ("bad_features",)),
    Case("hostile", "features: a member that is not .npy (was 500)", "/infer",
         lambda _: {"files": {"features": ("f.npz", _zipped({"phone": b"raw bytes"}))}}, 422, ("bad_features",)),
    Case("hostile", "features: members flagged encrypted (was 500)", "/infer",
         lambda _: {"files": {"features": ("f.npz", _zipped({}, _npz(), flags=1))}}, 422, ("bad_features",)),
    Case("hostile", "features: 5,000 zip members (zipfile parsed every one, ~700 bytes each)", "/infer",
         lambda _: {"files": {"features": ("f.npz", _many_members(5000))}}, 422, ("bad_features",)),
    Case("hostile", "features: phone values of 1e38 (was bad_audio after inference)", "/infer",
         lambda _: {"files": {"features": ("f.npz", _npz(phone=np.full((20, 768), 1e38, dtype=np.float32)))}}, 422,
         ("bad_features",)),
]

CORPUS = AUDIO_CASES + PARAMETER_CASES + ADAPTER_CASES + HOSTILE_CASES
SERVER_PATH_MARKS = ("rvc-upload-", ".upload-", "/tmp/", "pytest-of")


@pytest.fixture(scope="module")
def corpus_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Path]]:
    tmp = tmp_path_factory.mktemp("corpus")
    with running_app(tmp, **LIMITS) as client:
        yield client, tmp


def on_disk(tmp: Path) -> list[str]:
    """Everything in the store and the upload temp folder (the app's work_dir)."""
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() and "adapter-" not in p.name
                  and p.name != "raw.safetensors")


def send(client: TestClient, case: Case, tmp: Path) -> Any:
    payload = case.payload(tmp)
    return client.post(case.route, data=payload.get("data", {}), files=payload.get("files"))


@pytest.mark.parametrize("case", CORPUS, ids=[f"{c.group}: {c.name}" for c in CORPUS])
def test_bad_input(corpus_app: tuple[TestClient, Path], case: Case) -> None:
    client, tmp = corpus_app
    before = on_disk(tmp)
    r = send(client, case, tmp)
    assert r.status_code == case.status, r.text[:300]
    if case.status >= 400:
        body = r.json()
        assert set(body) == {"error"} and body["error"]["code"] in case.codes, body
        message = body["error"]["message"]
        assert isinstance(message, str) and 0 < len(message) < 2000
        assert not any(mark in message for mark in SERVER_PATH_MARKS), message  # no server paths
    else:
        assert r.headers["content-type"].startswith("audio/")
    assert client.get("/healthz").status_code == 200  # the server stays up
    assert on_disk(tmp) == before  # nothing partial: the store and the temp folder are as before
    assert not Path("/tmp/rvc-lora-pwned").exists()


def test_npz_with_thousands_of_members_is_refused_before_zipfile_parses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """zipfile turns every directory entry into an object (~700 bytes): 64 MB of entries would cost GBs."""
    from service.errors import BadFeatures
    from service.media import read_features
    from tests.test_service_engine import FAKE_INFO

    data = _many_members(5000)

    def no_parsing(*_: object, **__: object) -> None:
        raise AssertionError("zipfile parsed the whole directory")

    monkeypatch.setattr(zipfile, "ZipFile", no_parsing)
    with pytest.raises(BadFeatures, match="bytes of members"):
        read_features(io.BytesIO(data), info=FAKE_INFO, max_s=5.0, sid=0, seed=None)


def test_the_corpus_covers_every_form_field() -> None:
    from service.schemas import ConvertForm

    assert set(ConvertForm.model_fields) - {"audio"} <= set(CONVERT_FIELDS)


# faults: device out of memory

def test_shorter_chunks_ladder() -> None:
    from rvc_lora.pipeline.steps import PAD_FP16, PAD_FP32
    from service.rvc_engine import MIN_CHUNK_S, shorter_chunks

    assert [p.x_center for p in shorter_chunks(PAD_FP32)] == [19, 9, 4]
    assert [p.x_center for p in shorter_chunks(PAD_FP16)] == [30, 15, 7, 4]
    for pad in shorter_chunks(PAD_FP16) + shorter_chunks(PAD_FP32):
        assert pad.x_center >= MIN_CHUNK_S and 1 <= pad.x_query <= pad.x_center < pad.x_max
        assert pad.x_pad in (PAD_FP16.x_pad, PAD_FP32.x_pad)


def _oom_engine(max_frames: int | None) -> Callable[[Any], Any]:
    """The real engine on tiny models whose synthesizer 'runs out of device memory' for chunks longer than
    `max_frames` frames (None: always)."""
    from rvc_lora.pipeline.steps import PadConfig
    from service.rvc_engine import load_engine

    def factory(settings: Any) -> Any:
        engine = load_engine(settings)
        vc = engine._vc  # type: ignore[attr-defined]
        vc.pad = PadConfig(x_pad=1, x_query=2, x_center=8, x_max=9)  # 6 s of audio: one chunk of 8 s padded
        real = vc.model.infer

        def infer(phone: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if max_frames is None or phone.shape[1] > max_frames:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(phone, *args, **kwargs)

        vc.model.infer = infer
        return engine

    return factory


@pytest.mark.parametrize(("max_frames", "status"), [(700, 200), (None, 503)])
def test_device_oom_retries_in_shorter_chunks_else_503(tmp_path: Path, tiny_service_assets: dict[str, Any],
                                                       max_frames: int | None, status: int,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The one-at-a-time path (`Engine.convert`); the pipelined worker's batches: `test_service_batching.py`."""
    with running_app(tmp_path, factory=_oom_engine(max_frames), model=tiny_service_assets["model"],
                     hubert=tiny_service_assets["hubert"], max_rank=8, warmup=False, batching=False) as c:
        r = c.post("/convert", data={"seed": "1"}, files={"audio": ("a.wav", sine_wav(6.0, freq=140.0))})
        assert r.status_code == status, r.text[:300]
        if status == 200:  # 8 s padded (800 frames) refused, then cut every 4 s: at most ~6 s per chunk
            assert abs(len(sf.read(io.BytesIO(r.content))[0]) - 6 * 40000) <= 4 * 400  # 2 chunks' frame rounding
            assert "converting again in chunks of 4 s" in caplog.text
        else:
            assert r.json()["error"]["code"] == "device_out_of_memory" and r.headers["Retry-After"] == "5"
        engine = c.app.state.worker._engine  # type: ignore[attr-defined]
        assert engine._vc.pad.x_center == 8  # restored for the next request
        short = c.post("/convert", data={"seed": "1"}, files={"audio": ("a.wav", sine_wav(2.0, freq=140.0))})
        assert short.status_code == (200 if max_frames else 503)  # the worker lives on


def _oom_encoding_engine(max_samples: int | None) -> Callable[[Any], Any]:
    """The real engine on tiny models whose content encoder 'runs out of device memory' for chunks longer than
    `max_samples` 16 kHz samples (None: always)."""
    from rvc_lora.pipeline.steps import PadConfig
    from service.rvc_engine import load_engine

    def factory(settings: Any) -> Any:
        engine = load_engine(settings)
        vc = engine._vc  # type: ignore[attr-defined]
        vc.pad = PadConfig(x_pad=1, x_query=2, x_center=8, x_max=9)  # 6 s of audio: one chunk of 8 s padded
        real = vc.content_features

        def content_features(plan: Any, i: int) -> Any:
            chunk = plan.chunks[i]
            if max_samples is None or chunk.stop - chunk.start > max_samples:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(plan, i)

        vc.content_features = content_features
        return engine

    return factory


@pytest.mark.parametrize(("max_samples", "status"), [(7 * 16000, 200), (None, 503)])
def test_device_oom_in_the_pipelined_content_encoder_retries_whole_else_503(
        tmp_path: Path, tiny_service_assets: dict[str, Any], max_samples: int | None, status: int,
        caplog: pytest.LogCaptureFixture) -> None:
    """The pipelined worker: out of memory in a chunk's content features is not an internal error but the same
    retry as a row's (the whole request in shorter chunks), else 503; the worker serves the next request."""
    with running_app(tmp_path, factory=_oom_encoding_engine(max_samples), model=tiny_service_assets["model"],
                     hubert=tiny_service_assets["hubert"], max_rank=8, warmup=False, batching=True) as c:
        r = c.post("/convert", data={"seed": "1"}, files={"audio": ("a.wav", sine_wav(6.0, freq=140.0))})
        assert r.status_code == status, r.text[:300]
        if status == 200:
            assert "converting again in chunks of 4 s" in caplog.text
        else:
            assert r.json()["error"]["code"] == "device_out_of_memory" and r.headers["Retry-After"] == "5"
        short = c.post("/convert", data={"seed": "1"}, files={"audio": ("a.wav", sine_wav(2.0, freq=140.0))})
        assert short.status_code == (200 if max_samples else 503)  # the worker lives on


# faults: disk full and write errors, on every write path

def _enospc(*_: object, **__: object) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullDisk:
    """A file whose writes fail with ENOSPC (what a full volume does mid-upload)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def write(self, _: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *_: object) -> None:
        self._real.close()


def _full_fdopen(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    real = os.fdopen
    monkeypatch.setattr(f"{module}.os.fdopen", lambda fd, *a, **k: _FullDisk(real(fd, *a, **k)))


@pytest.mark.parametrize("where", ["temp file", "write", "fsync", "rename", "commit record"])
def test_disk_errors_during_upload_store_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 where: str) -> None:
    with running_app(tmp_path) as c:
        if where == "temp file":
            monkeypatch.setattr("service.store.tempfile.mkstemp", _enospc)
        elif where == "write":
            _full_fdopen(monkeypatch, "service.store")
        elif where == "fsync":
            monkeypatch.setattr("service.store.os.fsync", _enospc)
        elif where == "rename":
            monkeypatch.setattr("service.store.os.replace", _enospc)
        else:
            import service.store

            real_write = service.store.AdapterStore._write

            def meta_fails(self: Any, rec: Any, adapter: Any, index: Any) -> None:
                monkeypatch.setattr("service.store.json.dump", _enospc)  # after the objects were renamed in
                real_write(self, rec, adapter, index)

            monkeypatch.setattr("service.store.AdapterStore._write", meta_fails)
        r = c.post("/adapters", files={"file": ("v.safetensors", adapter_bytes(tmp_path, 1))})
        monkeypatch.undo()
        assert (r.status_code, r.json()["error"]["code"]) == (507, "storage_error")
        assert "No space left" in r.json()["error"]["message"]
        assert c.get("/adapters").json()["adapters"] == []
        store = tmp_path / "store"
        assert [p for p in store.rglob("*") if p.is_file()] == []
        assert c.post("/adapters", files={"file": ("v.safetensors", adapter_bytes(tmp_path, 1))}).status_code == 201


@pytest.mark.parametrize("where", ["temp file", "write"])
def test_disk_errors_while_buffering_audio_are_507(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   where: str) -> None:
    with running_app(tmp_path) as c:
        if where == "temp file":
            monkeypatch.setattr("service.store.tempfile.mkstemp", _enospc)
        else:
            _full_fdopen(monkeypatch, "service.spool")  # the spool is written by capture_upload
        r = c.post("/convert", files={"audio": ("a.wav", sine_wav())})
        monkeypatch.undo()
        assert (r.status_code, r.json()["error"]["code"]) == (507, "storage_error")
        assert not list(tmp_path.glob("rvc-upload-*"))
        assert c.post("/convert", files={"audio": ("a.wav", sine_wav())}).status_code == 200


def markdown_table() -> str:
    """Run the corpus against a fresh app and render it (RELIABILITY.md)."""
    import tempfile

    rows = ["| group | input | route | status | error code | checked afterwards |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder, running_app(Path(folder), **LIMITS) as client:
        tmp = Path(folder)
        for case in CORPUS:
            before = on_disk(tmp)
            r = send(client, case, tmp)
            code = r.json()["error"]["code"] if r.status_code >= 400 else (case.note or "converted")
            kept = "server up, nothing left on disk" if client.get("/healthz").status_code == 200 and \
                on_disk(tmp) == before else "**FAILED**"
            name = case.name.replace("|", "\\|").encode("unicode_escape").decode()
            rows.append(f"| {case.group} | {name} | {case.route} | {r.status_code} | {code} | {kept} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")


def test_a_full_queue_refuses_before_decoding(tmp_path: Path) -> None:
    import threading

    from tests.test_service_engine import BlockingEngine

    engine = BlockingEngine()
    with running_app(tmp_path, engine, max_queued_audio_s=1.0, max_audio_s=1.0) as c:
        threads = [threading.Thread(target=lambda: c.post("/convert", files={"audio": ("a.wav", sine_wav(1.0))}))
                   for _ in range(2)]  # one runs (blocked), one waits: the queue holds its 1.0 s bound
        threads[0].start()
        assert engine.started.wait(10)
        threads[1].start()
        worker = c.app.state.worker  # type: ignore[attr-defined]
        for _ in range(500):
            if worker.queued_audio_s >= 1.0:
                break
            threading.Event().wait(0.01)
        try:
            r = c.post("/convert", files={"audio": ("a.wav", b"not audio at all")})  # would be a 415 if decoded
            assert (r.status_code, r.json()["error"]["code"]) == (503, "queue_full") and "Retry-After" in r.headers
        finally:
            engine.gate.set()
            for t in threads:
                t.join(20)
