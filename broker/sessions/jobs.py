"""The arq jobs the API enqueues, and their payload format (ids only, msgpack: no pickle).

Provisioning is not an arq job: it runs from the provisioning schedule (``schedule.py``).
What remains for arq is what it does as shipped: the immediate terminations (a stop, a
replacement, a tenant disable) are arq jobs, enqueued through arq's documented
``ArqRedis.enqueue_job`` with a job id per session and cause (``term:{sid}:{tag}``), which makes
the enqueue idempotent (arq refuses an id whose job or result exists)."""

from __future__ import annotations

from typing import Any

import msgspec
from arq.connections import ArqRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import WatchError

QUEUE_NAME = "sb:queue"
TERMINATE = "terminate_session"


def job_serializer(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


def job_deserializer(data: bytes) -> Any:
    return msgspec.msgpack.decode(data)


class JobQueue:
    """Enqueues session jobs (arq's ``enqueue_job``). Job ids make every enqueue idempotent."""

    def __init__(self, pool: ArqRedis) -> None:
        self.arq = pool

    async def terminate(self, tenant_id: str, session_id: str, *, tag: str = "stop") -> bool:
        """Enqueue the termination of a session now; False if a job with its id exists already."""
        try:
            job = await self.arq.enqueue_job(TERMINATE, tenant_id, session_id, _job_id=f"term:{session_id}:{tag}",
                                             _queue_name=QUEUE_NAME)
        except WatchError as exc:
            # arq answers a real WATCH conflict itself (None: the job was enqueued meanwhile). A
            # WatchError that escapes is redis-py's report of a connection lost while the job key
            # was WATCHed: Redis went away, which callers handle as such (the API: 503, not 500).
            raise RedisConnectionError(f"connection lost while enqueueing the stop job: {exc}") from exc
        return job is not None


def new_arq_redis(pool: Any) -> ArqRedis:
    return ArqRedis(
        pool,
        job_serializer=job_serializer,
        job_deserializer=job_deserializer,
        default_queue_name=QUEUE_NAME,
    )
