import redis

from broker.embedded_redis import EmbeddedRedis


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
