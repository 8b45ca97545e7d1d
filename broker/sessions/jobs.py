"""Job names, queue and payload format shared by the API (which enqueues by name) and the
workers (which register the functions). Payloads are ids only, msgpack-encoded (no pickle).

Jobs are written in arq's own layout (``arq:job:{id}`` with the serialized job, the id in the
queue zset at its due time) by one Lua script, :data:`ENQUEUE`, which also pushes a token to
:data:`WAKE_LIST` so an idle worker (``workers.wakeup``) starts it at once instead of at its
next poll. Same rule as arq's ``enqueue_job``: a job id whose job or result key exists is not
enqueued again (atomically here, without arq's WATCH/MULTI round trips)."""

from __future__ import annotations

from typing import Any

import msgspec
from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms

QUEUE_NAME = "sb:queue"
PROVISION = "provision_session"
TERMINATE = "terminate_session"
WAKE_LIST = QUEUE_NAME + ":wake"     # list of wake-up tokens, BLPOPped by idle workers
WAKE_CAP = 64                        # tokens kept at most (enough to wake every idle worker)
JOB_EXPIRES_EXTRA_MS = 86_400_000    # arq's default: a job key outlives its due time by a day

# KEYS: 1 job key, 2 result key, 3 queue zset, 4 wake list.
# ARGV: 1 job id, 2 score (due, ms), 3 job key TTL (ms), 4 serialized job, 5 WAKE_CAP.
ENQUEUE = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[5]) - 1)
return 1
"""


def job_serializer(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


def job_deserializer(data: bytes) -> Any:
    return msgspec.msgpack.decode(data)


class JobSpec(msgspec.Struct, frozen=True):
    """One job ready to be written by :data:`ENQUEUE` (or by the admission script)."""

    job_id: str
    score: int          # due time, unix ms
    expires_ms: int     # TTL of the job key
    payload: bytes

    def keys(self) -> list[str]:
        return [job_key_prefix + self.job_id, result_key_prefix + self.job_id, QUEUE_NAME, WAKE_LIST]

    def args(self) -> list[str | int | bytes]:
        return [self.job_id, self.score, self.expires_ms, self.payload, WAKE_CAP]


class JobFinish(msgspec.Struct, frozen=True):
    """The running arq job to record as finished (successfully, with ``result``) in the same
    atomic step as a session transition: what arq's ``finish_job`` does (in-progress key, retry
    and job keys deleted, the result kept ``result_ttl_ms`` - so an enqueue of the same id is
    still refused meanwhile -, the id out of the queue and the abort set), one round trip less.
    Built by ``workers.wakeup.WakeupWorker.inline_finish``."""

    job_id: str
    result: bytes       # arq's serialized result
    result_ttl_ms: int
    queue: str = QUEUE_NAME

    def keys(self) -> list[str]:
        job_id = self.job_id
        return [in_progress_key_prefix + job_id, retry_key_prefix + job_id, job_key_prefix + job_id,
                result_key_prefix + job_id, self.queue, abort_jobs_ss]

    def args(self) -> list[str | int | bytes]:
        return [self.job_id, self.result, self.result_ttl_ms]


def job_spec(function: str, *args: str, job_id: str, due_ms: int | None = None) -> JobSpec:
    now = timestamp_ms()
    score = due_ms if due_ms else now
    payload = serialize_job(function, args, {}, None, now, serializer=job_serializer)
    return JobSpec(job_id=job_id, score=score, expires_ms=max(1, score - now) + JOB_EXPIRES_EXTRA_MS,
                   payload=payload)


class JobQueue:
    """Enqueues session jobs (one round trip each). Job ids make every enqueue idempotent."""

    def __init__(self, arq: ArqRedis) -> None:
        self.arq = arq
        self._enqueue = arq.register_script(ENQUEUE)

    @staticmethod
    def provision_job(tenant_id: str, session_id: str, *, defer_ms: int = 0) -> JobSpec:
        due = timestamp_ms() + defer_ms if defer_ms else None
        return job_spec(PROVISION, tenant_id, session_id, job_id=f"prov:{session_id}", due_ms=due)

    @staticmethod
    def provision_job_keys(session_id: str) -> tuple[str, str]:
        """The job and result keys of a session's provisioning job (either existing means the
        job is queued, running or just finished)."""
        job_id = f"prov:{session_id}"
        return job_key_prefix + job_id, result_key_prefix + job_id

    async def submit(self, job: JobSpec) -> bool:
        return bool(await self._enqueue(keys=job.keys(), args=job.args()))

    async def provision(self, tenant_id: str, session_id: str, *, defer_ms: int = 0) -> bool:
        return await self.submit(self.provision_job(tenant_id, session_id, defer_ms=defer_ms))

    @staticmethod
    def terminate_job(tenant_id: str, session_id: str, *, at_ms: int | None = None, tag: str = "stop") -> JobSpec:
        return job_spec(TERMINATE, tenant_id, session_id, job_id=f"term:{session_id}:{tag}", due_ms=at_ms)

    async def terminate(self, tenant_id: str, session_id: str, *, at_ms: int | None = None, tag: str = "stop") -> bool:
        return await self.submit(self.terminate_job(tenant_id, session_id, at_ms=at_ms, tag=tag))


def new_arq_redis(pool: Any) -> ArqRedis:
    return ArqRedis(
        pool,
        job_serializer=job_serializer,
        job_deserializer=job_deserializer,
        default_queue_name=QUEUE_NAME,
    )
