"""`rvc-lora models fetch` against a fake Hugging Face hub on 127.0.0.1: the two endpoints
huggingface_hub calls (HEAD for metadata, GET with Range for the bytes), a corrupted file, a download
cut off half way, files already present."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from rvc_lora import fetch as fetch_mod
from rvc_lora.cli import main
from rvc_lora.fetch import ChecksumError, FetchError, ModelFile, fetch

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class FakeHub:
    """Serves `files` (repository path -> bytes) of `fetch.REPO_ID` at revision main, as the hub does for LFS
    files: ETag = the sha256 of what it serves, X-Repo-Commit, Content-Length, byte ranges."""

    files: dict[str, bytes]
    corrupt: set[str] = field(default_factory=set)  # serve other bytes (and their ETag) for these
    cut_next_get: bool = False  # the next GET sends half the body, then drops the connection
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    bytes_sent: int = 0
    url: str = ""

    def body(self, path: str) -> bytes | None:
        data = self.files.get(path)
        if data is not None and path in self.corrupt:
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        return data


def _handler(hub: FakeHub) -> type[http.server.BaseHTTPRequestHandler]:
    prefix = f"/{fetch_mod.REPO_ID}/resolve/main/"

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _serve(self, with_body: bool) -> None:
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            data = hub.body(self.path.removeprefix(prefix)) if self.path.startswith(prefix) else None
            if data is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            byte_range = self.headers.get("Range")
            if byte_range and with_body:
                start = int(byte_range.removeprefix("bytes=").split("-")[0])
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{sha256(data)}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not with_body:
                return
            payload = data[start:]
            if hub.cut_next_get:
                hub.cut_next_get = False
                payload = payload[: len(payload) // 2]
                self.close_connection = True
            self.wfile.write(payload)
            hub.bytes_sent += len(payload)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(with_body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(with_body=True)

    return Handler


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    rng = np.random.default_rng(0)
    fake = FakeHub({"rmvpe.pt": rng.bytes(300_000), "pretrained_v2/f0G40k.pth": rng.bytes(50_000)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


def files_of(hub: FakeHub, unknown: tuple[str, ...] = ()) -> list[ModelFile]:
    return [ModelFile(path, None if path in unknown else sha256(data), len(data), "test file")
            for path, data in hub.files.items()]


def gets(hub: FakeHub) -> list[tuple[str, str, str | None]]:
    return [r for r in hub.requests if r[0] == "GET"]


def test_downloads_and_verifies_each_file(hub: FakeHub, tmp_path: Path) -> None:
    lines: list[str] = []
    fetched = fetch(tmp_path, files_of(hub), endpoint=hub.url, say=lines.append)
    assert [(f.file.path, f.check, f.downloaded) for f in fetched] == [
        ("rmvpe.pt", "verified", True), ("pretrained_v2/f0G40k.pth", "verified", True)]
    for path, data in hub.files.items():
        assert (tmp_path / path).read_bytes() == data
    assert any(hub.url in line and "rmvpe.pt" in line for line in lines)  # says where it downloads from


def test_files_already_there_are_checked_not_downloaded(hub: FakeHub, tmp_path: Path) -> None:
    fetch(tmp_path, files_of(hub), endpoint=hub.url, say=lambda _: None)
    hub.requests.clear()
    again = fetch(tmp_path, files_of(hub), endpoint="http://127.0.0.1:9", say=lambda _: None)  # no hub at all
    assert [f.downloaded for f in again] == [False, False] and hub.requests == []


def test_a_local_copy_with_another_sum_is_replaced(hub: FakeHub, tmp_path: Path) -> None:
    (tmp_path / "rmvpe.pt").write_bytes(b"truncated")
    (fetched,) = fetch(tmp_path, files_of(hub)[:1], endpoint=hub.url, say=lambda _: None)
    assert fetched.downloaded and (tmp_path / "rmvpe.pt").read_bytes() == hub.files["rmvpe.pt"]


def test_a_corrupted_download_is_an_error_and_is_removed(hub: FakeHub, tmp_path: Path) -> None:
    hub.corrupt.add("rmvpe.pt")
    with pytest.raises(ChecksumError, match=r"rmvpe.pt: sha256 is [0-9a-f]{64}, expected") as info:
        fetch(tmp_path, files_of(hub), endpoint=hub.url, say=lambda _: None)
    assert info.value.code == "checksum_mismatch"
    assert not (tmp_path / "rmvpe.pt").exists()
    hub.corrupt.clear()  # the source is fixed: the next run gets the right file
    fetch(tmp_path, files_of(hub), endpoint=hub.url, say=lambda _: None)
    assert (tmp_path / "rmvpe.pt").read_bytes() == hub.files["rmvpe.pt"]


def test_an_interrupted_download_resumes(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection drops half way; huggingface_hub keeps what it wrote (whole 64 KiB chunks here, 10 MB on
    the real hub) and asks for the rest with a Range request."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    hub.cut_next_get = True
    size = len(hub.files["rmvpe.pt"])
    (fetched,) = fetch(tmp_path, files_of(hub)[:1], endpoint=hub.url, say=lambda _: None)
    assert fetched.check == "verified"
    ranges = [r[2] for r in gets(hub)]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1] is not None
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= size // 2  # the second GET asks for the rest only
    assert hub.bytes_sent == size // 2 + size - resumed_at


def test_a_file_without_a_recorded_sum_is_said_unverified(hub: FakeHub, tmp_path: Path) -> None:
    lines: list[str] = []
    fetched = fetch(tmp_path, files_of(hub, unknown=("rmvpe.pt",)), endpoint=hub.url, say=lines.append)
    assert [f.check for f in fetched] == ["unverified", "verified"]
    assert any("rmvpe.pt" in line and "not verified" in line for line in lines)


def test_a_missing_file_is_a_fetch_error(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="nothere.pt: download from .*127.0.0.1"):
        fetch(tmp_path, [ModelFile("nothere.pt", None, None, "x")], endpoint=hub.url, say=lambda _: None)


def test_cli_reads_hf_endpoint_and_prints_the_settings(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(fetch_mod, "MODEL_FILES", tuple(files_of(hub, unknown=("pretrained_v2/f0G40k.pth",))))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    assert main(["models", "fetch", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "NOT verified (no recorded sha256): pretrained_v2/f0G40k.pth" in out
    assert f"--rmvpe {tmp_path.resolve() / 'rmvpe.pt'}" in out and "RVC_LORA_RMVPE=" in out
    assert f"--base {tmp_path.resolve() / 'pretrained_v2/f0G40k.pth'}" in out


def test_cli_only_and_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--only", "rmvpe.pt"]) == 0
    out = capsys.readouterr().out
    assert "rmvpe.pt" in out and "6d62215f4306e3ca278246188607209f09af3dc77ed4232efdd069798c4ec193" in out
    assert "hubert_base.pt" not in out and "huggingface.co/lj1995/VoiceConversionWebUI" in out
    assert main(["models", "fetch", "--only", "nope.pt"]) == 2
    assert "unknown file(s) nope.pt" in capsys.readouterr().err


def test_every_recorded_file_has_a_sum_and_a_size() -> None:
    for file in fetch_mod.MODEL_FILES:
        assert file.sha256 is not None and len(file.sha256) == 64 and int(file.sha256, 16) >= 0
        assert file.size is not None and file.size > 1_000_000
