"""`rvc-lora models fetch`: the model files real use needs, from the Hugging Face hub, checked against
the sha256 sums recorded here. Nothing in rvc-lora downloads anything unless this command is run.

Source: the RVC project's own hub repository `lj1995/VoiceConversionWebUI` (the files RVC WebUI,
Applio and rvc-python download): the fairseq HuBERT base content encoder, RMVPE's weights, and the v2
40 kHz pretrained generator/discriminator that training starts from. `huggingface_hub` does the
transfer: it shows progress, resumes an interrupted download from its partial file, and honours
`HF_ENDPOINT` (a mirror) and `HF_TOKEN`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rvc_lora.errors import RVCLoraError

REPO_ID = "lj1995/VoiceConversionWebUI"
REVISION = "main"
DEFAULT_DIR = Path("models")
_CHUNK = 1 << 20


class FetchError(RVCLoraError):
    """A model file could not be downloaded (network, hub, disk)."""

    code = "fetch_failed"


class ChecksumError(FetchError):
    """A downloaded file's sha256 is not the one recorded for it; the file was removed."""

    code = "checksum_mismatch"


@dataclass(frozen=True)
class ModelFile:
    """One file of the hub repository: its path there (and under the target folder), its sha256 (None:
    not known to rvc-lora, so not verified, and said so), its size in bytes and what it is for."""

    path: str
    sha256: str | None
    size: int | None
    role: str


# Sums and sizes as published for these files by the hub (the LFS object ids are their sha256).
MODEL_FILES: tuple[ModelFile, ...] = (
    ModelFile("hubert_base.pt", "f54b40fd2802423a5643779c4861af1e9ee9c1564dc9d32f54f20b5ffba7db96", 189_507_909,
              "content encoder (fairseq HuBERT base)"),
    ModelFile("rmvpe.pt", "6d62215f4306e3ca278246188607209f09af3dc77ed4232efdd069798c4ec193", 181_184_272,
              "RMVPE pitch model (f0 method rmvpe, the default once configured)"),
    ModelFile("pretrained_v2/f0G40k.pth", "3b2c44035e782c4b14ddc0bede9e2f4a724d025cd073f736d4f43708453adfcb",
              73_106_273, "pretrained v2 40 kHz generator (training base)"),
    ModelFile("pretrained_v2/f0D40k.pth", "6b6ab091e70801b28e3f41f335f2fc5f3f35c75b39ae2628d419644ec2b0fa09",
              142_875_703, "pretrained v2 40 kHz discriminator (training)"),
)


@dataclass(frozen=True)
class Fetched:
    """Where a file is and how it was checked: "verified" (sha256 matches), or "unverified" (no recorded sum)."""

    file: ModelFile
    path: Path
    check: str
    downloaded: bool


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: Path, file: ModelFile) -> str:
    """"verified" or "unverified" (no recorded sum); a mismatch removes `path` and raises `ChecksumError`."""
    if file.sha256 is None:
        return "unverified"
    actual = sha256_of(path)
    if actual != file.sha256:
        path.unlink(missing_ok=True)
        raise ChecksumError(f"{file.path}: sha256 is {actual}, expected {file.sha256}; the file was removed. The "
                            f"source served other bytes than the ones rvc-lora knows: check HF_ENDPOINT, or retry")
    return "verified"


