"""Voice zips on `POST /adapters`: the `.pth` inside is staged as the voice model to extract, the `.index`
inside is handed on as the adapter's index. The checks (zip bomb, path traversal, nested archives) are
`rvc_lora.voicezip`'s; the limits are the server's voice and index size limits."""

from __future__ import annotations

from contextlib import ExitStack

from rvc_lora.voicezip import ZipLimits, member_stream, open_voice_zip
from service.settings import Settings
from service.spool import Readable
from service.store import AdapterStore, Staged


def unpack_voice_upload(store: AdapterStore, settings: Settings, staged: Staged, label: str,
                        stack: ExitStack) -> tuple[Staged, Readable | None]:
    """A staged voice zip -> (its `.pth` staged as a voice model, a reader of its `.index` or None).

    The archive stays open until `stack` closes (the index is read from it later, by the ingest). Raises
    `VoicePackageError` (422) or `VoicePackageTooLarge` (413); a member larger than the voice or index
    limit is 413 as any upload is."""
    limits = ZipLimits(max_total_bytes=settings.max_voice_bytes + settings.max_index_bytes)
    package, zf = stack.enter_context(open_voice_zip(staged.path, limits, label=label))
    model = store.stage(member_stream(zf, package.model, limits, label=label), settings.max_voice_bytes,
                        f"voice model in {label}")
    index = None if package.index is None else member_stream(zf, package.index, limits, label=label)
    return model, index
