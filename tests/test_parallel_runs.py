"""What lets the suite run on several processes (``pytest -n 2``, pytest-xdist): each test process
has its own Redis (and its own in-process sandbox), so one process flushing, restarting or
filling them never touches another's. Every other server a test starts takes a free loopback
port, and every file a test writes goes under its ``tmp_path`` (see tests/fixtures/)."""

from __future__ import annotations

import os

import redis as sync_redis

from broker.embedded_redis import EmbeddedRedis


def test_the_session_redis_is_a_server_this_process_started(redis_server: EmbeddedRedis) -> None:
    """The Redis behind ``redis_url`` is the child of this test process (the session fixture
    runs once per xdist worker): the server answering on the URL reports the pid of the process
    this one started, and that process's parent is this one."""
    assert redis_server.proc is not None and redis_server.proc.poll() is None
    client = sync_redis.Redis.from_url(redis_server.url)
    try:
        served_by = int(client.info("server")["process_id"])
    finally:
        client.close()
    assert served_by == redis_server.proc.pid
    with open(f"/proc/{served_by}/stat") as stat:
        parent = int(stat.read().rsplit(")", 1)[1].split()[1])
    assert parent == os.getpid(), "the session Redis was not started by this test process"

