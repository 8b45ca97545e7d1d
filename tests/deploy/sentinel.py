"""A private Redis Sentinel setup on loopback: a master, a replica and one sentinel, all
run by the redis-server binary the project already uses (``--sentinel`` mode)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import redis as sync_redis

from broker.core.processes import free_port, stop_process
from broker.embedded_redis import EmbeddedRedis, find_redis_server
from tests.fixtures.wait import wait_until

SERVICE = "mymaster"


def _wait(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    wait_until(check, timeout, what, ignoring=(sync_redis.RedisError, OSError))


class SentinelSetup:
    def __init__(self) -> None:
        self.master = EmbeddedRedis(aof=False)
        self.replica = EmbeddedRedis(aof=False)
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="sb-sentinel-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def sentinels(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> SentinelSetup:
        self.master.start()
        self.replica.start()
        replica = sync_redis.Redis(port=self.replica.port)
        replica.replicaof("127.0.0.1", self.master.port)
        _wait(lambda: replica.info("replication")["master_link_status"] == "up", 15, "replica did not sync")
        replica.close()
        conf = Path(self.dir) / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.dir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
        )
        log = open(os.path.join(self.dir, "sentinel.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([find_redis_server(), str(conf), "--sentinel"],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        _wait(self._knows_replica, 30, "sentinel did not discover the replica")
        return self

    def _client(self) -> sync_redis.Redis:
        return sync_redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)

    def _knows_replica(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
            pass
        client = self._client()
        try:
            replicas = client.execute_command("SENTINEL", "REPLICAS", SERVICE)
        finally:
            client.close()
        for entry in replicas:
            fields = dict(zip(entry[::2], entry[1::2], strict=True)) if isinstance(entry, list) else entry
            if int(fields["port"]) == self.replica.port and "disconnected" not in fields["flags"]:
                return True
        return False

    def master_port(self) -> int:
        client = self._client()
        try:
            _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        finally:
            client.close()
        return int(port)

    def fail_master(self, timeout: float = 30) -> int:
        """SIGKILL the current master and wait until the sentinel has promoted the replica
        (what a real failover looks like). Returns the new master's port."""
        old = self.master_port()
        dead = self.master if self.master.port == old else self.replica
        dead.stop(kill=True)
        _wait(lambda: self.master_port() != old, timeout, "sentinel did not fail over")
        new = self.master_port()
        promoted = sync_redis.Redis(port=new)
        try:
            _wait(lambda: promoted.info("replication")["role"] == "master", timeout, "replica not promoted")
        finally:
            promoted.close()
        return new

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)
        self.master.cleanup()
        self.replica.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)
