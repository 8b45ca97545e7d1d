"""Job names, queue and payload format shared by the API (which enqueues by name) and the
workers (which register the functions). Payloads are ids only, msgpack-encoded (no pickle)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from arq.connections import ArqRedis

QUEUE_NAME = "sb:queue"
PROVISION = "provision_session"
TERMINATE = "terminate_session"


def job_serializer(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


def job_deserializer(data: bytes) -> Any:
    return msgspec.msgpack.decode(data)


class JobQueue:
    """Enqueues session jobs. Job ids make every enqueue idempotent."""

    def __init__(self, arq: ArqRedis) -> None:
        self.arq = arq

    async def provision(self, tenant_id: str, session_id: str, *, defer_ms: int = 0) -> bool:
        job = await self.arq.enqueue_job(
            PROVISION,
            tenant_id,
            session_id,
            _job_id=f"prov:{session_id}",
            _queue_name=QUEUE_NAME,
            _defer_by=defer_ms / 1000 if defer_ms else None,
        )
        return job is not None

    async def terminate(self, tenant_id: str, session_id: str, *, at_ms: int | None = None, tag: str = "stop") -> bool:
        job = await self.arq.enqueue_job(
            TERMINATE,
            tenant_id,
            session_id,
            _job_id=f"term:{session_id}:{tag}",
            _queue_name=QUEUE_NAME,
            _defer_until=datetime.fromtimestamp(at_ms / 1000, UTC) if at_ms else None,
        )
        return job is not None


def new_arq_redis(pool: Any) -> ArqRedis:
    return ArqRedis(
        pool,
        job_serializer=job_serializer,
        job_deserializer=job_deserializer,
        default_queue_name=QUEUE_NAME,
    )
