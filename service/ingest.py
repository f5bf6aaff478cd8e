"""Adding an adapter: stage the bytes beside the store, validate them against the resident base, commit.

Runs in worker threads (file copies, hashing, safetensors parsing); used by `POST /adapters` and by the
seed adapters added at start. What an upload is gets decided by the structure of its first bytes, never by
the client's file name (`kind_of`): a zip or a pickle is a PyTorch `.pth` (a full RVC voice model, turned
into an adapter first by `service.extraction`), anything else is read as a safetensors adapter. Nothing
reaches the store unless every check passed.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from rvc_lora.errors import AdapterError, RVCLoraError
from service.engine import Engine
from service.errors import QueueFull, relabel
from service.schemas import Extraction
from service.settings import Settings
from service.spool import Readable
from service.store import AdapterStore, Staged, StoredAdapter, check_name

Kind = Literal["adapter", "voice"]
HEAD_BYTES = 9
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip container
PICKLE_PROTO, PICKLE_PROTOCOLS = 0x80, range(2, 6)  # a bare pickle (torch's legacy format): PROTO, version
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors format's own bound on its JSON header


PROBE_WAIT_S = 30.0  # an upload waits this long for an index probe slot, then gets 503


@functools.cache
def probe_slots(limit: int) -> threading.BoundedSemaphore:
    """This process's index probe slots (each probe is a child process that may take max_index_memory_bytes)."""
    return threading.BoundedSemaphore(limit)


def check_index(engine: Engine, settings: Settings, staged: Staged) -> None:
    """`engine.check_index` on a staged index, at most `max_index_probes` at once: 503 after `PROBE_WAIT_S`."""
    slots = probe_slots(settings.max_index_probes)
    if not slots.acquire(timeout=PROBE_WAIT_S):
        raise QueueFull(f"{settings.max_index_probes} uploaded indexes are being checked; retry in "
                        f"{PROBE_WAIT_S:g} s", retry_after=PROBE_WAIT_S)
    try:
        engine.check_index(staged.path)
    except RVCLoraError as exc:
        raise relabel(exc, staged.path, "index file") from exc
    finally:
        slots.release()


def check_report(report: Mapping[str, Any], size: int) -> None:
    """AdapterError (422) unless an adapter file's `extraction` metadata is an extraction report."""
    try:
        Extraction.of_stored(report, size)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"]))
        raise AdapterError(f"adapter file: metadata 'extraction' is not an extraction report ({where}: "
                           f"{err['msg']})") from exc


def kind_of(head: bytes) -> Kind:
    """An upload's kind from its first `HEAD_BYTES` bytes, by each format's structure, safetensors first: its
    header's length (8 bytes little endian, at most `MAX_SAFETENSORS_HEADER`) then the JSON header's `{`. Its
    first byte alone can be anything (0x80, a pickle's first byte, for a 640-byte header), so a leading 0x80
    means a pickle only with a protocol version after it, and no plausible safetensors header before."""
    if len(head) >= 9 and 2 <= int.from_bytes(head[:8], "little") <= MAX_SAFETENSORS_HEADER and head[8:9] == b"{":
        return "adapter"
    if head.startswith(ZIP_MAGIC) or (len(head) >= 2 and head[0] == PICKLE_PROTO and head[1] in PICKLE_PROTOCOLS):
        return "voice"
    return "adapter"  # refused as a safetensors file, with the reason


class _Rejoined:
    """`head` followed by the rest of `src`: the bytes read to sniff the kind are not lost."""

    def __init__(self, head: bytes, src: Readable) -> None:
        self._head, self._src = head, src

    def read(self, size: int = -1, /) -> bytes:
        if self._head:
            out = self._head if size < 0 or size >= len(self._head) else self._head[:size]
            self._head = self._head[len(out):]
            return out
        return self._src.read(size)


def stage_upload(store: AdapterStore, settings: Settings, src: Readable) -> tuple[Staged, Kind]:
    """Copy an upload beside the store under the size limit of its kind (413 past it) -> (staged, kind)."""
    head = src.read(HEAD_BYTES)
    kind = kind_of(head)
    limit, what = ((settings.max_voice_bytes, "voice model") if kind == "voice" else
                   (settings.max_adapter_bytes, "adapter file"))
    return store.stage(_Rejoined(head, src), limit, what), kind


def ingest_adapter(store: AdapterStore, engine: Engine, settings: Settings, adapter: Readable,
                   index: Readable | None, name: str | None,
                   check_output: Callable[[Path], None] | None = None) -> tuple[StoredAdapter, bool]:
    """Stage an adapter file (and its index) and add it: see `ingest_staged`."""
    if name is not None:
        check_name(name)
    return ingest_staged(store, engine, settings, store.stage(adapter, settings.max_adapter_bytes, "adapter file"),
                         index, name, check_output)


def ingest_staged(store: AdapterStore, engine: Engine, settings: Settings, staged: Staged, index: Readable | None,
                  name: str | None, check_output: Callable[[Path], None] | None = None) -> tuple[StoredAdapter, bool]:
    """Validate a staged adapter file against the base (`check_output`, the worker's, runs a short synthesis with
    it), stage and check its index, commit -> (record, created). 413 past a size limit, 422 for an adapter or
    index that does not fit the base or gives no finite output, 409 for a name conflict, 507 when the disk
    refuses the write. The staged files are gone afterwards unless committed."""
    staged_index: Staged | None = None
    try:
        try:
            info = engine.describe_adapter(staged.path)
        except RVCLoraError as exc:
            raise relabel(exc, staged.path, "adapter file") from exc
        if (report := info.report()) is not None:  # shown by GET /adapters/{id}: refused now if it cannot be
            check_report(report, staged.size)
        if info.r > settings.max_rank:
            raise AdapterError(f"adapter file: rank {info.r} exceeds this server's maximum rank {settings.max_rank}")
        if check_output is not None and not store.holds(staged.sha256):  # a re-upload costs no device time
            try:
                check_output(staged.path)
            except RVCLoraError as exc:
                raise relabel(exc, staged.path, "adapter file") from exc
        if index is not None:
            staged_index = store.stage(index, settings.max_index_bytes, "index file")
            check_index(engine, settings, staged_index)
        return store.commit(staged, staged_index, name, info)
    finally:
        store.discard(staged, staged_index)  # committed files were renamed away: this removes leftovers only
