"""The console's tests: its HTTP side (sign-in, cookie, CSRF) with httpx, its pages in Debian's
Chromium driven by Playwright (pytest-playwright's ``page`` fixture), both against the real API,
worker and sandbox of tests/fixtures/stack.py.

``playwright install`` cannot download browsers here: ``.ci/run`` installs Debian's ``chromium``
and these tests launch it by path. Without it the browser tests are skipped, with the reason,
except in CI (``CI=true``), where a missing browser fails them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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


@pytest.fixture(scope="session")
def base_url() -> None:
    """Replaces pytest-playwright 0.10's fallback ``base_url`` fixture, declared as a method of a
    plugin object, which pytest 9 warns about (an error under ``filterwarnings = error``).
    These tests pass whole URLs."""
    return None


@pytest.fixture
def stack(api: ApiServer, worker: WorkerThread, admin: Admin) -> Iterator[tuple[ApiServer, Admin]]:
    """API + worker + sandbox upstreams on free loopback ports, and the admin client."""
    yield api, admin


def screenshot(page: Any, name: str) -> Path:
    """A full-page PNG of what the page shows, in .artifacts/console/ (not committed)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
