"""Contract fuzzing with schemathesis, against a real uvicorn server on 127.0.0.1 (fake engine, API key set).

Stateless: every operation of `openapi.json`, schema-valid and schema-invalid requests (random form fields,
random bytes as audio, features and adapters). Stateful: upload -> get / convert / delete chains through the
OpenAPI links of `POST /adapters`, with real adapter files and audio injected into the valid requests.
Checked on every response: no 5xx, a documented status, the documented content type, headers and body
schema; schema-invalid requests are refused (stateless run); a request without the key gets 401.
Bounded: `RVC_LORA_FUZZ_EXAMPLES` examples per operation (default 40), derandomized unless
`RVC_LORA_FUZZ_SEED` is set (e.g. `RVC_LORA_FUZZ_EXAMPLES=600 RVC_LORA_FUZZ_SEED=$RANDOM pytest ...`).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from service.app import create_app
from service.openapi import openapi_schema
from service.settings import Settings
from tests.test_service_engine import FakeEngine, adapter_bytes, sine_wav

KEY = "contract-key"
EXAMPLES = int(os.environ.get("RVC_LORA_FUZZ_EXAMPLES", "40"))
SEED = os.environ.get("RVC_LORA_FUZZ_SEED")
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                derandomize=SEED is None, database=None)
# our API checks more than the schema can say (decodable audio, speaker count, adapter existence and fit), so a
# schema-valid request may rightly get a 4xx: positive_data_acceptance does not apply
SCHEMA_ONLY = [positive_data_acceptance]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


URL = f"http://127.0.0.1:{_free_port()}"
schema = schemathesis.openapi.from_dict(openapi_schema())
schema.config.update(base_url=URL, headers={"Authorization": f"Bearer {KEY}"})
STATUSES: Counter[tuple[str, str, int]] = Counter()
GOOD_ADAPTERS: list[bytes] = []
GOOD_AUDIO = sine_wav(0.25)
WORK_DIR: list[Path] = []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app under uvicorn in a thread of this process, on the loopback address only."""
    tmp = tmp_path_factory.mktemp("contract")
    WORK_DIR[:] = [tmp]
    GOOD_ADAPTERS[:] = [adapter_bytes(tmp, seed) for seed in range(3)]
    app = create_app(Settings(adapter_dir=tmp / "store", work_dir=tmp, api_key=KEY, max_audio_s=5.0,
                              max_queued_audio_s=10.0, max_adapter_bytes=1 << 20, max_index_bytes=1 << 16,
                              max_voice_bytes=1 << 20), engine_factory=lambda _: FakeEngine())
    port = int(URL.rsplit(":", 1)[1])
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, name="contract-server", daemon=True)
    thread.start()
    try:
        for _ in range(400):
            try:
                if httpx.get(f"{URL}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.025)
        else:
            raise AssertionError("the contract server did not become ready")
        yield URL
    finally:
        uv.should_exit = True
        thread.join(10)


@schema.hook
def map_case(context: Any, case: Any) -> Any:
    """Stateful run: valid uploads carry a real adapter file, valid conversions real audio (the stateless run
    sends random bytes there), so that chains reach the adapter and the worker."""
    if not STATEFUL.is_set() or (case.meta is not None and case.meta.generation.mode.is_negative):
        return case
    op, body = case.operation, case.body
    if isinstance(body, dict) and op.method.upper() == "POST":
        if op.path == "/adapters":
            case.body = {k: v for k, v in body.items() if k != "index"}
            case.body["file"] = GOOD_ADAPTERS[len(str(body.get("name") or "")) % len(GOOD_ADAPTERS)]
        elif op.path == "/convert":
            case.body = {**body, "audio": GOOD_AUDIO}
    return case


@schema.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    STATUSES[(case.operation.method.upper(), case.operation.path, response.status_code)] += 1


STATEFUL = threading.Event()


@schema.parametrize()
@FUZZ
def test_every_operation_conforms(case: Any, server: str) -> None:
    case.call_and_validate(excluded_checks=SCHEMA_ONLY)


class Workflow(schema.as_state_machine()):  # type: ignore[misc]
    def setup(self) -> None:
        STATEFUL.set()

    def teardown(self) -> None:  # each run starts from an empty store: the same draws, the same responses
        headers = {"Authorization": f"Bearer {KEY}"}
        for adapter in httpx.get(f"{URL}/adapters", headers=headers, timeout=10).json()["adapters"]:
            httpx.delete(f"{URL}/adapters/{adapter['id']}", headers=headers, timeout=10)

    def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
        # injected files turn some generated-invalid bodies valid: negative_data_rejection belongs to the run above
        case.validate_response(response, excluded_checks=[*SCHEMA_ONLY, negative_data_rejection])


def test_upload_convert_delete_chains(server: str) -> None:
    try:
        Workflow.run(settings=settings(FUZZ, max_examples=max(EXAMPLES // 2, 5), stateful_step_count=6))
    finally:
        STATEFUL.clear()
    reached = {(method, path) for (method, path, status) in STATUSES if status < 300}
    assert {("POST", "/adapters"), ("GET", "/adapters/{ref}"), ("DELETE", "/adapters/{ref}"),
            ("POST", "/convert")} <= reached, sorted(STATUSES.items())
    assert not [k for k in STATUSES if k[2] >= 500], sorted(STATUSES.items())
    assert not list(WORK_DIR[0].glob("rvc-upload-*"))  # no spooled upload left behind

