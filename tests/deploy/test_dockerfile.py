"""deploy/docker/Dockerfile: hadolint-clean, multi-stage, non-root, one image whose entrypoint
is the project's CLI, a health check that really tells a live API from a dead one, and a
build context that contains what the COPY lines need."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from broker.cli import _parser
from broker.embedded_redis import free_port

from .tooling import DEPLOY, ROOT, hadolint

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    ins = _instructions()
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def test_hadolint_passes() -> None:
    done = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr


def test_hadolint_is_live(tmp_path: Path) -> None:
    """The linter really lints: a Dockerfile with textbook mistakes is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n")
    done = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3013"):
        assert rule in done.stdout


def test_multi_stage_non_root_one_entrypoint() -> None:
    ins = _instructions()
    stages = [rest for word, rest in ins if word == "FROM"]
    assert len(stages) >= 2 and all(" AS " in s.upper() for s in stages), stages
    assert all("slim" in s for s in stages), "slim python bases only"
    final = _final_stage()
    assert any(w == "COPY" and r.startswith("--from=build") for w, r in final), "runtime copies the venv from build"
    assert not any(w == "RUN" and "pip install" in r for w, r in final), "no installs in the runtime stage"
    users = [r for w, r in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    entry = [r for w, r in final if w == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["session-broker"]
    cmd = json.loads([r for w, r in final if w == "CMD"][-1])
    args = _parser().parse_args(cmd)
    assert args.command == "api" and args.host == "0.0.0.0" and args.port == 8000
    assert any(w == "HEALTHCHECK" for w, _ in final)


def _healthcheck_cmd() -> list[str]:
    rest = next(r for w, r in _final_stage() if w == "HEALTHCHECK")
    exec_form = rest[rest.index("CMD") + len("CMD"):].strip()
    cmd: list[str] = json.loads(exec_form)
    assert cmd[0] == "python"
    return [sys.executable, *cmd[1:]]


def test_healthcheck_tells_live_from_dead(api) -> None:
    """The image's HEALTHCHECK command succeeds against a live API's /healthz and fails
    against a port where nothing answers (HEALTHCHECK_PORT selects the API or a worker)."""
    cmd = _healthcheck_cmd()
    env = {**os.environ, "HEALTHCHECK_PORT": str(api.port)}
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=30, check=False).returncode == 0
    env["HEALTHCHECK_PORT"] = str(free_port())
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=30, check=False).returncode != 0


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; ``!`` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes):
            ignored = not negate
    return ignored


def test_build_context_holds_every_copied_path() -> None:
    """Every COPY source exists at the repository root (the build context) and survives the
    Dockerfile's .dockerignore; what the image must not carry (tests, .git, venv) is excluded."""
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = []
    for word, rest in _instructions():
        if word == "COPY" and not rest.startswith("--from"):
            sources.extend(rest.split()[:-1])
    assert sources, "the build stage copies the project"
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not _ignored(src, patterns), f"{src} is excluded by {DOCKERIGNORE.name}"
    for src in ("tests/conftest.py", ".git/HEAD", ".venv/bin/python", "broker/__pycache__/cli.cpython-311.pyc"):
        assert _ignored(src, patterns), f"{src} would be sent to the daemon"
    # the package's code and Lua scripts are under the copied directories
    assert {"broker", "workers", "tenants"} <= {s.rstrip("/") for s in sources}
