"""The application factory, and `serve()` behind `rvc-lora serve`.

`create_app(settings)` builds a fresh app; its lifespan owns the adapter store and the device worker.
Models load on the device thread after startup, so `/healthz` answers at once and `/readyz` turns 200
when the models are loaded and warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException

from rvc_lora.errors import RVCLoraError
from service import handlers, streams
from service.auth import BearerAuth
from service.connections import ConnectionLimit, Connections, protocol_class
from service.console import mount_console
from service.docs import install_docs
from service.engine import Engine
from service.extraction import Extractor
from service.ingest import ingest_adapter
from service.logs import configure_logging
from service.media import SPOOL_PREFIX
from service.metrics import Metrics
from service.middleware import BodyLimit, RequestContext
from service.routes import api_router
from service.rvc_engine import load_engine
from service.settings import Settings
from service.spool import sweep_temp_files
from service.store import AdapterStore
from service.worker import Worker

log = logging.getLogger(__name__)

FORM_SLACK = 64 * 1024  # multipart boundaries and the small form fields around a file

DESCRIPTION = """One resident RVC base synthesizer, many voices as LoRA adapters swapped in place per request.

Errors are `{"error": {"code", "message"}}` with a stable `code`. Every response carries `X-Request-Id`.
When `RVC_LORA_API_KEY` is set, every route except `/healthz`, `/readyz` and `/metrics` needs
`Authorization: Bearer <key>`. `GET /` is a web console (static files under `/console/`), a client of this API."""


def body_limits(settings: Settings) -> Callable[[str, str], int]:
    uploads = {"/convert": settings.max_audio_bytes, "/infer": settings.max_features_bytes,
               "/adapters": max(settings.max_adapter_bytes, settings.max_voice_bytes) + settings.max_index_bytes}

    def limit_for(method: str, path: str) -> int:
        return FORM_SLACK + (uploads.get(path, 0) if method == "POST" else 0)

    return limit_for


async def _seed_adapters(app: FastAPI, settings: Settings, store: AdapterStore, worker: Worker) -> None:
    """Add the configured seed adapters (e.g. the demo voices) once the base model is loaded."""
    try:
        engine = await worker.wait_loaded()
        if engine is None:
            return
        for name, path in settings.seed_adapters.items():
            index = settings.seed_indexes.get(name)
            try:
                with path.open("rb") as src, (index.open("rb") if index else contextlib.nullcontext()) as idx:
                    rec, created = await anyio.to_thread.run_sync(ingest_adapter, store, engine, settings, src, idx,
                                                                  name, worker.check_output)
                log.info("seed adapter ready", extra={"adapter_name": name, "adapter": rec.id, "new": created})
            except (OSError, RVCLoraError) as exc:
                log.error("seed adapter refused", extra={"adapter_name": name, "error": str(exc)})
            except Exception:
                log.exception("seed adapter failed", extra={"adapter_name": name})
    finally:
        app.state.seeded.set()


def create_app(settings: Settings | None = None, *,
               engine_factory: Callable[[Settings], Engine] = load_engine) -> FastAPI:
    """A new app. `engine_factory` runs on the device thread at startup (tests pass fakes)."""
    settings = settings or Settings()
    metrics = Metrics()
    connections = Connections(settings.max_connections, settings.header_timeout_s, metrics,
                              settings.send_idle_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        system_temp = tempfile.tempdir
        if settings.work_dir is not None:
            settings.work_dir.mkdir(parents=True, exist_ok=True)
            # the form parser spools file parts past 1 MB to a nameless temp file in the default folder: make
            # that the work dir, so uploads fill the disk the operator chose (and a full one is a 507)
            tempfile.tempdir = str(settings.work_dir)
        sweep_temp_files(settings.work_dir or Path(tempfile.gettempdir()), f"{SPOOL_PREFIX}*.part",
                         settings.stale_upload_s)
        store = AdapterStore(settings.adapter_dir, settings.stale_upload_s)  # sweeps what a crash left behind
        worker = Worker(settings, store, metrics, engine_factory)
        extractor = Extractor(settings.max_waiting_extractions)
        app.state.store, app.state.worker, app.state.seeded = store, worker, asyncio.Event()
        app.state.extractor = extractor
        app.state.decoding = anyio.CapacityLimiter(settings.max_decoding)
        worker.start()
        seeding = asyncio.create_task(_seed_adapters(app, settings, store, worker))
        try:
            yield
        finally:
            seeding.cancel()
            extractor.stop()
            await worker.stop()
            tempfile.tempdir = system_temp

    app = FastAPI(title="rvc-lora", version="0.1.0", description=DESCRIPTION, lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.settings, app.state.metrics, app.state.connections = settings, metrics, connections
    app.include_router(api_router)
    install_docs(app)  # /docs and /redoc with their assets served here: no CDN
    streams.register(app)
    mount_console(app)
    app.add_exception_handler(RVCLoraError, handlers.rvc_error)
    app.add_exception_handler(RequestValidationError, handlers.validation_error)
    app.add_exception_handler(HTTPException, handlers.http_error)
    app.add_exception_handler(Exception, handlers.unexpected_error)
    # added innermost first: RequestContext -> connection limit -> CORS -> auth -> body limit -> routes
    app.add_middleware(BodyLimit, limit_for=body_limits(settings), idle_timeout_s=settings.upload_idle_timeout_s,
                       total_timeout_s=settings.upload_timeout_s)
    if settings.api_key is not None:
        app.add_middleware(BearerAuth, api_key=settings.api_key.get_secret_value())
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "PATCH", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id", "Server-Timing", "X-Adapter", "X-Adapter-Cache"])
    app.add_middleware(ConnectionLimit, connections=connections, metrics=metrics)
    app.add_middleware(RequestContext, metrics=metrics)
    return app


class _DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT the worker stops intake first (new jobs: 503), then uvicorn shuts down gracefully:
    running requests finish within `timeout_graceful_shutdown`, then the lifespan stops the worker."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        worker: Worker | None = getattr(self._app.state, "worker", None)
        if worker is not None:
            worker.request_drain()
        super().handle_exit(sig, frame)


def run_server(app: FastAPI, host: str, port: int, grace_s: float) -> None:
    """Serve `app` with uvicorn in this process until SIGTERM/SIGINT; exits within `grace_s` of it. The
    connection limits and the request-head timeout are the app's (`service.connections`)."""
    config = uvicorn.Config(app, host=host, port=port, lifespan="on", log_config=None, access_log=False,
                            timeout_graceful_shutdown=max(1, math.floor(grace_s)), server_header=False,
                            http=protocol_class(app.state.connections))
    _DrainingServer(config, app).run()


