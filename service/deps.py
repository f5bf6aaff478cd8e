"""Request-scoped access to what the lifespan built (`app.state`), as `Annotated` dependencies."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Annotated, TypeVar

import anyio
from fastapi import Depends, Request

from service.errors import DeadlineExceeded, InvalidRequest
from service.extraction import Extractor
from service.settings import Settings
from service.store import AdapterStore
from service.worker import Worker

T = TypeVar("T")


def _worker(request: Request) -> Worker:
    worker: Worker = request.app.state.worker
    return worker


def _store(request: Request) -> AdapterStore:
    store: AdapterStore = request.app.state.store
    return store


def _extractor(request: Request) -> Extractor:
    extractor: Extractor = request.app.state.extractor
    return extractor


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


WorkerDep = Annotated[Worker, Depends(_worker)]
StoreDep = Annotated[AdapterStore, Depends(_store)]
SettingsDep = Annotated[Settings, Depends(_settings)]
ExtractorDep = Annotated[Extractor, Depends(_extractor)]


async def decode_upload(request: Request, settings: Settings, decode: Callable[[], T]) -> T:
    """Run `decode` (an upload to arrays) in a thread, at most `max_decoding` at once: a few KB of FLAC can
    decode to hundreds of MB, so concurrency, not the upload size, bounds that memory. Waiting for a slot
    counts against the request's deadline (504 past it)."""
    remaining = deadline(request, settings) - asyncio.get_running_loop().time()
    try:
        with anyio.fail_after(max(remaining, 0.0)):
            return await anyio.to_thread.run_sync(decode, limiter=request.app.state.decoding)
    except TimeoutError as exc:
        raise DeadlineExceeded(f"the upload was not decoded within the deadline of {settings.request_timeout_s:g} s"
                               ) from exc


def request_id(request: Request) -> str:
    rid: str = request.state.request_id
    return rid


def deadline(request: Request, settings: Settings) -> float:
    """Event-loop time by which the result must be ready: arrival + the request timeout."""
    arrived: float = request.state.arrived
    return arrived + settings.request_timeout_s


async def disconnected(request: Request) -> None:
    """Completes when the client goes away. The body is fully read by then, so the next message on
    the raw channel is the disconnect (or the end of the response, when this watcher is cancelled)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def fields_once(request: Request) -> None:
    """422 when a form field is sent more than once, or sent empty: a second `audio` or `sid` part would
    otherwise be dropped without a word, and an empty one (`-F adapter=`) taken as absent, i.e. the default
    (the base voice). The form is the one FastAPI already parsed (Starlette caches it)."""
    form = await request.form()
    items = form.multi_items()
    repeated = [(key, n) for key, n in Counter(key for key, _ in items).items() if n > 1]
    if repeated:
        key, n = repeated[0]
        raise InvalidRequest(f"{key[:64]}: sent {n} times, each field may be sent once")
    empty = [key for key, value in items if isinstance(value, str) and not value]
    if empty:
        raise InvalidRequest(f"{empty[0][:64]}: sent empty; leave a field out to get its default")


SingleValuedForm = Depends(fields_once)
