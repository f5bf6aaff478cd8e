"""The engine boundary: fake engines (shared by the service tests) and the checks that they behave like
the protocol says. Fakes are deterministic and fast: a "conversion" is a gain per adapter plus seeded noise.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from fastapi.testclient import TestClient

from rvc_lora.adapters import AdapterInfo, load_adapter, save_adapter_tensors
from rvc_lora.errors import AdapterMismatchError, CheckpointError, IndexFileError
from rvc_lora.pipeline.converter import F0Track
from rvc_lora.pipeline.f0 import default_f0_method
from service.app import create_app
from service.engine import ConvertOptions, Engine, Extracted, Features, ModelInfo, Rendered, Row
from service.errors import DeviceOutOfMemory
from service.settings import Settings

FAKE_FINGERPRINT = "f" * 64
FAKE_LAYER = "dec.ups.0"
FAKE_INFO = ModelInfo(fingerprint=FAKE_FINGERPRINT, version="v2", f0=True, sr=40000, n_speakers=2, content_dim=768,
                      max_rank=8, target_modules=(FAKE_LAYER,), f0_methods=("pm", "harvest", "fcpe"), device="cpu")
FAIL_SEED = 666  # the fake engine raises a plain exception for this seed (a bug inside the worker)
OOM_SEED = 777  # ... and runs out of device memory for this one
GOOD_INDEX = b"fake-index-768"
FAKE_VOICE_BYTES = 1024  # what a fake voice counts against the host cache


def sine_wav(seconds: float = 0.5, sr: int = 16000, freq: float = 220.0, subtype: str = "PCM_16") -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def make_adapter(path: Path, seed: int = 0, *, rank: int = 4, fingerprint: str = FAKE_FINGERPRINT,
                 name: str = "voice") -> Path:
    """A real safetensors adapter file (tiny tensors) for the fake base."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"{FAKE_LAYER}.lora_A": torch.randn(rank, 12, generator=gen),
               f"{FAKE_LAYER}.lora_B": torch.randn(6, rank, generator=gen)}
    info = AdapterInfo(name=name, r=rank, lora_alpha=float(rank), target_modules=(FAKE_LAYER,),
                       base_fingerprint=fingerprint, sr=40000, version="v2", f0=True)
    return save_adapter_tensors(path, tensors, info)


_ADAPTER_BYTES: dict[tuple[object, ...], bytes] = {}


def adapter_bytes(tmp_path: Path, seed: int = 0, **kwargs: Any) -> bytes:
    """The bytes of `make_adapter(seed, **kwargs)`, the same on every call: safetensors writes metadata
    in hash-map order, so saving the same adapter twice can give different bytes (and ids)."""
    key = (seed, *sorted(kwargs.items()))
    if key not in _ADAPTER_BYTES:
        _ADAPTER_BYTES[key] = make_adapter(tmp_path / f"adapter-{seed}.safetensors", seed, **kwargs).read_bytes()
    return _ADAPTER_BYTES[key]


