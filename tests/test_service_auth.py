"""The API key check against odd headers and paths, request ids from clients, and bounded metric labels."""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.auth import BearerAuth
from service.middleware import METHODS
from service.settings import Settings
from tests.test_service_engine import running_app, sine_wav

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with running_app(tmp_path_factory.mktemp("auth"), api_key=KEY) as c:
        yield c


@pytest.mark.parametrize(("header", "ok"), [
    (f"Bearer {KEY}", True),
    (f"bearer {KEY}", True),  # the scheme is case-insensitive (RFC 9110)
    (f"BEARER {KEY}", True),
    (f"Bearer   {KEY}  ", True),  # extra spaces around the token
    (f"Bearer {KEY}\n", True),  # (an ASGI server refuses a raw newline; the middleware strips it anyway)
    (f"Bearer {KEY.upper()}", False),  # the key itself is case-sensitive
    (f"Bearer {KEY}x", False),
    (f"Bearer {KEY[:-1]}", False),
    (f"Bearer{KEY}", False),
    (f"Bearer\t{KEY}", False),
    (f"Basic {KEY}", False),
    (KEY, False),
    ("Bearer ", False),
    ("Bearer", False),
    ("", False),
    ("Bearer " + "k" * 10_000, False),  # (a head above 16 KB is 431 before any key check)
    (f"Bearer {KEY} {KEY}", False),
])
def test_authorization_variants(client: TestClient, header: str, ok: bool) -> None:
    assert BearerAuth(lambda *_: None, KEY).authorized(header) is ok  # type: ignore[arg-type, return-value]
    if "\n" not in header:  # httpx refuses to send a newline in a header
        r = client.get("/adapters", headers={"Authorization": header})
        assert r.status_code == (200 if ok else 401), r.text


@pytest.mark.parametrize("path", [
    "/adapters/", "/ADAPTERS", "/Adapters/x", "/%61dapters", "/adapters%2F", "/adapters/%2e%2e/healthz",
    "/healthz/../adapters", "//adapters", "/adapters;x", "/model/", "/convert/", "/healthz/x", "/metrics/",
    "/metrics/../adapters", "/docs", "/openapi.json",
])
def test_no_path_spelling_reaches_a_route_without_the_key(client: TestClient, path: str) -> None:
    for method in ("GET", "POST", "DELETE"):
        r = client.request(method, path, files={"audio": ("a.wav", sine_wav())} if method == "POST" else None,
                           follow_redirects=False)
        if method == "GET" and r.request.url.path == "/":  # httpx reads '//adapters' as host 'adapters', path '/'
            assert r.headers["content-type"].startswith("text/html")  # the web console's page: open, read-only
            continue
        assert r.status_code == 401, (method, path, r.status_code)


def test_open_routes_stay_open_and_say_nothing_else(client: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/%68ealthz"):
        assert client.get(path).status_code == 200, path


@pytest.mark.parametrize("key", ["", "   ", "\n"])
def test_an_empty_key_is_refused_at_start(key: str) -> None:
    """An empty key let `Authorization: Bearer ` in: neither off nor protected."""
    with pytest.raises(ValidationError, match="api_key"):
        Settings(api_key=key)
    with pytest.raises(ValueError, match="empty"):
        BearerAuth(lambda *_: None, key)  # type: ignore[arg-type, return-value]


def test_a_key_file_newline_is_not_part_of_the_key(tmp_path: Path) -> None:
    """`--from-file` secrets and `$(cat key)` mistakes end in a newline that no client can send."""
    assert Settings(api_key=f"{KEY}\n").api_key.get_secret_value() == KEY  # type: ignore[union-attr]
    with running_app(tmp_path, api_key=f" {KEY}\n") as c:
        assert c.get("/adapters", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


@pytest.mark.parametrize("incoming", ["a\r\nSet-Cookie: x=1", "x" * 10_240, "a b", "a\x00b", "ü", "a" * 65, ""])
def test_unsafe_request_ids_are_replaced_not_echoed(client: TestClient, incoming: str) -> None:
    scope_headers = [(b"x-request-id", incoming.encode("utf-8"))]
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/healthz", "raw_path": b"/healthz", "query_string": b"", "root_path": "",
             "headers": scope_headers, "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    assert client.portal is not None
    client.portal.call(client.app, scope, receive, send)  # type: ignore[arg-type]
    start = next(m for m in sent if m["type"] == "http.response.start")
    ids = [v for k, v in start["headers"] if k == b"x-request-id"]  # type: ignore[attr-defined]
    assert len(ids) == 1 and len(ids[0]) == 32 and ids[0].isalnum()


def test_metric_labels_stay_bounded_under_random_paths(client: TestClient) -> None:
    rng = random.Random(0)
    for _ in range(300):
        path = "/" + "/".join("".join(rng.choices(string.ascii_letters + string.digits + "%._-", k=rng.randint(1, 12)))
                              for _ in range(rng.randint(1, 4)))
        method = rng.choice(["GET", "POST", "DELETE", "PUT", "PROPFIND", "BREW"])
        client.request(method, path, headers={"Authorization": f"Bearer {KEY}"} if rng.random() < 0.5 else {})
        client.get("/adapters/" + "".join(rng.choices(string.ascii_lowercase, k=8)),
                   headers={"Authorization": f"Bearer {KEY}"})
    # the console's page and its files are routes outside the schema
    templates = set(client.app.openapi()["paths"]) | {"/", "/console", "unmatched"}  # type: ignore[attr-defined]
    registry = client.app.state.metrics.registry  # type: ignore[attr-defined]
    labels = [s.labels for m in registry.collect() if m.name.startswith("rvc_lora_http_request") for s in m.samples]
    assert {lab["route"] for lab in labels} <= templates
    assert {lab["method"] for lab in labels if "method" in lab} <= METHODS | {"other"}
    assert {lab["status"] for lab in labels if "status" in lab} <= {"200", "401", "404", "405", "422"}
