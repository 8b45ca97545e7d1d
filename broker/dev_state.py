"""What ``session-broker dev`` keeps in its data directory (``.dev/``), besides Redis's AOF:

- ``lock``: held (``flock``) while an instance runs; it names that instance (pid, API URL), so
  a second ``dev`` on the same directory stops at once with one line saying which one runs;
- ``secret_key``, ``admin_token``: generated once, kept across starts (mode 0600);
- ``demo_key``: the demo tenant's API key, kept when it is made (0600), so that a restart can
  still call the tenant API for it (the key itself is shown once, in the first banner);
- ``demo_webhook``: the id and signing secret of the demo tenant's webhook endpoint (the
  sandbox's receiver), registered once and given to the receiver at every start (0600);
- ``env``: the ``BROKER_*`` settings of the running instance, for a shell
  (``set -a; . .dev/env; set +a``), written once it is ready and removed when it stops.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

ENV_VARIABLES = (
    "BROKER_REDIS_URL", "BROKER_SECRET_KEY", "BROKER_ADMIN_TOKEN", "BROKER_OPENAI_BASE_URL",
    "BROKER_AVATURN_BASE_URL", "BROKER_OPENAI_API_KEY", "BROKER_AVATURN_API_KEY",
)


class DevLock:
    """One ``dev`` per data directory. The lock is the kernel's (``flock``): it goes with the
    process, so a runner that was killed leaves no stale lock behind."""

    def __init__(self, data: Path) -> None:
        self.path = data / "lock"
        self._file: IO[str] | None = None

    def acquire(self) -> str | None:
        """None once held; else what the file says about the instance holding it."""
        file = open(self.path, "a+")  # noqa: SIM115 - held for the life of the instance
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            return holder
        self._file = file
        self.describe(f"session-broker dev (pid {os.getpid()}, starting)")
        return None

    def describe(self, text: str) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            self._file.write(text + "\n")
            self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.seek(0)
                self._file.truncate()
            self._file.close()  # closing releases the flock
            self._file = None


def kept_secret(path: Path, make: Callable[[], str]) -> str:
    """The value stored at ``path``, or a new one from ``make`` stored there (0600)."""
    if path.exists():
        return path.read_text().strip()
    value = str(make())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value)
    return value


def keep_secret(path: Path, value: str, *, replace: bool = True) -> None:
    """Store ``value`` at ``path`` (0600), written whole then renamed into place."""
    if path.exists() and not replace:
        return
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value)
    os.replace(tmp, path)


def kept_json(path: Path) -> dict[str, object]:
    """The JSON object stored at ``path``; ``{}`` when there is none or it is not one."""
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_env(path: Path, env: Mapping[str, str], api: str, pid: int) -> None:
    """``path`` (0600, written whole then renamed into place): the instance's settings, in a
    form that both a POSIX shell (``set -a; . FILE; set +a``) and ``docker --env-file``-style
    readers take for simple values."""
    lines = [
        f"# session-broker dev (pid {pid}): the settings of the running instance; removed when it stops.",
        f"# In a shell: set -a; . {path}; set +a    (then `session-broker tenants ...` reaches it)",
        *(f"{name}={shlex.quote(env[name])}" for name in ENV_VARIABLES if env.get(name)),
        f"SESSION_BROKER_API={shlex.quote(api)}",
    ]
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def remove_env(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
