"""WebSocket /stream against a real uvicorn on 127.0.0.1 with the real engine on tiny models: interleaved
streams (their blocks synthesized in batches across voices) each equal to the same stream alone (and to the
library), hot changes, limits and close codes, auth."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect

from rvc_lora.demo import speech_like
from rvc_lora.stream import StreamParams
from rvc_lora.stream.client import StreamClient, StreamError
from tests.test_service_server import ROOT, _free_port

SERVER = """
import sys, json
from pathlib import Path
from typing import Any
sys.path.insert(0, {root!r})
from service.app import create_app, run_server
from service.logs import configure_logging
from service.settings import Settings

configure_logging("INFO")
port, cfg = int(sys.argv[1]), json.loads(sys.argv[2])
settings = Settings(**cfg)
run_server(create_app(settings), "127.0.0.1", port, 2.0)
"""
KEY = "k3y"
PARAMS = StreamParams(block_time=0.1, crossfade_time=0.05, extra_time=0.5, seed=5)


@pytest.fixture(scope="module")
def service(tiny_service_assets: dict[str, Path | list[Path]],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("stream-server")
    adapters = tiny_service_assets["adapters"]
    assert isinstance(adapters, list)
    cfg = {"model": str(tiny_service_assets["model"]), "hubert": str(tiny_service_assets["hubert"]),
           "device": "cpu", "adapter_dir": str(tmp / "store"), "api_key": KEY, "max_streams": 4,
           "stream_buffer_s": 0.5, "stream_send_timeout_s": 1.0, "warmup": False, "bank_slots": 4,
           # an accelerator's way on this CPU: several voices' rows in one batch (vmap and by_voice both tried)
           "batch_way": "auto",
           "seed_adapters": {f"voice{i}": str(p) for i, p in enumerate(adapters[:3])}}
    script = tmp / "server.py"
    script.write_text(SERVER.format(root=str(ROOT)))
    port = _free_port()
    log = (tmp / "server.log").open("ab")
    proc = subprocess.Popen([sys.executable, str(script), str(port), json.dumps(cfg)], cwd=ROOT, stdout=log,
                            stderr=log)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/adapters", headers={"Authorization": f"Bearer {KEY}"},
                              timeout=2)
                if r.status_code == 200 and len(r.json()["adapters"]) == 3:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("server not ready: " + (tmp / "server.log").read_text()[-3000:])
        yield f"ws://127.0.0.1:{port}/stream"
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def client(url: str, **kwargs: object) -> StreamClient:
    return StreamClient(url, sample_rate=kwargs.pop("sample_rate", 16000), api_key=KEY, **kwargs)  # type: ignore[arg-type]


STREAMS = [  # (adapter, params, sample rate, channels)
    ("voice0", PARAMS, 16000, 1),
    ("voice1", StreamParams(**{**PARAMS.to_dict(), "seed": 6, "f0_up_key": 4}), 48000, 2),
    (None, StreamParams(**{**PARAMS.to_dict(), "seed": 7, "rms_mix_rate": 0.5}), 16000, 1),
    ("voice2", StreamParams(**{**PARAMS.to_dict(), "seed": 8, "f0_up_key": -3}), 16000, 1),
]


def stream_batches(url: str, name: str = "rvc_lora_batch_stream_rows") -> tuple[float, float]:
    """(observations, those below 2) of a histogram of the server's metrics: by default (device batches, batches
    with fewer than 2 stream rows)."""
    text = httpx.get(url.replace("ws://", "http://").replace("/stream", "/metrics"), timeout=5).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith(name)}
    return values[f"{name}_count"], values[f'{name}_bucket{{le="1.0"}}']


def _input(i: int, sr: int, channels: int) -> np.ndarray:
    x = speech_like(0.3, sr, seed=i).astype(np.float32)
    return x if channels == 1 else np.stack([x, 0.5 * x], axis=1)


def test_interleaved_streams_each_equal_the_stream_alone(service: str) -> None:
    """Four streams (three voices and the base, distinct seeds) at once: their blocks meet in the content encoder's
    forwards and the device batches (several stream rows in one batch, several voices in one forward) and each
    stream's output equals the same stream alone to float rounding (measured: max abs diff <= 2.6e-7, SNR >= 132
    dB; the realtime fixture's bar is 1e-4 and 70 dB)."""
    alone = []
    for i, (adapter, params, sr, ch) in enumerate(STREAMS):
        with client(service, adapter=adapter, params=params, sample_rate=sr, channels=ch) as c:
            alone.append(c.convert(_input(i, sr, ch))[0])
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        adapter, params, sr, ch = STREAMS[i]
        try:
            with client(service, adapter=adapter, params=params, sample_rate=sr, channels=ch) as c:
                results[i] = c.convert(_input(i, sr, ch), window=1)[0]  # one block in flight: streams interleave
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    before, begins_before = stream_batches(service), stream_batches(service, "rvc_lora_stream_begin_blocks")
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(STREAMS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after, begins_after = stream_batches(service), stream_batches(service, "rvc_lora_stream_begin_blocks")
    assert not errors, errors
    assert after[0] - before[0] > after[1] - before[1], "no batch held two stream blocks"
    assert begins_after[0] - begins_before[0] > begins_after[1] - begins_before[1], \
        "no content-encoder forward held two stream blocks"
    for i, want in enumerate(alone):
        assert results[i].shape == want.shape
        diff = float(np.abs(results[i] - want).max())
        snr = 10 * np.log10(np.sum(want.astype(np.float64) ** 2) / max(np.sum((results[i] - want) ** 2.0), 1e-30))
        assert diff <= 1e-5 and snr >= 90, (i, diff, snr)
    assert alone[1].shape[1] == 2 and not np.allclose(alone[0], alone[2][: len(alone[0])])


def test_stream_equals_the_library(service: str, tiny_service_assets: dict[str, Path | list[Path]]) -> None:
    from rvc_lora.pipeline.converter import VoiceConverter
    from rvc_lora.stream import StreamConverter

    adapters = tiny_service_assets["adapters"]
    assert isinstance(adapters, list)
    x = _input(0, 16000, 1)
    with client(service, adapter="voice0", params=PARAMS) as c:
        got, headers = c.convert(x)
    vc = VoiceConverter.from_files(tiny_service_assets["model"], tiny_service_assets["hubert"],  # type: ignore[arg-type]
                                   device="cpu")
    local = StreamConverter(vc, PARAMS, sr=16000, adapter=adapters[0])
    want = local.convert(x)
    assert np.abs(got - want).max() <= 1e-4
    assert [h["seq"] for h in headers] == list(range(len(headers)))
    assert all({"offset", "server_ms", "compute_ms", "late_blocks"} <= h.keys() for h in headers)


def test_hot_update_applies_from_the_next_block(service: str) -> None:
    x = _input(3, 16000, 1)
    with client(service, adapter="voice0", params=PARAMS) as c:
        plain, _ = c.convert(x)
    with client(service, adapter="voice0", params=PARAMS) as c:
        b = c.block_samples
        c.send(x[: 2 * b])
        first = [c.receive(30).audio for _ in range(2)]
        c.update(f0_up_key=7)
        assert c._message(30)["params"]["f0_up_key"] == 7
        c.update(block_time=0.2)  # cold: refused, the stream goes on
        with pytest.raises(StreamError, match="block_time cannot change mid-stream"):
            c._message(30)
        c.send(x[2 * b : 3 * b])
        third = c.receive(30).audio
    np.testing.assert_array_equal(np.concatenate(first), plain[: 2 * b])
    assert not np.allclose(third, plain[2 * b : 3 * b])


def close_code(url: str, first: str | bytes, headers: dict[str, str] | None = None,
               then: bytes | None = None) -> tuple[int | None, str]:
    ws = connect(url, additional_headers=headers)
    try:
        ws.send(first)
        if then is not None:
            ws.recv(10)  # ready
            ws.send(then)
        while True:
            ws.recv(10)
    except Exception:  # noqa: BLE001 - the close is what we look at
        pass
    finally:
        with contextlib.suppress(Exception):
            ws.close()
    rcvd = ws.protocol.close_rcvd
    return (None, "") if rcvd is None else (rcvd.code, rcvd.reason)


def config(**changes: object) -> str:
    return json.dumps({"format": "float32", "sample_rate": 16000, "channels": 1, **PARAMS.to_dict(), **changes})


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize(("first", "headers", "code", "reason"), [
    (config(), None, 4401, "missing or invalid API key"),
    (config(token="wrong"), None, 4401, "missing or invalid API key"),
    (config(), {"Authorization": "Bearer nope"}, 4401, "missing or invalid API key"),
    ("{not json", AUTH, 4400, "config: not JSON"),
    (config(sample_rate=22050), AUTH, 4400, "config.sample_rate"),
    (config(block_time=9), AUTH, 4400, "block_time must be a number"),
    (config(pitch=3), AUTH, 4400, "unknown stream parameter"),
    (config(adapter="nobody"), AUTH, 4404, "no adapter with id or name 'nobody'"),
    (b"\x00\x01", AUTH, 4400, "must be the JSON config"),
])
def test_refusals_close_with_a_clear_code(service: str, first: str | bytes, headers: dict[str, str] | None,
                                          code: int, reason: str) -> None:
    got_code, got_reason = close_code(service, first, headers)
    assert got_code == code and reason in got_reason


def test_token_in_the_config_message_authorizes(service: str) -> None:
    with client(service, adapter="voice2", params=PARAMS, token_in_config=True) as c:
        c.send(np.zeros(c.block_samples, np.float32))
        assert c.receive(30).audio.shape == (c.block_samples,)


def test_faster_than_realtime_past_the_buffer_is_closed(service: str) -> None:
    code, reason = close_code(service, config(), AUTH, then=np.zeros(16000 * 5, np.float32).tobytes())
    assert code == 4413 and "audio waiting" in reason


def closed_count(url: str, code: int) -> float:
    http = url.replace("ws://", "http://").replace("/stream", "/metrics")
    for line in httpx.get(http, timeout=5).text.splitlines():
        if line.startswith(f'rvc_lora_streams_closed_total{{code="{code}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_client_that_stops_reading_is_closed(service: str) -> None:
    """A sans-I/O client on a socket with a small receive buffer: after the handshake and the ready message it
    only writes, never reads, so the server's output backs up."""
    from websockets.client import ClientProtocol
    from websockets.protocol import State
    from websockets.uri import parse_uri

    before = closed_count(service, 4408)
    protocol = ClientProtocol(parse_uri(service))
    request = protocol.connect()
    request.headers["Authorization"] = AUTH["Authorization"]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small receive window
    sock.connect(("127.0.0.1", int(service.split(":")[2].split("/")[0])))
    try:
        protocol.send_request(request)
        sock.sendall(b"".join(protocol.data_to_send()))
        while protocol.state is State.CONNECTING:  # read the handshake answer, then never again
            protocol.receive_data(sock.recv(4096))
        protocol.send_text(json.dumps({"format": "float32", "sample_rate": 192000, "channels": 8,
                                       **{**PARAMS.to_dict(), "block_time": 1.5}}).encode())
        sock.sendall(b"".join(protocol.data_to_send()))
        block = np.zeros(288000 * 8, np.float32).tobytes()  # 9 MB out per block: more than the socket buffers
        deadline = time.monotonic() + 60
        while closed_count(service, 4408) == before and time.monotonic() < deadline:
            protocol.send_binary(block)
            sock.sendall(b"".join(protocol.data_to_send()))
            time.sleep(6.0)  # slower than realtime, so input never piles up: only the output does
        assert closed_count(service, 4408) == before + 1
    finally:
        sock.close()


def test_too_many_streams(service: str) -> None:
    held = [client(service, params=PARAMS) for _ in range(4)]
    try:
        code, reason = close_code(service, config(), AUTH)
        assert code == 4429 and "limit is 4" in reason
    finally:
        for c in held:
            c.close()


def test_stream_command_writes_what_the_server_sends(service: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from rvc_lora.cli import main
    from rvc_lora.pipeline.audio import decode_audio, encode_audio

    x = _input(0, 16000, 1)
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    src.write_bytes(encode_audio(x, 16000, "wav", "FLOAT"))
    assert main(["stream", str(src), str(dst), "--server", service, "--adapter", "voice0", "--api-key", KEY,
                 "--fast", "--block-time", "0.1", "--extra-time", "0.5", "--seed", "5"]) == 0
    assert "late blocks" in capsys.readouterr().out
    got, sr = decode_audio(dst)
    with client(service, adapter="voice0", params=PARAMS) as c:
        want, _ = c.convert(x)
    assert sr == 16000
    np.testing.assert_array_equal(got, want)
    assert main(["stream", str(src), str(dst), "--server", service, "--adapter", "nobody", "--api-key", KEY,
                 "--fast"]) == 2
    assert "4404" in capsys.readouterr().err


def test_an_adapter_deleted_mid_stream_keeps_its_voice(service: str) -> None:
    x = _input(4, 16000, 1)
    with client(service, adapter="voice2", params=PARAMS) as c:
        want, _ = c.convert(x)
    http = service.replace("ws://", "http://").replace("/stream", "")
    headers = {"Authorization": f"Bearer {KEY}"}
    with client(service, adapter="voice2", params=PARAMS) as c:
        b = c.block_samples
        c.send(x[:b])
        first = c.receive(30).audio
        adapters = httpx.get(f"{http}/adapters", headers=headers, timeout=10).json()["adapters"]
        voice = next(a for a in adapters if a["name"] == "voice2")
        assert httpx.delete(f"{http}/adapters/{voice['id']}", headers=headers, timeout=10).status_code in (200, 204)
        rest, _ = c.convert(x[b:])  # the same stream goes on with the voice it opened with
    np.testing.assert_array_equal(first, want[:b])
    np.testing.assert_array_equal(rest[: len(want) - b], want[b:])
    assert close_code(service, config(adapter="voice2"), AUTH)[0] == 4404  # a new stream cannot open it


@pytest.mark.parametrize("delete_midway", [False, True])
def test_without_batching_blocks_run_whole_and_equal_the_library_exactly(
        tiny_service_assets: dict[str, Path | list[Path]], tmp_path: Path, delete_midway: bool) -> None:
    """RVC_LORA_BATCHING=false keeps the one-at-a-time path: each block is `StreamConverter.process` on the device
    thread, in the stream's adapter bank slot, so the server's stream is the library's bit for bit (no batch moved
    a float), and no batch ran. `delete_midway`: the stream's adapter is deleted and another voice takes the only
    slot; the stream's next block loads its voice again from the host copy it kept, and the output does not change."""
    from starlette.testclient import TestClient

    from rvc_lora.pipeline.converter import VoiceConverter
    from rvc_lora.stream import StreamConverter
    from service.app import create_app
    from service.settings import Settings
    from tests.test_service_engine import sine_wav

    adapters = tiny_service_assets["adapters"]
    assert isinstance(adapters, list)
    settings = Settings(model=tiny_service_assets["model"], hubert=tiny_service_assets["hubert"], device="cpu",
                        adapter_dir=tmp_path / "store", warmup=False, batching=False, bank_slots=1,
                        seed_adapters={"voice0": str(adapters[0]), "voice1": str(adapters[1])})
    x = _input(0, 16000, 1)
    vc = VoiceConverter.from_files(tiny_service_assets["model"], tiny_service_assets["hubert"],  # type: ignore[arg-type]
                                   device="cpu")
    want = StreamConverter(vc, PARAMS, sr=16000, adapter=adapters[0]).convert(x)
    blocks = want.reshape(-1, round(PARAMS.block_time * 16000))
    padded = np.zeros(blocks.size, np.float32)
    padded[: len(x)] = x
    with TestClient(create_app(settings)) as http:
        for _ in range(600):  # the seed adapters are stored in the background
            if len(http.get("/adapters").json()["adapters"]) == 2:
                break
            time.sleep(0.1)
        ids = {a["name"]: a["id"] for a in http.get("/adapters").json()["adapters"]}
        with http.websocket_connect("/stream") as ws:
            ws.send_text(json.dumps({"adapter": "voice0", "format": "float32", "sample_rate": 16000,
                                     **PARAMS.to_dict()}))
            ready = ws.receive_json()
            assert ready["type"] == "ready" and ready["block_samples"] == blocks.shape[1]
            got = []
            for i, block in enumerate(padded.reshape(blocks.shape)):
                if delete_midway and i == len(blocks) // 2:
                    assert http.delete(f"/adapters/{ids['voice0']}").status_code in (200, 204)
                    r = http.post("/convert", data={"adapter": "voice1", "seed": "1"},
                                  files={"audio": ("a.wav", sine_wav(0.3))})
                    assert (r.status_code, r.headers["X-Adapter-Cache"]) == (200, "miss"), r.text
                ws.send_bytes(block.tobytes())
                assert ws.receive_json()["type"] == "block"
                got.append(np.frombuffer(ws.receive_bytes(), np.float32))
        metrics = http.get("/metrics").text
    np.testing.assert_array_equal(np.concatenate(got), want)
    assert "rvc_lora_batch_rows_count 0.0" in metrics


@pytest.mark.parametrize("batching", [True, False])
def test_a_stream_out_of_device_memory_closes_with_4503_and_the_others_go_on(
        tiny_service_assets: dict[str, Path | list[Path]], tmp_path: Path, batching: bool) -> None:
    """The device 'runs out of memory' for any synthesis in an adapter (the bank's batch in the pipelined worker,
    the swap of a whole `process` one at a time): the stream in voice0 is closed with 4503 (try again) and
    counted; the base-voice stream interleaved with it goes on to the end, equal to the library, and a new
    stream opens afterwards."""
    import torch
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from rvc_lora.pipeline.converter import VoiceConverter
    from rvc_lora.stream import StreamConverter
    from service.app import create_app
    from service.rvc_engine import load_engine
    from service.settings import Settings

    armed = threading.Event()  # once both streams are open (the store-time check and the open hold the bank)

    def factory(settings: Settings) -> object:
        engine: Any = load_engine(settings)
        hold, use_adapter = engine._bank.hold, engine._vc.use_adapter

        def oom_hold(voices: list[tuple[str, object]]) -> object:
            if armed.is_set() and any(adapter is not None for _, adapter in voices):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return hold(voices)

        def oom_use_adapter(adapter: object) -> object:
            if armed.is_set() and adapter is not None:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return use_adapter(adapter)

        engine._bank.hold, engine._vc.use_adapter = oom_hold, oom_use_adapter
        return engine

    adapters = tiny_service_assets["adapters"]
    assert isinstance(adapters, list)
    settings = Settings(model=tiny_service_assets["model"], hubert=tiny_service_assets["hubert"], device="cpu",
                        adapter_dir=tmp_path / "store", warmup=False, batching=batching,
                        seed_adapters={"voice0": str(adapters[0])})
    x = _input(1, 16000, 1)
    vc = VoiceConverter.from_files(tiny_service_assets["model"], tiny_service_assets["hubert"],  # type: ignore[arg-type]
                                   device="cpu")
    want = StreamConverter(vc, PARAMS, sr=16000).convert(x)
    blocks = np.zeros(want.size, np.float32)
    blocks[: len(x)] = x
    blocks = blocks.reshape(-1, round(PARAMS.block_time * 16000))
    opening = json.dumps({"format": "float32", "sample_rate": 16000, **PARAMS.to_dict()})
    with TestClient(create_app(settings, engine_factory=factory)) as http:  # type: ignore[arg-type]
        for _ in range(600):  # the seed adapter is stored in the background
            if http.get("/adapters").json()["adapters"]:
                break
            time.sleep(0.1)
        with http.websocket_connect("/stream") as voiced, http.websocket_connect("/stream") as base:
            voiced.send_text(json.dumps({"adapter": "voice0", **json.loads(opening)}))
            base.send_text(opening)
            assert voiced.receive_json()["type"] == base.receive_json()["type"] == "ready"
            armed.set()  # opened: voice0 is in its bank slot (loading it holds the bank too)
            got = []
            for i, block in enumerate(blocks):
                base.send_bytes(block.tobytes())
                if i == 1:
                    voiced.send_bytes(block.tobytes())
                    with pytest.raises(WebSocketDisconnect) as closed:
                        voiced.receive_json()
                    assert closed.value.code == 4503 and "out of memory" in closed.value.reason
                assert base.receive_json()["type"] == "block"
                got.append(np.frombuffer(base.receive_bytes(), np.float32))
        with http.websocket_connect("/stream") as again:  # the worker lives on
            again.send_text(opening)
            assert again.receive_json()["type"] == "ready"
            again.send_bytes(blocks[0].tobytes())
            assert again.receive_json()["type"] == "block"
            np.testing.assert_array_equal(np.frombuffer(again.receive_bytes(), np.float32), got[0])
        metrics = http.get("/metrics").text
    assert np.abs(np.concatenate(got) - want).max() <= 1e-5
    assert "rvc_lora_stream_out_of_memory_total 1.0" in metrics
    assert 'rvc_lora_streams_closed_total{code="4503"} 1.0' in metrics


def test_a_stream_whose_voice_does_not_fit_the_device_is_closed_with_4503(
        tiny_service_assets: dict[str, Path | list[Path]], tmp_path: Path) -> None:
    """Opening a stream loads its voice into a bank slot; the device out of memory there closes that stream with
    4503 (try again) and counts it, as a block's would; a base-voice stream opens and converts beside it."""
    import torch
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from service.app import create_app
    from service.rvc_engine import load_engine
    from service.settings import Settings

    armed = threading.Event()

    def factory(settings: Settings) -> object:
        engine: Any = load_engine(settings)
        hold = engine._bank.hold

        def oom_hold(voices: list[tuple[str, object]]) -> object:
            if armed.is_set() and any(adapter is not None for _, adapter in voices):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return hold(voices)

        engine._bank.hold = oom_hold
        return engine

    adapters = tiny_service_assets["adapters"]
    assert isinstance(adapters, list)
    settings = Settings(model=tiny_service_assets["model"], hubert=tiny_service_assets["hubert"], device="cpu",
                        adapter_dir=tmp_path / "store", warmup=False, seed_adapters={"voice0": str(adapters[0])})
    opening = {"format": "float32", "sample_rate": 16000, **PARAMS.to_dict()}
    block = _input(1, 16000, 1)[: round(PARAMS.block_time * 16000)]
    with TestClient(create_app(settings, engine_factory=factory)) as http:  # type: ignore[arg-type]
        for _ in range(600):  # the seed adapter is stored in the background
            if http.get("/adapters").json()["adapters"]:
                break
            time.sleep(0.1)
        armed.set()
        with http.websocket_connect("/stream") as voiced:
            voiced.send_text(json.dumps({"adapter": "voice0", **opening}))
            with pytest.raises(WebSocketDisconnect) as closed:
                voiced.receive_json()
        assert closed.value.code == 4503
        assert "opening the stream" in closed.value.reason and "out of memory" in closed.value.reason
        with http.websocket_connect("/stream") as base:
            base.send_text(json.dumps(opening))
            assert base.receive_json()["type"] == "ready"
            base.send_bytes(block.tobytes())
            assert base.receive_json()["type"] == "block"
            assert len(base.receive_bytes()) == block.nbytes
        metrics = http.get("/metrics").text
    assert "rvc_lora_stream_out_of_memory_total 1.0" in metrics
    assert 'rvc_lora_streams_closed_total{code="4503"} 1.0' in metrics

def test_engine_stream_blocks_fail_a_block_alone(tiny_service_assets: dict[str, Path | list[Path]],
                                                 tmp_path: Path) -> None:
    """`RVCEngine.stream_blocks`: a block of non-finite samples fails alone (AudioError); the shared content
    forward running out of device memory is retried one stream at a time, and those blocks' steps equal the
    streams' own `begin`."""
    import torch

    from rvc_lora.errors import AudioError
    from service.rvc_engine import load_engine
    from service.settings import Settings

    engine: Any = load_engine(Settings(model=tiny_service_assets["model"], hubert=tiny_service_assets["hubert"],
                                       device="cpu", adapter_dir=tmp_path / "store", warmup=False))
    params = [StreamParams(**{**PARAMS.to_dict(), "seed": s}) for s in (1, 2, 3)]
    streams, alone = ([engine.open_stream(p, 16000, 1, None) for p in params] for _ in range(2))
    x = _input(2, 16000, 1)[:1600]
    bad = np.full(1600, np.nan, np.float32)
    content = engine._vc.content
    extract_batch, sizes = content.extract_batch, []

    def oom_together(audios: list[torch.Tensor], version: str) -> list[torch.Tensor]:
        sizes.append(len(audios))
        if len(audios) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return extract_batch(audios, version)  # type: ignore[no-any-return]

    content.extract_batch = oom_together
    try:
        results = engine.stream_blocks([(streams[0], x), (streams[1], bad), (streams[2], x)])
    finally:
        del content.extract_batch
    assert sizes == [2, 1, 1]
    assert isinstance(results[1], AudioError) and "NaN" in str(results[1])
    for i in (0, 2):
        step, row = results[i]
        want = alone[i].begin(x)
        assert row is not None and row.frames == want.feats.shape[1]
        torch.testing.assert_close(step.feats, want.feats, rtol=0, atol=0)
        torch.testing.assert_close(step.pitchf, want.pitchf, rtol=0, atol=0)
