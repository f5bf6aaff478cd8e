"""/docs and /redoc render from assets the app serves itself: no URL in the pages points off the server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_service_engine import running_app


@pytest.mark.parametrize(("page", "assets"), [
    ("/docs", ["/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css", "/docs-assets/favicon.png"]),
    ("/redoc", ["/docs-assets/redoc.standalone.js", "/docs-assets/favicon.png"]),
])
def test_docs_pages_need_no_internet(tmp_path: Path, page: str, assets: list[str]) -> None:
    with running_app(tmp_path) as client:
        r = client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        html = r.text
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", html), "a page asset is loaded from another host"
        assert "fonts.googleapis" not in html
        referenced = set(re.findall(r"[\"'](/docs-assets/[^\"']+)[\"']", html))
        assert referenced == set(assets)
        for url in referenced:
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 1000, url
        assert "/openapi.json" in html and client.get("/openapi.json").status_code == 200


def test_swagger_oauth2_redirect_page(tmp_path: Path) -> None:
    with running_app(tmp_path) as client:
        r = client.get("/docs/oauth2-redirect")
    assert r.status_code == 200 and "oauth2" in r.text.lower()
