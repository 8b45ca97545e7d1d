"""Child processes of ours (the dev runner's Redis and sandbox, the test fixtures' API, workers
and Redis): a free loopback port to give one, and the one way to stop one."""

from __future__ import annotations

import socket
import subprocess
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0, kill_timeout: float | None = None) -> None:
    """Terminate, wait, kill: SIGTERM (the child's own shutdown runs), wait up to ``timeout`` s,
    then SIGKILL and wait (up to ``kill_timeout`` s; None: until it is gone). Nothing when it
    has already exited."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=kill_timeout)