def demo_overrides(demo_dir: Path) -> dict[str, Any]:
    """Settings for the demo: its generated base, content encoder and voices (made on first start)."""
    from rvc_lora.demo import ensure_demo_assets

    manifest = ensure_demo_assets(demo_dir)

    def where(p: str | os.PathLike[str]) -> Path:
        path = Path(p)
        return path if path.is_absolute() else demo_dir / path

    return {"model": where(manifest["model"]), "hubert": where(manifest["hubert"]),
            "adapter_dir": demo_dir / "store",
            "seed_adapters": {name: where(file) for name, file in manifest["adapters"].items()},
            "seed_indexes": {name: where(file) for name, file in manifest.get("indexes", {}).items()}}


def serve_settings(host: str | None, port: int | None, demo: bool, settings_overrides: Mapping[str, Any] | None,
                   demo_dir: Path) -> Settings:
    """`serve`'s settings: `host`/`port`, then `settings_overrides`, then the environment, then (with `demo`) the
    demo's models and store, then the defaults. The environment beats the demo: `RVC_LORA_ADAPTER_DIR` moves the
    demo's store too."""
    overrides: dict[str, Any] = {}
    if demo:
        from_env = Settings().model_fields_set
        overrides = {k: v for k, v in demo_overrides(demo_dir).items() if k not in from_env}
    overrides.update(settings_overrides or {})
    overrides.update({k: v for k, v in (("host", host), ("port", port)) if v is not None})
    return Settings(**overrides)


def serve(host: str | None = None, port: int | None = None, demo: bool = False,
          settings_overrides: Mapping[str, Any] | None = None, *, demo_dir: Path = Path("demo-assets")) -> None:
    """`rvc-lora serve`: one process, one device worker, until SIGTERM. Settings come from the environment
    (`RVC_LORA_*`), then `settings_overrides`, then `host`/`port`. `demo` serves the demo assets of
    `demo_dir` (generated on first start, as `rvc-lora demo` does) unless overrides name other models."""
    settings = serve_settings(host, port, demo, settings_overrides, demo_dir)
    configure_logging(settings.log_level)
    log.info("starting", extra={"host": settings.host, "port": settings.port, "device": settings.device,
                                "demo": demo, "auth": settings.api_key is not None})
    run_server(create_app(settings), settings.host, settings.port, settings.shutdown_grace_s)
