"""Upload spooling: a request body streamed into a temp file under a size cap (413 past it, 507 when the disk
refuses), and the sweep of temp files that no live process can still be writing.

Temp file names carry `process_tag()` (host and pid): the folders may be shared by several server processes
(replicas on one volume), so a sweep at start removes only this process's own leftovers (an earlier run with
the same host and pid is dead) and files untouched for `stale_after_s`. Used by the adapter store (uploads
into `objects/`) and by the audio routes (spools in the work folder).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from service.errors import PayloadTooLarge, StorageError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PART_SUFFIX = ".part"
STALE_AFTER_S = 3600.0


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def process_tag() -> str:
    """`<host>.<pid>`, carried by this process's temp file names: no other live process can have written one."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40] or "host"
    return f"{host}.{os.getpid()}"


def sweepable(path: Path, tag: str, stale_after_s: float, now: float) -> bool:
    """A leftover temp file that no live process can be writing: this process's tag (an earlier process with
    this host and pid is dead), or untouched for `stale_after_s`."""
    if f"-{tag}-" in path.name:
        return True
    try:
        return now - path.stat().st_mtime > stale_after_s
    except FileNotFoundError:
        return False


def sweep_temp_files(folder: Path, pattern: str, stale_after_s: float = STALE_AFTER_S) -> int:
    """Remove the `pattern` files of `folder` that `sweepable` allows; returns how many."""
    tag, now, removed = process_tag(), time.time(), 0
    for path in folder.glob(pattern):
        if sweepable(path, tag, stale_after_s, now):
            path.unlink(missing_ok=True)
            removed += 1
            log.warning("swept an unfinished upload", extra={"file": path.name})
    return removed


def capture_upload(src: Readable, folder: Path | None, prefix: str, limit: int, what: str, verb: str, *,
                   digest: Any = None, sync: bool = False, retry_after: float | None = None) -> tuple[Path, int]:
    """Stream `src` into a new temp file in `folder` -> (path, size). 413 as soon as it passes `limit` bytes,
    507 when the disk refuses ("cannot {verb} the {what}: ..."); on any failure the file is gone. `digest` (a
    hashlib object) sees every byte; `sync` fsyncs before returning."""
    doing = f"{verb} the {what}"
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=PART_SUFFIX)
    except OSError as exc:
        raise StorageError(f"cannot {doing}: {exc.strerror}", retry_after=retry_after) from exc
    path, size = Path(name), 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"{what} is larger than the limit of {limit} bytes")
                if digest is not None:
                    digest.update(chunk)
                out.write(chunk)
            if sync:
                out.flush()
                os.fsync(out.fileno())
    except OSError as exc:  # disk full, I/O error: nothing is kept
        path.unlink(missing_ok=True)
        raise StorageError(f"cannot {doing}: {exc.strerror}", retry_after=retry_after) from exc
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, size
