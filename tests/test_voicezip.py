"""Voice zips (a .pth + optional .index): the library's checks, and `POST /adapters` with one."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from rvc_lora.voicezip import (
    VoicePackageError,
    VoicePackageTooLarge,
    ZipLimits,
    is_voice_zip,
    open_voice_zip,
    voice_files,
)
from tests.test_service_extraction import real_client, synthetic_voice, upload_voice  # noqa: F401


def make_zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_a_voice_zip_unpacks_to_its_pth_and_index(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "v.zip", {"voice/model.pth": b"weights", "voice/trained_IVF.index": b"t",
                                      "voice/added_IVF.index": b"idx", "voice/README.txt": b"hi"})
    assert is_voice_zip(z)
    with voice_files(z) as (model, index):
        assert model.read_bytes() == b"weights" and index is not None and index.read_bytes() == b"idx"
        folder = model.parent
    assert not folder.exists()  # the unpacked files are temporary


def test_a_torch_checkpoint_is_not_a_voice_zip(tmp_path: Path) -> None:
    import torch

    torch.save({"x": torch.zeros(2)}, tmp_path / "m.pth")
    assert not is_voice_zip(tmp_path / "m.pth")
    with voice_files(tmp_path / "m.pth") as (model, index):
        assert model == tmp_path / "m.pth" and index is None


@pytest.mark.parametrize(("members", "message"), [
    ({"../evil.pth": b"x"}, "outside the archive"),
    ({"/abs/voice.pth": b"x"}, "outside the archive"),
    ({"C:voice.pth": b"x"}, "outside the archive"),
    ({"a\\..\\voice.pth": b"x"}, "outside the archive"),
    ({"voice.pth": b"x", "inner.zip": b"PK"}, "archive inside the archive"),
    ({"a.pth": b"x", "b.pth": b"y"}, "found 2"),
    ({"notes.txt": b"x"}, "found 0"),
    ({"voice.pth": b"x", "a.index": b"1", "b.index": b"2"}, "2 .index files"),
])
def test_unsafe_or_ambiguous_zips_are_refused(tmp_path: Path, members: dict[str, bytes], message: str) -> None:
    z = make_zip(tmp_path / "v.zip", members)
    with pytest.raises(VoicePackageError, match=message), voice_files(z):
        pass


def test_zip_bombs_are_refused_before_unpacking(tmp_path: Path) -> None:
    bomb = make_zip(tmp_path / "bomb.zip", {"voice.pth": bytes(10_000_000)})
    with pytest.raises(VoicePackageTooLarge, match="zip bomb"), voice_files(bomb):
        pass
    big = make_zip(tmp_path / "big.zip", {"voice.pth": bytes(5000)}, method=zipfile.ZIP_STORED)
    with pytest.raises(VoicePackageTooLarge, match="more than the 1,000 allowed"), \
            open_voice_zip(big, ZipLimits(max_total_bytes=1000)):
        pass
    many = make_zip(tmp_path / "many.zip", {f"f{i}.txt": b"" for i in range(70)} | {"voice.pth": b"x"})
    with pytest.raises(VoicePackageError, match="71 entries"), voice_files(many):
        pass


def test_upload_of_a_voice_zip_extracts_the_voice(real_client: TestClient, synthetic_voice: Path,  # noqa: F811
                                                  tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("Singer/Singer.pth", synthetic_voice.read_bytes())
    r = upload_voice(real_client, buf.getvalue(), "Singer.zip", name="singer", rank="8")
    assert r.status_code == 201, r.text
    assert r.json()["extraction"]["requested_rank"] == 8


@pytest.mark.parametrize(("members", "status", "code"), [
    ({"../x.pth": b"x"}, 422, "bad_voice_package"),
    ({"voice.pth": bytes(5_000_000)}, 413, "voice_package_too_large"),
    ({"voice.pth": b"not a torch file"}, 422, "bad_checkpoint"),
])
def test_upload_of_a_bad_voice_zip_is_a_clear_4xx(real_client: TestClient, members: dict[str, bytes],  # noqa: F811
                                                  status: int, code: str, tmp_path: Path) -> None:
    z = make_zip(tmp_path / "v.zip", members)
    r = upload_voice(real_client, z.read_bytes(), "v.zip")
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()["error"]
    assert body["code"] == code and "v.zip" in body["message"] or code == "bad_checkpoint"
    assert str(tmp_path) not in r.text
