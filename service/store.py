"""Adapter store: the disk tier. Content-addressed, atomic, and no client string ever becomes a path.

Layout under `root`:
    objects/<id>.safetensors          the adapter file; id = first 16 hex of its sha256
    objects/<id>-<sha16>.index        its retrieval index, if any (named by its own hash)
    meta/<id>.json                    the commit record: name, hashes, sizes, and what the adapter is for (its
                                      `AdapterInfo`, in the metadata form its file keeps, extraction report included)

An upload is copied to a temp file in `objects/` (size cap enforced while copying), fsynced, renamed
into place, and committed by renaming its sidecar last: after a crash the store holds the whole
adapter or nothing.

The folder may be shared by several server processes (Kubernetes replicas on one volume). So: a lookup
that misses re-reads the commit records from disk before answering 404 (`refresh`), as do listings and
commits; and the sweep at start removes only what no live process can still be writing: temp files whose
name carries this host and process id (a previous run of this process: a restarted container keeps its
host name and pid), and temp files and uncommitted objects older than `stale_after_s`.

Thousands of adapters: every record is read once, at start; after that a request costs a few dict lookups
and at most a `stat` of `meta/`. `refresh` lists `meta/` only when its modification time says that a record
was added or removed since the last listing (a miss for an unknown name would otherwise list the whole folder
on every request).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rvc_lora.adapters import AdapterInfo
from rvc_lora.errors import AdapterNotFoundError, RVCLoraError
from service.errors import InvalidRequest, NameConflict, StorageError
from service.spool import PART_SUFFIX, STALE_AFTER_S, Readable, capture_upload, process_tag, sweep_temp_files, sweepable

log = logging.getLogger(__name__)

ID_RE = re.compile(r"[0-9a-f]{16}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # the same rule, for the OpenAPI schema
SETTLED_S = 2.0  # a folder mtime this old cannot be shared by a later change (coarse file system clocks)


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or ID_RE.fullmatch(name):
        raise InvalidRequest("name: 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit, and "
                             "not 16 hex digits (that is an id)")
    return name


@dataclass(frozen=True)
class Staged:
    """An upload copied to a temp file beside its final place, not yet committed."""

    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class StoredAdapter:
    """A committed adapter: where and how big its files are, and its `AdapterInfo` (the file's own record)."""

    id: str
    name: str | None
    sha256: str
    size_bytes: int
    index_sha256: str | None
    index_bytes: int | None
    created_at: str
    info: AdapterInfo

    @property
    def cache_key(self) -> str:
        """Changes when the content does (the same id can come back with another index after a delete)."""
        return f"{self.id}:{(self.index_sha256 or '')[:16]}"

    def to_json(self) -> dict[str, Any]:
        """The commit record: the info as the adapter file's metadata writes it (`AdapterInfo.to_metadata`)."""
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "info"},
                "info": self.info.to_metadata()}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> StoredAdapter:
        """A commit record read back, its info checked as a file's metadata is (AdapterError otherwise). Records
        written before the info was kept in that form (`meta`: label, rank, ...) are read too."""
        data = dict(data)
        info = (AdapterInfo.from_metadata(data.pop("info"), where) if "info" in data
                else _legacy_info(data.pop("meta")))
        return cls(**data, info=info)


