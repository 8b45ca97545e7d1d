"""Helpers of the observability tests: reading samples from a /metrics text or a registry,
polling, and finding the Prometheus binaries (skip locally, fail under CI, when missing)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.wait import wait_until

INSTALL_HINT = (
    "Prometheus and promtool are not installed: `sudo apt-get install -y prometheus` (Debian/Ubuntu; "
    "it brings both) or put the `prometheus` and `promtool` binaries of a release from "
    "https://prometheus.io/download/ on PATH"
)


def prometheus_binaries() -> tuple[str, str]:
    """Paths of ``prometheus`` and ``promtool``; skips when missing, fails when $CI is set."""
    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    if prom and tool:
        return prom, tool
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {INSTALL_HINT} (.ci/run installs them as root)")
    pytest.skip(INSTALL_HINT)


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def sample(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    for n, lab, value in samples(text):
        if n == name and lab == (labels or {}):
            return value
    return None


def scrape(url: str) -> str:
    r = httpx.get(url, timeout=5)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def wait_for(check: Callable[[], Any], timeout: float = 10, what: str = "condition") -> Any:
    return wait_until(check, timeout, what)
