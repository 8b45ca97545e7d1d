"""Child processes of ours (the dev runner's Redis and sandbox, the test fixtures'): a free
loopback port to give one."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