def fake_f0(audio16k: np.ndarray, f0_up_key: int) -> F0Track:
    """A pitch track for the fake: 10 ms frames, the first quarter unvoiced, then 200 Hz rising by 1 Hz a frame."""
    frames = len(audio16k) // 160
    source = (200.0 + np.arange(frames)).astype(np.float32)
    source[: frames // 4] = 0
    return F0Track(source, (source * 2 ** (f0_up_key / 12)).astype(np.float32))


class FakeEngine:
    """Deterministic stand-in for the real engine: it keeps a 'LoRA slot' (the gain of the resident voice),
    copied in per call like the real model, so a scheduling bug would show as one voice's gain in
    another request's output."""

    def __init__(self) -> None:
        self.loads = 0
        self.bank: OrderedDict[object, None] = OrderedDict()  # the fake adapter bank: resident voices, LRU first
        self.calls: list[str] = []  # "convert"/"infer" per job that reached the device
        self.slot = 1.0

    @property
    def info(self) -> ModelInfo:
        return FAKE_INFO

    def describe_adapter(self, path: Path) -> AdapterInfo:
        adapter = load_adapter(path)
        i = adapter.info
        if (i.base_fingerprint, i.sr, i.version, i.f0) != (FAKE_FINGERPRINT, 40000, "v2", True) or i.r > 8 \
                or set(i.target_modules) - {FAKE_LAYER} or i.full_delta:
            raise AdapterMismatchError(f"{path}: not made for the fake base's slots")
        return i

    def check_index(self, path: Path) -> None:
        if not path.read_bytes().startswith(GOOD_INDEX):
            raise IndexFileError(f"{path}: index vectors are 256-d, the model's features are 768-d")

    def extract_voice(self, voice: Path, *, rank: int, name: str, evaluate: bool) -> Extracted:
        """A fake voice model is a `.pth` holding {"fake_voice_seed": int, "fingerprint": str}."""
        try:
            data = torch.load(voice, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{voice}: not a readable PyTorch checkpoint") from exc
        if not isinstance(data, dict) or not isinstance(data.get("fake_voice_seed"), int):
            raise CheckpointError(f"{voice}: missing key 'weight' (the state dict of an RVC voice model)")
        if data.get("fingerprint") != FAKE_FINGERPRINT:
            raise AdapterMismatchError(f"{voice}: config.sr differs from the base's")
        path = make_adapter(voice.with_name(voice.name + ".safetensors"), data["fake_voice_seed"], rank=min(rank, 8),
                            name=name)
        report = {"base_fingerprint": FAKE_FINGERPRINT, "targets": "all", "rank": min(rank, 8), "requested_rank": rank,
                  "energy": None, "dtype": "float16", "layer_count": 1, "max_rel_error": 0.0, "mean_rel_error": 0.0,
                  "worst_layers": [], "full_delta_count": 0, "full_delta_values": 0, "skipped_count": 0,
                  "adapter_bytes": path.stat().st_size, "voice_bytes": voice.stat().st_size, "size_ratio": 1.0,
                  "snr_db": None, "base_snr_db": None, "eval_frames": 0, "eval_seed": 0, "notes": [], "seconds": 0.0,
                  "eval_seconds": 0.0}
        try:
            return Extracted(path.read_bytes(), report)
        finally:
            path.unlink()

    def load_voice(self, adapter: Path, index: Path | None) -> object:
        self.loads += 1
        tensors = load_adapter(adapter).tensors
        return 0.5 + float(sum(t.abs().sum() for t in tensors.values())) % 0.5

    def host_bytes(self, voice: object) -> int:
        return FAKE_VOICE_BYTES

    def to_device(self, voice: object) -> bool:
        resident = voice in self.bank
        self.bank[voice] = None
        self.bank.move_to_end(voice)
        while len(self.bank) > self.info.bank_slots:
            self.bank.popitem(last=False)
        return resident

    def drop_device(self, voice: object) -> None:
        self.bank.pop(voice, None)

    def device_voices(self) -> int:
        return len(self.bank)

    def warmup(self) -> float:
        return 1.0

    def _render(self, signal: np.ndarray, voice: object | None, seed: int | None, sr: int,
                f0: F0Track | None = None) -> Rendered:
        self.slot = 1.0 if voice is None else float(voice)  # type: ignore[arg-type]
        noise = 0.0 if seed is None else np.random.default_rng(seed).normal(0, 0.01, len(signal))
        return Rendered((signal * self.slot + noise).astype(np.float32), sr, {"f0": 0.001, "synth": 0.002}, f0)

    def convert(self, audio16k: np.ndarray, options: ConvertOptions, voice: object | None) -> Rendered:
        self.calls.append("convert")
        if options.seed == FAIL_SEED:
            raise RuntimeError("simulated bug inside the engine")
        if options.seed == OOM_SEED:
            raise DeviceOutOfMemory("the device ran out of memory for this request", retry_after=5)
        shifted = audio16k * (2 ** (options.f0_up_key / 12) if options.f0_up_key else 1.0)
        return self._render(np.clip(shifted, -1, 1), voice, options.seed, 16000, fake_f0(audio16k, options.f0_up_key))

    def stages(self, audio16k: np.ndarray, options: ConvertOptions, voice: object | None) -> FakeStages:
        return FakeStages(audio16k, options, voice)

    def synthesize(self, rows: Sequence[Row]) -> list[np.ndarray]:
        """Each row is a whole fake conversion (one chunk), through `convert` (so that subclasses gating it gate
        the pipelined worker too)."""
        out = []
        for row in rows:
            stages = row.inputs
            assert isinstance(stages, FakeStages)
            out.append(self.convert(stages.audio16k, stages.options, stages.voice).audio)
        return out

    def infer(self, features: Features, voice: object | None) -> Rendered:
        self.calls.append("infer")
        signal = np.repeat(np.tanh(features.phone.mean(axis=1)), 400)  # 400 samples per frame at 40 kHz
        return self._render(signal, voice, features.seed, 40000)


class FakeStages:
    """The fake conversion as the pipelined worker's stages: one chunk, synthesized by `FakeEngine.convert`."""

    prepare_on_device = False

    def __init__(self, audio16k: np.ndarray, options: ConvertOptions, voice: object | None) -> None:
        self.audio16k, self.options, self.voice = audio16k, options, voice

    def prepare(self) -> int:
        return 1

    def encode(self, i: int) -> object:
        return None

    def row(self, i: int, encoded: object) -> Row:
        return Row(max(len(self.audio16k) // 160, 1), self)

    def finish(self, outputs: Sequence[np.ndarray]) -> Rendered:
        track = fake_f0(self.audio16k, self.options.f0_up_key)
        return Rendered(outputs[0], 16000, {"f0": 0.001, "synth": 0.002}, track)


class BlockingEngine(FakeEngine):
    """Conversions wait for `gate` (bounded, so a broken test cannot hang); `started` is set when one
    reaches the device."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.started = threading.Event()

    def convert(self, audio16k: np.ndarray, options: ConvertOptions, voice: object | None) -> Rendered:
        self.started.set()
        self.gate.wait(timeout=20)
        return super().convert(audio16k, options, voice)


class FileGateEngine(FakeEngine):
    """For a server in another process: a conversion touches `<dir>/started`, then waits (bounded) until
    `<dir>/release` exists."""

    def __init__(self, gate_dir: Path) -> None:
        super().__init__()
        self.gate_dir = gate_dir

    def convert(self, audio16k: np.ndarray, options: ConvertOptions, voice: object | None) -> Rendered:
        (self.gate_dir / "started").touch()
        release = threading.Event()
        for _ in range(2000):
            if (self.gate_dir / "release").exists():
                break
            release.wait(0.01)
        return super().convert(audio16k, options, voice)


@contextmanager
def running_app(tmp_path: Path, engine: FakeEngine | None = None, *, wait: bool = True,
                factory: Callable[[Settings], Engine] | None = None, **overrides: Any) -> Iterator[TestClient]:
    """An in-process app (lifespan running) on a fake engine; `wait`: until models are loaded and warm."""
    settings = Settings(**{"adapter_dir": tmp_path / "store", "work_dir": tmp_path, **overrides})
    fake = engine or FakeEngine()
    app = create_app(settings, engine_factory=factory or (lambda _: fake))
    with TestClient(app, raise_server_exceptions=False) as client:
        if wait:
            assert client.portal is not None
            client.portal.call(app.state.worker.wait_loaded)
            client.portal.call(app.state.seeded.wait)
        yield client


def upload(client: TestClient, data: bytes, name: str | None = None, index: bytes | None = None,
           **headers: str) -> Any:
    files = {"file": ("voice.safetensors", data)}
    if index is not None:
        files["index"] = ("voice.index", index)
    return client.post("/adapters", files=files, data={"name": name} if name else {}, headers=headers)


def test_fakes_satisfy_the_engine_protocol() -> None:
    engines: list[Engine] = [FakeEngine(), BlockingEngine()]
    assert all(e.info.content_dim == 768 for e in engines)


def test_fake_engine_is_deterministic_and_voice_dependent(tmp_path: Path) -> None:
    engine = FakeEngine()
    audio = np.linspace(-0.5, 0.5, 1600, dtype=np.float32)
    voices = [engine.load_voice(make_adapter(tmp_path / f"{s}.safetensors", s), None) for s in (1, 2)]
    outs = [engine.convert(audio, ConvertOptions(seed=3), v).audio for v in (voices[0], voices[1], voices[0])]
    np.testing.assert_array_equal(outs[0], outs[2])
    assert not np.array_equal(outs[0], outs[1])


def test_fake_describe_refuses_another_base(tmp_path: Path) -> None:
    from rvc_lora.errors import AdapterMismatchError

    path = make_adapter(tmp_path / "other.safetensors", fingerprint="0" * 64)
    with pytest.raises(AdapterMismatchError):
        FakeEngine().describe_adapter(path)


# the real engine (VoiceConverter) behind the same routes, on tiny random models

@pytest.fixture
def real_client(tmp_path: Path, tiny_service_assets: dict[str, Any]) -> Iterator[TestClient]:
    from service.rvc_engine import load_engine

    with running_app(tmp_path, factory=load_engine, model=tiny_service_assets["model"],
                     hubert=tiny_service_assets["hubert"], max_rank=8) as client:
        yield client


def test_real_engine_end_to_end(real_client: TestClient, tiny_service_assets: dict[str, Any], tmp_path: Path) -> None:
    info = real_client.get("/model").json()
    assert (info["version"], info["content_dim"], info["sr"], info["n_speakers"]) == ("v1", 256, 40000, 3)
    assert "pm" in info["f0_methods"] and "rmvpe" not in info["f0_methods"]
    assert info["default_f0_method"] == default_f0_method(None)  # no rmvpe.pt configured: fcpe, or pm
    voice = tiny_service_assets["adapters"][0]
    r = upload(real_client, voice.read_bytes(), name="one")
    assert r.status_code == 201 and r.json()["rank"] == 4 and r.json()["base_fingerprint"] == info["fingerprint"]
    wav = sine_wav(0.3, freq=140.0)
    files = {"audio": ("a.wav", wav)}
    base = real_client.post("/convert", data={"seed": "1"}, files=files)
    first = real_client.post("/convert", data={"seed": "1", "adapter": "one"}, files=files)
    again = real_client.post("/convert", data={"seed": "1", "adapter": "one"}, files=files)
    assert base.status_code == first.status_code == again.status_code == 200
    assert (first.headers["X-Adapter-Cache"], again.headers["X-Adapter-Cache"]) == ("miss", "hit")
    assert first.content == again.content != base.content
    assert first.headers["X-F0-Method"] == default_f0_method(None)
    stages = {part.split(";")[0] for part in first.headers["Server-Timing"].split(", ")}
    assert stages >= {"queue", "decode", "f0", "features", "index", "synth", "encode"}
    audio, sr = sf.read(io.BytesIO(first.content))
    assert sr == 40000 and abs(len(audio) - 0.3 * 40000) <= 2 * 400 * 2
    assert real_client.post("/convert", data={"sid": "3"}, files=files).status_code == 422


@pytest.mark.parametrize("batching", [True, False])
def test_real_engine_prepares_audio_and_checks_sid_once_per_request(
        tmp_path: Path, tiny_service_assets: dict[str, Any], monkeypatch: pytest.MonkeyPatch, batching: bool) -> None:
    """The upload is decoded and prepared (`prepare_16k`) on arrival, and the conversion starts from it; the
    library checks the speaker id once (the route refused bad ids before queueing)."""
    import rvc_lora.pipeline.audio
    import rvc_lora.pipeline.converter
    from service.rvc_engine import load_engine

    calls: list[str] = []

    def spy(module: Any, name: str) -> None:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or real(*a, **k))

    with running_app(tmp_path, factory=load_engine, model=tiny_service_assets["model"],
                     hubert=tiny_service_assets["hubert"], max_rank=8, batching=batching) as client:
        spy(rvc_lora.pipeline.audio, "prepare_16k")
        spy(rvc_lora.pipeline.converter, "prepare_16k")
        spy(rvc_lora.pipeline.converter, "check_sid")
        r = client.post("/convert", data={"seed": "1", "sid": "2"}, files={"audio": ("a.wav", sine_wav(0.3))})
        assert r.status_code == 200
    assert sorted(calls) == ["check_sid", "prepare_16k"]


def test_real_engine_refuses_adapters_that_do_not_fit(real_client: TestClient,
                                                      tiny_service_assets: dict[str, Any], tmp_path: Path) -> None:
    r = upload(real_client, tiny_service_assets["other_base_adapter"].read_bytes())
    assert (r.status_code, r.json()["error"]["code"]) == (422, "adapter_mismatch")
    adapter = load_adapter(tiny_service_assets["adapters"][1])
    layer = adapter.info.target_modules[0]
    tensors = dict(adapter.tensors)
    tensors[f"{layer}.lora_A"] = torch.zeros(adapter.info.r, tensors[f"{layer}.lora_A"].shape[1] + 1)
    bad = save_adapter_tensors(tmp_path / "misshaped.safetensors", tensors, adapter.info)
    r = upload(real_client, bad.read_bytes())
    assert (r.status_code, r.json()["error"]["code"]) == (422, "adapter_mismatch")
    assert real_client.get("/adapters").json()["adapters"] == []


def test_real_engine_checks_uploaded_indexes_in_a_child(real_client: TestClient,
                                                         tiny_service_assets: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("faiss", reason="faiss is optional: pip install 'rvc-lora[index]'")
    from rvc_lora.pipeline.index import build_index

    good = build_index(np.random.default_rng(0).standard_normal((80, 256)).astype(np.float32), tmp_path / "v.index")
    crafted = bytearray(good.read_bytes())
    crafted[8:16] = (1 << 40).to_bytes(8, "little")  # the header's vector count: 2^40 x 1 KiB of floats
    voice = tiny_service_assets["adapters"][0].read_bytes()
    r = upload(real_client, voice, index=bytes(crafted))
    assert (r.status_code, r.json()["error"]["code"]) == (422, "bad_index")
    assert "claims 1099511627776 vectors" in r.json()["error"]["message"]
    assert real_client.get("/adapters").json()["adapters"] == []
    r = upload(real_client, voice, index=good.read_bytes())
    assert r.status_code == 201 and r.json()["has_index"]
    converted = real_client.post("/convert", data={"seed": "1", "adapter": r.json()["id"], "index_rate": "0.5"},
                                 files={"audio": ("a.wav", sine_wav(0.3, freq=140.0))})
    assert converted.status_code == 200


def test_real_engine_infer(real_client: TestClient, tiny_service_assets: dict[str, Any]) -> None:
    adapter_id = upload(real_client, tiny_service_assets["adapters"][2].read_bytes()).json()["id"]
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, phone=rng.normal(size=(30, 256)).astype(np.float32), pitch=rng.integers(1, 256, 30),
             nsff0=rng.uniform(100, 300, 30).astype(np.float32))
    r = real_client.post("/infer", data={"adapter": adapter_id, "seed": "0"},
                         files={"features": ("f.npz", buf.getvalue())})
    assert r.status_code == 200, r.text
    audio, sr = sf.read(io.BytesIO(r.content))
    assert (sr, len(audio)) == (40000, 30 * 400)
