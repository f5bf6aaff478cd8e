"""Adding an adapter: stage the bytes beside the store, validate them against the resident base, commit.

Runs in a worker thread (file copies, hashing, safetensors parsing); used by `POST /adapters` and by
the seed adapters added at start. Nothing reaches the store unless every check passed.
"""

from __future__ import annotations

from typing import BinaryIO

from rvc_lora.errors import AdapterError, RVCLoraError
from service.engine import Engine
from service.errors import relabel
from service.settings import Settings
from service.store import AdapterStore, Staged, StoredAdapter, check_name


def ingest_adapter(store: AdapterStore, engine: Engine, settings: Settings, adapter: BinaryIO,
                   index: BinaryIO | None, name: str | None) -> tuple[StoredAdapter, bool]:
    """-> (record, created). 413 past a size limit, 422 for an adapter or index that does not fit the base,
    409 for a name conflict, 507 when the disk refuses the write."""
    if name is not None:
        check_name(name)
    staged: Staged | None = None
    staged_index: Staged | None = None
    try:
        staged = store.stage(adapter, settings.max_adapter_bytes, "adapter file")
        try:
            meta = engine.describe_adapter(staged.path)
        except RVCLoraError as exc:
            raise relabel(exc, staged.path, "adapter file") from exc
        if meta.rank > settings.max_rank:
            raise AdapterError(f"adapter file: rank {meta.rank} exceeds this server's maximum rank {settings.max_rank}")
        if index is not None:
            staged_index = store.stage(index, settings.max_index_bytes, "index file")
            try:
                engine.check_index(staged_index.path)
            except RVCLoraError as exc:
                raise relabel(exc, staged_index.path, "index file") from exc
        return store.commit(staged, staged_index, name, meta)
    finally:
        store.discard(staged, staged_index)  # committed files were renamed away: this removes leftovers only