def fetch(dest: str | os.PathLike[str], files: Sequence[ModelFile] = MODEL_FILES, *, endpoint: str | None = None,
          revision: str = REVISION, say: Callable[[str], None] = print) -> list[Fetched]:
    """Download `files` into `dest` (each at its repository path), verify them, and return where they are.

    A file already there with the recorded sum is not downloaded again; one with another sum is replaced.
    `endpoint` defaults to `HF_ENDPOINT` (read now, not at import) or the public hub. A partial download
    left by an interrupted run is resumed by huggingface_hub. Raises `FetchError` / `ChecksumError`."""
    from huggingface_hub import hf_hub_download

    root = Path(dest)
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    source = f"{(endpoint or 'https://huggingface.co').rstrip('/')}/{REPO_ID}"
    results = []
    for file in files:
        target = root / file.path
        size = f"{file.size / 1e6:.0f} MB" if file.size else "size unknown"
        if target.is_file():
            try:
                check = check_file(target, file)
                say(f"{file.path}: already in {root} ({check})")
                results.append(Fetched(file, target, check, downloaded=False))
                continue
            except ChecksumError:
                say(f"{file.path}: the copy in {root} does not match its sha256; downloading it again")
        say(f"{file.path} ({size}, {file.role}): downloading from {source}")
        try:
            path = Path(hf_hub_download(REPO_ID, file.path, revision=revision, local_dir=root, endpoint=endpoint,
                                        cache_dir=root / ".cache" / "huggingface" / "hub"))
        except KeyboardInterrupt:
            say(f"{file.path}: interrupted; run the command again to resume")
            raise
        except Exception as exc:  # network, HTTP and disk errors of every layer under huggingface_hub
            raise FetchError(f"{file.path}: download from {source} failed: {type(exc).__name__}: {exc}") from exc
        check = check_file(path, file)
        say(f"{file.path}: {'sha256 verified' if check == 'verified' else 'sha256 UNKNOWN to rvc-lora: not verified'}")
        results.append(Fetched(file, path, check, downloaded=True))
    return results


def usage(root: Path) -> str:
    """The flags and settings that use the files in `root`."""
    d = root.resolve()
    return "\n".join([
        "Use them with:",
        f"  rvc-lora convert IN OUT --model VOICE.pth --hubert {d / 'hubert_base.pt'} --rmvpe {d / 'rmvpe.pt'}",
        f"  rvc-lora train WORK_DIR --base {d / 'pretrained_v2/f0G40k.pth'} "
        f"--discriminator {d / 'pretrained_v2/f0D40k.pth'} --out VOICE.safetensors",
        f"  service: RVC_LORA_HUBERT={d / 'hubert_base.pt'} RVC_LORA_RMVPE={d / 'rmvpe.pt'} RVC_LORA_MODEL=BASE.pth",
        "  (with rmvpe.pt given, rmvpe is the default f0 method)",
    ])


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()  # progress lines between huggingface_hub's bars, in order


def selected(only: Sequence[str] | None) -> list[ModelFile]:
    """The files named by `--only` (repository path or file name), all without it."""
    if not only:
        return list(MODEL_FILES)
    unknown = [n for n in only if not any(n in (f.path, Path(f.path).name) for f in MODEL_FILES)]
    if unknown:
        raise FetchError(f"--only: unknown file(s) {', '.join(unknown)}; known: "
                         f"{', '.join(f.path for f in MODEL_FILES)}")
    return [f for f in MODEL_FILES if f.path in only or Path(f.path).name in only]


def cmd_models(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    files = selected(args.only)
    if args.action == "list":
        for file in files:
            _out(f"{file.path:<26} {file.size or 0:>12,} B  sha256 {file.sha256 or 'unknown (not verified)'}")
            _out(f"{'':<26} {file.role}")
        _out(f"source: https://huggingface.co/{REPO_ID} (or HF_ENDPOINT)")
        return 0
    fetched = fetch(root, files, say=_out)
    unverified = [f.file.path for f in fetched if f.check != "verified"]
    _out(f"{len(fetched)} file(s) in {root.resolve()}, "
         + (f"NOT verified (no recorded sha256): {', '.join(unverified)}" if unverified else "all sha256-verified"))
    _out(usage(root))
    return 0


def add_models_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `rvc-lora models {fetch,list}` on the CLI's subcommands."""
    names = [f.path for f in MODEL_FILES]
    p = sub.add_parser("models", help="download the model files real use needs (HuBERT, rmvpe, pretrained G/D)",
                       description=f"Files from https://huggingface.co/{REPO_ID}, checked against sha256 sums "
                       "recorded in rvc-lora. Nothing else in rvc-lora downloads anything.")
    p.add_argument("action", choices=["fetch", "list"], help="fetch: download and verify; list: what would be fetched")
    p.add_argument("--dir", default=str(DEFAULT_DIR), help="target folder (default: %(default)s)")
    p.add_argument("--only", nargs="+", metavar="FILE", default=None,
                   help=f"just these files (default: all of {', '.join(names)})")
    p.set_defaults(func=cmd_models)