def _legacy_info(meta: dict[str, Any]) -> AdapterInfo:
    """The info of a record that an earlier version committed (`meta` with label/rank and a parsed report)."""
    report = meta.get("extraction")
    return AdapterInfo(name=meta["label"], r=meta["rank"], lora_alpha=meta["lora_alpha"],
                       target_modules=tuple(meta["target_modules"]), base_fingerprint=meta["base_fingerprint"],
                       sr=meta["sr"], version=meta["version"], f0=meta["f0"],
                       extraction=None if report is None else json.dumps(report))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterStore:
    """Thread-safe: handlers list/resolve on the event loop, uploads commit from worker threads."""

    def __init__(self, root: Path, stale_after_s: float = STALE_AFTER_S) -> None:
        self.root = root
        self.objects, self.meta_dir = root / "objects", root / "meta"
        self.stale_after_s = stale_after_s
        self._tag = process_tag()
        self._lock = threading.Lock()
        self._by_id: dict[str, StoredAdapter] = {}
        self._by_name: dict[str, str] = {}
        self._listed: tuple[int, int] | None = None  # (inode, mtime_ns) of meta/ at its last complete listing
        self._order: list[StoredAdapter] | None = None  # listing order, rebuilt after a change
        self._leases: Counter[Path] = Counter()
        self._doomed: set[Path] = set()  # deleted while a job still reads them: unlinked on last release
        try:
            self.objects.mkdir(parents=True, exist_ok=True)
            self.meta_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"adapter store {root}: cannot create its folders: {exc.strerror}") from exc
        self._recover()

    # paths: built from validated hex ids and hashes only
    def adapter_path(self, rec: StoredAdapter) -> Path:
        return self.objects / f"{rec.id}.safetensors"

    def index_path(self, rec: StoredAdapter) -> Path | None:
        return None if rec.index_sha256 is None else self.objects / f"{rec.id}-{rec.index_sha256[:16]}.index"

    def _paths(self, rec: StoredAdapter) -> list[Path]:
        index = self.index_path(rec)
        return [self.adapter_path(rec)] + ([index] if index is not None else [])

    def _read_record(self, sidecar: Path) -> StoredAdapter | None:
        """A commit record, if it is readable and its adapter file is there; None (logged) otherwise."""
        try:
            rec = StoredAdapter.from_json(json.loads(sidecar.read_text()), sidecar.name)
        except FileNotFoundError:  # deleted meanwhile (by us or another process)
            return None
        except (OSError, ValueError, TypeError, KeyError, RVCLoraError) as exc:
            log.error("unreadable adapter record, ignored", extra={"file": sidecar.name, "error": str(exc)})
            return None
        if not ID_RE.fullmatch(rec.id) or sidecar.stem != rec.id or not self.adapter_path(rec).is_file():
            log.error("adapter record without its file, ignored", extra={"file": sidecar.name})
            return None
        return rec

    def _recover(self) -> None:
        for folder in (self.objects, self.meta_dir):
            sweep_temp_files(folder, f"*{PART_SUFFIX}", self.stale_after_s)
        for sidecar in sorted(self.meta_dir.glob("*.json")):
            rec = self._read_record(sidecar)
            if rec is not None:
                self._add(rec)
        live = {p for rec in self._by_id.values() for p in self._paths(rec)}
        now = time.time()
        for obj in self.objects.iterdir():
            # renamed into place but never committed: a crash mid-upload, or another process committing now
            if obj not in live and not obj.name.endswith(PART_SUFFIX) and sweepable(obj, "", self.stale_after_s, now):
                obj.unlink(missing_ok=True)
                log.warning("swept an uncommitted adapter file", extra={"file": obj.name})

    def _add(self, rec: StoredAdapter) -> None:
        """Index a record (caller holds the lock, or is the constructor). A name already held by another id
        (two processes committed it at once) stays with the first; the newcomer is reachable by id."""
        self._by_id[rec.id] = rec
        self._order = None
        if rec.name is not None:
            holder = self._by_name.setdefault(rec.name, rec.id)
            if holder != rec.id:
                log.warning("adapter name held twice on disk; kept the first",
                            extra={"adapter_name": rec.name, "adapter": rec.id, "holder": holder})

    def refresh(self) -> None:
        """Re-read the commit records from disk: adapters committed or deleted by other processes sharing this
        folder appear or disappear here. A `stat` of `meta/`; when it changed, a directory listing plus one read per
        record not yet known.

        Records are added and removed by renames and unlinks in `meta/`, each of which moves its mtime. An mtime
        seen at a listing is trusted afterwards only once it is `SETTLED_S` old: a change in the same clock tick
        as the listing would leave it as it was."""
        now = time.time_ns()  # before the stat: a change after it has a later mtime unless this one is fresh
        try:
            st = os.stat(self.meta_dir)
            seen = (st.st_ino, st.st_mtime_ns)
            if seen == self._listed:
                return
            on_disk = {e.name[: -len(".json")] for e in os.scandir(self.meta_dir) if e.name.endswith(".json")}
        except OSError as exc:
            log.error("cannot list the adapter records", extra={"error": str(exc)})
            return
        settled = now - st.st_mtime_ns > SETTLED_S * 1e9
        on_disk = {i for i in on_disk if ID_RE.fullmatch(i)}
        with self._lock:
            known = set(self._by_id)
        for adapter_id in sorted(on_disk - known):
            sidecar = self.meta_dir / f"{adapter_id}.json"
            rec = self._read_record(sidecar)
            with self._lock:
                if rec is not None and rec.id not in self._by_id and sidecar.exists():
                    self._add(rec)
        with self._lock:
            for adapter_id in known - on_disk:
                if adapter_id in self._by_id and not (self.meta_dir / f"{adapter_id}.json").exists():
                    self._forget(adapter_id)  # deleted by another process (committed here meanwhile: kept)
        self._listed = seen if settled else None

    def _forget(self, adapter_id: str) -> StoredAdapter | None:
        rec = self._by_id.pop(adapter_id, None)
        self._order = None
        if rec is not None and rec.name is not None and self._by_name.get(rec.name) == rec.id:
            del self._by_name[rec.name]
        return rec

    # reading
    def all(self) -> list[StoredAdapter]:
        return self.page(0, sys.maxsize)[0]

    def page(self, offset: int, limit: int, query: str | None = None) -> tuple[list[StoredAdapter], int]:
        """Records `offset` to `offset + limit` in upload order (oldest first), and how many there are. With
        `query`, only those whose name, id or label contains it (case-insensitive)."""
        self.refresh()
        with self._lock:
            if self._order is None:  # sorted once per change, not once per listing
                self._order = sorted(self._by_id.values(), key=lambda r: (r.created_at, r.id))
            found = self._order
        if query:
            needle = query.casefold()
            found = [r for r in found if needle in f"{r.name or ''}\n{r.id}\n{r.info.name}".casefold()]
        return found[offset:offset + limit], len(found)

    def resolve(self, ref: str) -> StoredAdapter:
        """An id (16 hex) or a name -> the stored adapter; AdapterNotFoundError otherwise. The disk has the last
        word: a miss re-reads the records (another process sharing the folder may have added it), and a hit
        checks that its record is still there (or deleted it)."""
        rec = self._lookup(ref)
        if rec is None or not (self.meta_dir / f"{rec.id}.json").exists():  # a stat: deleted by another process?
            self.refresh()
            rec = self._lookup(ref)
        if rec is None:
            raise AdapterNotFoundError(f"no adapter with id or name {ref[:64]!r}")
        return rec

    def holds(self, sha256: str) -> bool:
        """Whether these exact bytes are stored already (as far as this process knows)."""
        rec = self._lookup(sha256[:16])
        return rec is not None and rec.sha256 == sha256

    def _lookup(self, ref: str) -> StoredAdapter | None:
        with self._lock:
            adapter_id = ref if ID_RE.fullmatch(ref) else self._by_name.get(ref)
            return None if adapter_id is None else self._by_id.get(adapter_id)

    # writing
    def stage(self, src: Readable, limit: int, what: str) -> Staged:
        """Copy `src` to a temp file in `objects/`, hashing as it goes; over `limit` bytes -> 413."""
        digest = hashlib.sha256()
        path, size = capture_upload(src, self.objects, f".upload-{self._tag}-", limit, what, "store", digest=digest,
                                    sync=True)
        return Staged(path, digest.hexdigest(), size)

    @staticmethod
    def discard(*staged: Staged | None) -> None:
        for s in staged:
            if s is not None:
                s.path.unlink(missing_ok=True)

    def commit(self, adapter: Staged, index: Staged | None, name: str | None,
               info: AdapterInfo) -> tuple[StoredAdapter, bool]:
        """Make a staged upload permanent -> (record, created). Same bytes again -> the same record;
        a name held by other bytes, or the same adapter with another name or index -> 409."""
        if name is not None:
            check_name(name)
        adapter_id = adapter.sha256[:16]
        self.refresh()  # the same adapter or the name may have been committed by another process
        with self._lock:
            existing = self._by_id.get(adapter_id)
            if existing is not None:
                self._check_same(existing, adapter, index, name)
                return existing, False
            if name is not None and name in self._by_name:
                raise NameConflict(f"name {name!r} is taken by adapter {self._by_name[name]}")
            rec = StoredAdapter(id=adapter_id, name=name, sha256=adapter.sha256, size_bytes=adapter.size,
                                index_sha256=None if index is None else index.sha256,
                                index_bytes=None if index is None else index.size,
                                created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"), info=info)
            try:
                self._write(rec, adapter, index)
            except OSError as exc:
                for path in self._paths(rec):
                    path.unlink(missing_ok=True)
                raise StorageError(f"cannot store adapter {adapter_id}: {exc.strerror}") from exc
            self._doomed.difference_update(self._paths(rec))
            self._add(rec)
        log.info("adapter stored", extra={"adapter": rec.id, "size": rec.size_bytes})
        return rec, True

    def _check_same(self, existing: StoredAdapter, adapter: Staged, index: Staged | None, name: str | None) -> None:
        if existing.sha256 != adapter.sha256:
            raise NameConflict(f"id {existing.id} is taken by other bytes (sha256 prefix collision)")
        if name is not None and name != existing.name:
            held = "no name" if existing.name is None else f"the name {existing.name!r}"
            raise NameConflict(f"this adapter is already stored as {existing.id} with {held}; delete it first to "
                               "rename it")
        if index is not None and index.sha256 != existing.index_sha256:
            raise NameConflict(f"this adapter is already stored as {existing.id} with another index; delete it "
                               "first to replace the index")

    def _write(self, rec: StoredAdapter, adapter: Staged, index: Staged | None) -> None:
        os.replace(adapter.path, self.adapter_path(rec))
        index_path = self.index_path(rec)
        if index is not None and index_path is not None:
            os.replace(index.path, index_path)
        _fsync_dir(self.objects)
        self._write_record(rec)

    def _write_record(self, rec: StoredAdapter) -> None:
        fd, name = tempfile.mkstemp(dir=self.meta_dir, prefix=f".{rec.id}-{self._tag}-", suffix=PART_SUFFIX)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(rec.to_json(), out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(name, self.meta_dir / f"{rec.id}.json")  # the commit point
        finally:
            Path(name).unlink(missing_ok=True)
        _fsync_dir(self.meta_dir)

    def rename(self, adapter_id: str, name: str | None) -> StoredAdapter:
        """Give a stored adapter another name (None: no name), rewriting its commit record atomically; 409 when
        another adapter holds the name. Other processes sharing the folder keep the old name until they restart."""
        if name is not None:
            check_name(name)
        with self._lock:
            rec = self._by_id.get(adapter_id)
            if rec is None:
                raise AdapterNotFoundError(f"no adapter with id {adapter_id[:64]!r}")
            holder = None if name is None else self._by_name.get(name)
            if holder is not None and holder != adapter_id:
                raise NameConflict(f"name {name!r} is taken by adapter {holder}")
            if name == rec.name:
                return rec
            renamed = replace(rec, name=name)
            try:
                self._write_record(renamed)
            except OSError as exc:
                raise StorageError(f"cannot rename adapter {adapter_id}: {exc.strerror}") from exc
            self._forget(adapter_id)
            self._add(renamed)
        log.info("adapter renamed", extra={"adapter": adapter_id})
        return renamed

    def delete(self, adapter_id: str) -> StoredAdapter:
        """Forget an adapter now; jobs already holding it keep its files until they finish."""
        with self._lock:
            rec = self._forget(adapter_id)
            if rec is None:
                raise AdapterNotFoundError(f"no adapter with id {adapter_id[:64]!r}")
            (self.meta_dir / f"{rec.id}.json").unlink(missing_ok=True)
            for path in self._paths(rec):
                if self._leases[path]:
                    self._doomed.add(path)
                else:
                    path.unlink(missing_ok=True)
        log.info("adapter deleted", extra={"adapter": rec.id})
        return rec

    @contextlib.contextmanager
    def lease(self, rec: StoredAdapter | None) -> Iterator[None]:
        """Hold `rec`'s files for the duration of a job (a delete meanwhile defers their removal)."""
        if rec is None:
            yield
            return
        paths = self._paths(rec)
        with self._lock:
            self._leases.update(paths)
        try:
            yield
        finally:
            with self._lock:
                self._leases.subtract(paths)
                for path in paths:
                    if self._leases[path] <= 0:
                        del self._leases[path]
                        if path in self._doomed:
                            self._doomed.discard(path)
                            path.unlink(missing_ok=True)
