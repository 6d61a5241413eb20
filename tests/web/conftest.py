"""Browser tests: the workbench and dashboard in Debian's Chromium, driven by Playwright, against a real
uvicorn serving the tiny model of tests/api on loopback. Each page saves screenshots as artifacts
(test-artifacts/screenshots/), and a test fails on any console error it did not expect.

Chromium is Debian's (`make test` installs it); Playwright never downloads a browser. Where it is
missing the browser tests are skipped, except in CI, where a missing install step must fail the run."""

from __future__ import annotations

import json
import os
from pathlib import Path
import re

import pytest

from mistral_serve.api.app import create_app
from mistral_serve.engine.async_engine import AsyncEngine
from mistral_serve.settings import Settings
from tests.api.conftest import (  # noqa: F401 (fixtures)
    MODEL_ID, api_db, api_key, engine, make_engine, pytest_generate_tests, serving, tiny_model,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"


class RecordChatBodies:
    """ASGI middleware that keeps the JSON body of every chat request: what the browser, and the code
    the API tab shows, really sent."""

    def __init__(self, app):
        self.app = app
        self.bodies: list = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
            return await self.app(scope, receive, send)
        chunks = []

        async def receive_and_record():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    try:
                        self.bodies.append(json.loads(b"".join(chunks)))
                    except ValueError:
                        self.bodies.append(b"".join(chunks))
            return message
        await self.app(scope, receive_and_record, send)


class WebServer:
    def __init__(self, url: str, recorder: RecordChatBodies):
        self.url = url
        self.recorder = recorder

    @property
    def chat_bodies(self) -> list:
        return self.recorder.bodies


@pytest.fixture(scope="module")
def web_server(engine, api_db, tmp_path_factory):
    recorder = RecordChatBodies(create_app(Settings(data_dir=tmp_path_factory.mktemp("data")), {MODEL_ID: AsyncEngine(engine)}, api_db))
    with serving(recorder) as url:
        yield WebServer(url, recorder)


@pytest.fixture(scope="module")
def browser():
    """Module-scoped: Playwright's sync API keeps an event loop running in this thread while it is open,
    which would break asyncio.run() in tests that come after it."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (Debian's chromium package; `make test` installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        if os.environ.get("CI"):
            pytest.fail(f"playwright is not installed: {error}", pytrace=False)
        pytest.skip(f"playwright is not installed: {error}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class PageWatch:
    """A page's console errors, uncaught exceptions and requests to other origins."""

    def __init__(self, page, origin: str):
        self.page = page
        self.origin = origin
        self.errors: list[str] = []
        self.foreign_requests: list[str] = []
        self.expected: list[re.Pattern] = []
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("request", self._on_request)

    def _on_request(self, request):
        if not (request.url.startswith(self.origin + "/") or request.url.startswith(("data:", "blob:"))):
            self.foreign_requests.append(request.url)

    def expect_error(self, pattern: str) -> None:
        """A console error this test provokes on purpose (a refused key logs the failed request)."""
        self.expected.append(re.compile(pattern))

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.expected)]


@pytest.fixture
def open_page(browser, web_server, request):
    """open_page(viewport=LAPTOP) → (page, watch): a fresh context (empty storage, clipboard allowed)
    on the workbench, its models loaded. After the test: no unexpected console error, nothing
    loaded from another origin."""
    contexts, watches = [], []

    def open_(viewport=LAPTOP, path="/"):
        context = browser.new_context(viewport=viewport, base_url=web_server.url)
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=web_server.url)
        contexts.append(context)
        page = context.new_page()
        watch = PageWatch(page, web_server.url)
        watches.append(watch)
        page.goto(path)
        page.wait_for_selector("body[data-ready=true]")
        return page, watch

    yield open_
    try:
        for watch in watches:
            assert not watch.unexpected_errors(), f"console errors: {watch.unexpected_errors()}"
            assert not watch.foreign_requests, f"requests to other origins: {watch.foreign_requests}"
    finally:
        for context in contexts:
            context.close()


def screenshot(page, name: str) -> Path:
    """Saves the whole page as test-artifacts/screenshots/<name>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
