"""The console's tests: its HTTP side (sign-in, cookie, CSRF) with httpx, its pages in Debian's
Chromium driven by Playwright (pytest-playwright's ``page`` fixture), both against the real API,
worker and sandbox of tests/fixtures/stack.py.

``playwright install`` cannot download browsers here: ``.ci/run`` installs Debian's ``chromium``
and these tests launch it by path. Without it the browser tests are skipped, with the reason,
except in CI (``CI=true``), where a missing browser fails them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserType, Playwright, sync_playwright

from tests.fixtures.stack import Admin, ApiServer, WorkerThread

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / ".artifacts" / "console"  # git-ignored


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    """pytest-playwright's launch arguments, pointed at Debian's chromium (skip or fail without it)."""
    if not os.access(CHROMIUM, os.X_OK):
        reason = f"{CHROMIUM} is missing (apt-get install chromium): the console's browser tests need it"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": CHROMIUM_ARGS, "headless": True}


# pytest-playwright keeps one Playwright and one browser for the whole pytest session. Its sync
# API runs an asyncio loop in the main thread for as long as Playwright lives, so every asyncio
# test collected after these ones found "a running event loop" and failed. Here they live for
# the tests/console package only (same fixtures, narrower scope).
@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    pw = sync_playwright().start()
    yield pw
    pw.stop()


@pytest.fixture(scope="package")
def browser_type(playwright: Playwright, browser_name: str) -> BrowserType:
    return getattr(playwright, browser_name)  # type: ignore[no-any-return]


@pytest.fixture(scope="package")
def launch_browser(browser_type_launch_args: dict[str, Any], browser_type: BrowserType) -> Callable[..., Browser]:
    def launch(**kwargs: Any) -> Browser:
        return browser_type.launch(**{**browser_type_launch_args, **kwargs})

    return launch


@pytest.fixture(scope="package")
def browser(launch_browser: Callable[..., Browser]) -> Iterator[Browser]:
    instance = launch_browser()
    yield instance
    instance.close()


@pytest.fixture(scope="package")
def browser_context_args() -> dict[str, Any]:
    """Every context as Chromium makes it. (The plugin's version reads ``playwright`` too, and
    ``base_url``, whose fallback fixture pytest 9 warns about: these tests pass whole URLs.)"""
    return {}


@pytest.fixture
def stack(
    api: ApiServer, worker: WorkerThread, admin: Admin, request: pytest.FixtureRequest
) -> Iterator[tuple[ApiServer, Admin]]:
    """API + worker + sandbox upstreams on free loopback ports, and the admin client.

    At the end, before the API stops, the test's page leaves the console: a session page holds
    an event stream open, and uvicorn's shutdown waits for open responses (the fixture's server
    has no graceful timeout), so the API would never reach its lifespan's end and its Redis
    subscription would outlive it (a later test counting subscriptions would see two)."""
    yield api, admin
    if "page" in request.fixturenames:
        request.getfixturevalue("page").goto("about:blank")


def screenshot(page: Any, name: str) -> Path:
    """A full-page PNG of what the page shows, in .artifacts/console/ (not committed)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
