"""The contract: `openapi.json` is what the app generates, and every route documents its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.openapi import openapi_schema, render
from service.settings import Settings

CONTRACT = Path(__file__).resolve().parents[1] / "openapi.json"


def test_openapi_json_is_up_to_date() -> None:
    assert CONTRACT.is_file(), "generate it: python -m service.openapi > openapi.json"
    assert CONTRACT.read_text() == render(), "openapi.json drifted: python -m service.openapi > openapi.json"


def test_every_route_documents_its_errors() -> None:
    schema = openapi_schema()
    open_routes = {"/healthz", "/readyz", "/metrics"}
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            statuses = set(op["responses"])
            if path != "/metrics":  # plain text, cannot fail
                assert statuses - {"200", "201", "204"}, f"{method.upper()} {path} documents no error response"
            if path not in open_routes:
                assert "401" in statuses, f"{method.upper()} {path} does not document 401"
            for status, response in op["responses"].items():
                if status.startswith(("4", "5")) and path not in open_routes:
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorResponse"), f"{method.upper()} {path} {status}"


def test_forms_refuse_unknown_fields() -> None:
    schemas = openapi_schema()["components"]["schemas"]
    for name in ("ConvertForm", "InferForm", "AdapterForm"):
        assert schemas[name]["additionalProperties"] is False


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RVC_LORA_MAX_AUDIO_S", "5")
    monkeypatch.setenv("RVC_LORA_API_KEY", "abc")
    monkeypatch.setenv("RVC_LORA_SEED_ADAPTERS", json.dumps({"alice": "/x/alice.safetensors"}))
    settings = Settings()
    assert settings.max_audio_s == 5.0 and settings.api_key is not None
    assert settings.api_key.get_secret_value() == "abc" and "abc" not in repr(settings)
    assert settings.seed_adapters == {"alice": Path("/x/alice.safetensors")}
    with pytest.raises(ValueError, match="max_queued_audio_s"):
        Settings(max_audio_s=500, max_queued_audio_s=100)
