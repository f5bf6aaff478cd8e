"""The web console: a static front-end (HTML, ES modules, CSS, vendored uPlot) served by the app itself.

`GET /` is the page; its files are under `/console/`. Both are open without the API key: they hold no data
and the page asks for the key itself, then calls the documented API with it like any other client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
PAGE_PATH, FILES_PREFIX = "/", "/console"
# everything the page loads comes from this app: no CDN, no inline script or style sheet
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def mount_console(app: FastAPI) -> None:
    """Serve the console at `/` and its files under `/console/` (neither is in the OpenAPI contract)."""

    @app.get(PAGE_PATH, include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount(FILES_PREFIX, StaticFiles(directory=STATIC), name="console")
