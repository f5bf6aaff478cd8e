"""The web console in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright for Python)
against real servers on 127.0.0.1 (`tests/console_server.py`: the real engine on tiny assets made by code).

Checked: the page loads with no failed request and no console error; a conversion through the page plays audio
of the input's length; the f0 plot has points; uploads, renames and deletes through the page change
`GET /adapters`, and a voice model's extraction report shows after the upload and in its details; a microphone
take (Chromium's fake device) becomes the input, and streams live through `WebSocket /stream` with the default
stream buffer; the dark theme keeps text legible (WCAG AA contrast); a wrong key shows an error; the page fits a
phone's width. A screenshot of each view goes to `test-artifacts/console/` (git-ignored).
Select these with `-m browser`; they skip, saying why, only where no Chromium is installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from rvc_lora.pipeline.params import BOUNDS
from tests.console_server import INPUT_S, write_assets

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "console"
CHROMIUM = os.environ.get("RVC_LORA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "console-browser-key"
WAIT_MS = 30_000

if CHROMIUM is None:
    pytest.skip("no Chromium found (Debian: apt-get install -y chromium; .ci/run installs it; or set "
                "RVC_LORA_CHROMIUM to a Chromium binary)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra: pip install -e '.[dev]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    url: str
    key: str | None
    log: Path

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def names(self) -> set[str | None]:
        return {a["name"] for a in self.api("GET", "/adapters").json()["adapters"]}


@contextmanager
def serve(assets: Path, state: Path, key: str | None = None, fake: bool = False) -> Iterator[Server]:
    """`tests/console_server.py` in a child process until ready; killed at the end whatever happened."""
    port = _free_port()
    state.mkdir(parents=True, exist_ok=True)
    log_path = state / "server.log"
    args = [sys.executable, str(ROOT / "tests" / "console_server.py"), str(assets), str(state), str(port)]
    with log_path.open("ab") as log:
        options = [*(["--key", key] if key else []), *(["--fake-engine"] if fake else [])]
        proc = subprocess.Popen([*args, *options], cwd=ROOT, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("the console server did not become ready within 120 s")
        yield Server(url, key, log_path)
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_assets(tmp_path_factory.mktemp("console-assets"))


@pytest.fixture(scope="module")
def server(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(assets["model"].parent, tmp_path_factory.mktemp("console-open")) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--autoplay-policy=no-user-gesture-required",  # the test plays results without a real click
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",  # a microphone that beeps
        ])
        yield chromium
        chromium.close()


@dataclass
class Page:
    """A browser page and what went wrong on it: console errors, uncaught exceptions, failed requests."""

    page: Any
    errors: list[str] = field(default_factory=list)

    def clean(self, *allowed: str) -> list[str]:
        return [e for e in self.errors if not any(a in e for a in allowed)]

    def view(self, name: str) -> None:
        self.page.click(f"nav a[href='#{name}']")
        self.page.wait_for_selector(f"#view-{name}:not([hidden])")

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.evaluate("document.getElementById('toast').classList.remove('shown')")
        self.page.wait_for_timeout(300)  # the toast slides away, the plots settle
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@contextmanager
def open_page(browser: Any, server: Server, width: int = 1280, height: int = 900,
              wait_ready: bool = True, color_scheme: str = "light") -> Iterator[Page]:
    context = browser.new_context(viewport={"width": width, "height": height}, color_scheme=color_scheme,
                                  permissions=["microphone"], base_url=server.url)
    page = context.new_page()
    out = Page(page)
    page.on("console", lambda m: m.type == "error" and out.errors.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: out.errors.append(f"exception: {e}"))
    page.on("requestfailed", lambda r: out.errors.append(f"request failed: {r.url} {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and out.errors.append(f"HTTP {r.status}: {r.url}"))
    page.set_default_timeout(WAIT_MS)
    try:
        page.goto("/")
        if wait_ready:
            page.wait_for_selector("body[data-ready=true]")
        yield out
    finally:
        context.close()


def test_convert_listen_and_look(browser: Any, server: Server, assets: dict[str, Path]) -> None:
    with open_page(browser, server) as p:
        page = p.page
        assert page.locator("#voice-list option").all_inner_texts()[0].startswith("Base voice")
        assert page.locator("#voice-list option", has_text="demo-voice-a").count() == 1
        # the parameters come from the API's own schema: names, bounds and defaults
        assert page.get_attribute("#param-f0_up_key", "min") == str(BOUNDS["f0_up_key"].lo)
        assert page.input_value("#param-protect") == "0.33"
        model = server.api("GET", "/model").json()
        methods = page.locator("#param-f0_method option").all_inner_texts()
        assert methods == [f"default ({model['default_f0_method']})", *model["f0_methods"]]
        p.shot("convert-empty")

        page.set_input_files("#audio-file", str(assets["input"]))
        page.wait_for_selector("#input-info:has-text('1.50 s')")
        page.select_option("#voice-list", label=page.locator("#voice-list option", has_text="demo-voice-a")
                           .inner_text())
        page.fill("#param-f0_up_key", "4")
        page.click("#convert-btn")
        first = page.wait_for_selector("#results .result audio")
        assert page.inner_text("#results .result h3") == "#1 · demo-voice-a"
        # played through to the end: the output lasts as long as the input
        duration = page.evaluate("""async (a) => {
            if (!Number.isFinite(a.duration)) await new Promise((r) => a.addEventListener('loadedmetadata', r));
            const ended = new Promise((r) => a.addEventListener('ended', r, { once: true }));
            await a.play();
            await ended;
            return [a.duration, Number(a.dataset.duration), a.currentTime];
        }""", first)
        assert duration[0] == pytest.approx(INPUT_S, abs=0.05)
        assert duration[0] == pytest.approx(duration[1], abs=0.01)
        assert duration[2] == pytest.approx(duration[0], abs=0.01)

        page.fill("#param-f0_up_key", "-5")  # again, other settings: the two results side by side
        page.select_option("#param-f0_method", "pm")
        page.select_option("#voice-list", "")
        page.click("#convert-btn")
        page.wait_for_selector("#results .result:nth-child(2)")
        assert page.inner_text("#results .result h3 >> nth=0") == "#2 · base voice"
        boxes = [page.locator("#results .result").nth(i).bounding_box() for i in (0, 1)]
        assert boxes[0]["y"] == boxes[1]["y"] and boxes[0]["x"] < boxes[1]["x"]
        download = page.locator("#results .result >> nth=0").locator("a[download]")
        assert download.get_attribute("download").endswith("-base_voice-2.wav")
        p.shot("convert")

        page.click("#results .result >> nth=1 >> text=Look")
        page.wait_for_selector("#view-look:not([hidden]) #plot-f0[data-points] canvas")
        points = int(page.get_attribute("#plot-f0", "data-points"))
        assert 0 < points <= INPUT_S * 100
        assert page.locator("#plot-in canvas").count() == page.locator("#plot-out canvas").count() == 1
        assert "f0_up_key +4" in page.inner_text("#f0-summary")
        page.check("input[name=f0-unit][value=note]")
        page.wait_for_selector("#plot-f0[data-unit=note] canvas")
        p.shot("look")
        assert p.clean() == []


def test_microphone_take_becomes_the_input(browser: Any, server: Server) -> None:
    with open_page(browser, server) as p:
        page = p.page
        page.check("input[name=source][value=mic]")
        page.click("#record-btn")
        page.wait_for_selector("#record-btn[aria-pressed=true]")
        page.wait_for_timeout(1200)
        page.click("#record-btn")
        page.wait_for_selector("#input-info:has-text('recording-')")
        seconds = float(page.inner_text("#input-info").split(": ")[1].split(" ")[0])
        assert 0.8 < seconds < 3.0
        page.click("#convert-btn")
        page.wait_for_selector("#results .result audio")
        assert p.clean() == []


def test_voices_upload_rename_delete(browser: Any, server: Server, assets: dict[str, Path], tmp_path: Path) -> None:
    with open_page(browser, server) as p:
        page = p.page
        p.view("voices")
        page.wait_for_selector("#voices-rows tr[data-id]")
        page.set_input_files("#upload-file", str(assets["extra"]))
        page.fill("#upload-name", "extra")
        page.click("#upload-form button[type=submit]")
        page.wait_for_selector("#upload-status:has-text('Stored: extra')")
        assert "extra" in server.names()
        row = page.wait_for_selector("#voices-rows tr:has(th:has-text('extra'))")

        row.query_selector("button:has-text('Rename')").click()
        page.fill("#rename-input", "extra-renamed")
        page.click("#rename-dialog button[type=submit]")
        page.wait_for_selector("#voices-rows th:has-text('extra-renamed')")
        assert "extra-renamed" in server.names() and "extra" not in server.names()

        page.fill("#voices-search", "renamed")
        page.wait_for_selector("#voices-info:has-text('1–1 of 1')")
        page.click("#voices-rows button:has-text('Details')")
        page.wait_for_selector("#details-dialog[open]")
        assert page.inner_text("#details-title") == "extra-renamed"
        assert "base fingerprint" in page.inner_text("#details-body")  # from GET /adapters/{id}
        page.click("#details-dialog [data-close]")

        page.click("#voices-rows button:has-text('Delete')")
        page.click("#delete-dialog button[type=submit]")
        page.wait_for_selector("#voices-info:has-text('no voice matches')")
        assert "extra-renamed" not in server.names()
        page.fill("#voices-search", "")

        # a full voice model: extracted on the server, its report shown when done ...
        page.set_input_files("#upload-file", str(assets["voice"]))
        page.fill("#upload-name", "full-voice")
        page.click("#upload-form button[type=submit]")
        report = page.wait_for_selector("#upload-result .report").inner_text()
        stored = server.api("GET", "/adapters/full-voice").json()["extraction"]
        assert f"{stored['snr_db']:.1f} dB" in report and "Layers that fit worst" in report
        assert stored["worst_layers"][0]["name"] in report and "time" in report
        assert page.locator("#upload-result .worst-layers tbody tr").count() == len(stored["worst_layers"]) > 0
        p.shot("voices")
        # ... and in the voice's details, read back from GET /adapters/{id}
        page.fill("#voices-search", "full-voice")
        page.wait_for_selector("#voices-info:has-text('1–1 of 1')")
        page.click("#voices-rows button:has-text('Details')")
        details = page.wait_for_selector("#details-dialog[open] .report").inner_text()
        assert f"{stored['snr_db']:.1f} dB" in details and stored["worst_layers"][-1]["name"] in details
        assert "\ntime" not in details  # the stored report keeps the fit, not the run's timings
        p.shot("voice-details")
        page.click("#details-dialog [data-close]")

        # the same voice as a zip (how voices circulate): extracted the same way, its report shown
        package = tmp_path / "full-voice.zip"
        with zipfile.ZipFile(package, "w") as zf:
            zf.write(assets["voice"], "Full Voice/Full Voice.pth")
        page.set_input_files("#upload-file", str(package))
        page.fill("#upload-name", "zipped-voice")
        page.click("#upload-form button[type=submit]")
        page.wait_for_selector("#upload-status:has-text('Stored: zipped-voice')")
        assert f"{stored['snr_db']:.1f} dB" in page.inner_text("#upload-result .report")
        assert p.clean() == []


def test_status_and_live_views(browser: Any, server: Server) -> None:
    with open_page(browser, server) as p:
        page = p.page
        p.view("status")
        page.wait_for_selector("#status-tiles .tile")
        assert page.inner_text("#status-tiles .tile >> nth=0").split("\n")[1] == "ready"
        assert "cpu" in page.inner_text("#status-tiles")
        assert "pm" in page.inner_text("#status-model")
        p.shot("status")
        assert p.clean() == []


def test_live_streams_the_microphone(browser: Any, server: Server) -> None:
    with open_page(browser, server) as p:
        page = p.page
        page.select_option("#voice-list", label=page.locator("#voice-list option", has_text="demo-voice-a")
                           .inner_text())
        p.view("live")
        page.fill("#live-pitch", "3")
        page.click("#live-btn")
        page.wait_for_selector("#live-latency:has-text('ms')")
        deadline = time.monotonic() + WAIT_MS / 1000  # polled here: the page's CSP forbids wait_for_function's eval
        while int(page.get_attribute("#live-blocks", "data-blocks") or 0) < 3:
            assert time.monotonic() < deadline, page.inner_text("#view-live")
            page.wait_for_timeout(100)
        p.shot("live")
        page.click("#live-btn")
        page.wait_for_selector("#live-status:has-text('Stopped')")
        assert page.inner_text("#live-error") == ""  # the server kept the stream (default stream_buffer_s)
        assert p.clean() == []


def _luminance(css: str) -> float:
    """WCAG relative luminance of an `rgb(r, g, b)` / `rgba(...)` colour."""
    channels = [float(v) / 255 for v in css[css.index("(") + 1 : css.index(")")].split(",")[:3]]
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def test_dark_theme_follows_the_system_and_stays_legible(browser: Any, server: Server) -> None:
    with open_page(browser, server, color_scheme="dark") as p:
        page = p.page
        for view in ("convert", "voices", "status", "live"):
            p.view(view)
            # each text's colour and the first opaque background behind it (its own, a card's, the page's)
            colours = page.evaluate(r"""() => [...document.querySelectorAll('h2, label, p, dt, dd, th, td, button')]
                .filter((e) => e.offsetParent !== null && e.textContent.trim() && !e.disabled)
                .map((e) => {
                  const layers = [];  // backgrounds from the element outwards, up to the first opaque one
                  for (let b = e; b; b = b.parentElement) {
                    const c = getComputedStyle(b).backgroundColor.match(/[\d.]+/g).map(Number);
                    if (c.length === 3) c.push(1);
                    if (c[3] > 0) layers.push(c);
                    if (c[3] === 1) break;
                  }
                  let [r, g, bl] = layers.length ? layers.pop() : [255, 255, 255];
                  for (const [lr, lg, lb, a] of layers.reverse()) {
                    [r, g, bl] = [lr * a + r * (1 - a), lg * a + g * (1 - a), lb * a + bl * (1 - a)];
                  }
                  return [getComputedStyle(e).color, `rgb(${r}, ${g}, ${bl})`,
                          e.tagName + ' ' + e.textContent.trim().slice(0, 30)];
                })""")
            assert _luminance(page.evaluate("getComputedStyle(document.body).backgroundColor")) < 0.05, view  # dark
            assert colours, view
            for colour, behind, what in colours:
                ink, paper = _luminance(colour), _luminance(behind)
                contrast = (max(ink, paper) + 0.05) / (min(ink, paper) + 0.05)
                assert contrast >= 4.5, (view, what, colour, behind)  # WCAG AA for text
        p.shot("dark")
        assert p.clean() == []


def test_phone_width(browser: Any, server: Server) -> None:
    with open_page(browser, server, width=390, height=844) as p:
        page = p.page
        for view in ("convert", "voices", "status"):
            p.view(view)
            assert page.evaluate("document.documentElement.scrollWidth") <= 390, view
        p.view("convert")
        p.shot("convert-phone")
        assert p.clean() == []


def test_keyboard_reaches_the_views(browser: Any, server: Server) -> None:
    with open_page(browser, server) as p:
        page = p.page
        page.keyboard.press("Tab")  # the skip link first
        assert page.evaluate("document.activeElement.textContent") == "Skip to content"
        for _ in range(10):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.getAttribute('href')") == "#voices":
                break
        page.keyboard.press("Enter")
        page.wait_for_selector("#view-voices:not([hidden])")
        assert page.evaluate("document.activeElement.id") == "h-voices"
        unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, select')]
            .filter((e) => e.type !== 'hidden' && e.type !== 'radio' && !e.labels?.length
                     && !e.getAttribute('aria-label') && e.getAttribute('aria-hidden') !== 'true')
            .map((e) => e.id || e.outerHTML)""")
        assert unlabeled == []


def test_a_wrong_key_shows_an_error(browser: Any, assets: dict[str, Path],
                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    with serve(assets["model"].parent, tmp_path_factory.mktemp("console-keyed"), key=KEY, fake=True) as keyed, \
            open_page(browser, keyed, wait_ready=False) as p:
        page = p.page
        page.wait_for_selector("#key-dialog[open]")
        assert "needs an API key" in page.inner_text("#key-reason")
        page.fill("#key-input", "not-the-key")
        page.click("#key-dialog button[type=submit]")
        page.wait_for_selector("#key-reason.error:has-text('refused')")
        assert page.get_attribute("#key-input", "aria-invalid") == "true"
        page.fill("#key-input", KEY)
        page.click("#key-dialog button[type=submit]")
        page.wait_for_selector("body[data-ready=true]")
        assert page.evaluate("sessionStorage.length") == 1 and page.evaluate("localStorage.length") == 0
        assert page.evaluate("document.cookie") == ""
        assert page.locator("#voice-list option").count() == 1  # the base voice
        # only the two refusals before the right key, nothing else went wrong
        assert p.clean("401") == []
        assert len([e for e in p.errors if "HTTP 401" in e]) == 2
