"""`/docs` (Swagger UI) and `/redoc` served with their JavaScript and CSS from the app itself, so they render
without internet access (FastAPI's defaults load them from a CDN).

The assets are the pinned copies the `fastapi-offline` package ships (swagger-ui: Apache-2.0, redoc: MIT,
the package: MIT); only its static folder is used.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request

ASSETS_URL = "/docs-assets"
ASSETS_DIR = files("fastapi_offline") / "static"


def install_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Add the two documentation pages and their assets to `app` (created with `docs_url=None, redoc_url=None`)."""
    app.mount(ASSETS_URL, StaticFiles(directory=str(ASSETS_DIR)), name="docs-assets")
    oauth2_redirect = f"{docs_url}/oauth2-redirect"

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", ""))

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        base = root(request)
        return get_swagger_ui_html(openapi_url=f"{base}{app.openapi_url}", title=f"{app.title} - Swagger UI",
                                   oauth2_redirect_url=f"{base}{oauth2_redirect}",
                                   swagger_js_url=f"{base}{ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{base}{ASSETS_URL}/swagger-ui.css",
                                   swagger_favicon_url=f"{base}{ASSETS_URL}/favicon.png")

    @app.get(oauth2_redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        base = root(request)
        return get_redoc_html(openapi_url=f"{base}{app.openapi_url}", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{base}{ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{base}{ASSETS_URL}/favicon.png", with_google_fonts=False)
