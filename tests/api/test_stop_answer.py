"""The answer of a stop (DELETE /v1/sessions/{id}, CONTRACT.md section 4): 202 with status
``terminating`` for a session the call moved there, 200 only for one already ``terminated`` or
``failed`` before it. With the wake-up worker and fast upstreams, the stop job can end the
session within a millisecond of being enqueued: the answer must not depend on that race."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from broker.sessions.jobs import JobQueue, new_arq_redis
from broker.sessions.models import CreateSessionRequest, now_ms
from broker.sessions.repository import SessionRepository
from broker.sessions.service import SessionService
from tenants.crypto import CredentialCipher, generate_secret_key
from tenants.service import TenantService, decode_create


async def test_a_stop_ended_at_once_by_a_worker_still_answers_terminating(redis: aioredis.Redis) -> None:
    """Invariant: the call that moves a live session to ``terminating`` reports ``terminating``
    (so the API answers 202), even when a worker ends the session right after the stop job is
    enqueued and before the call returns; a second stop then reports ``terminated`` (200)."""
    cipher = CredentialCipher([generate_secret_key()])
    tenant = await TenantService(redis, cipher).create(decode_create({"name": "stopper"}))
    repo = SessionRepository(redis)
    queue = JobQueue(new_arq_redis(redis.connection_pool))
    sessions = SessionService(repo, queue, provision_deadline_s=60, cipher=cipher)
    rec, _ = await sessions.create(tenant, CreateSessionRequest(), body=b"", idempotency_key=None)
    enqueued: list[str] = []
    real_terminate = queue.terminate

    async def terminate_and_end_at_once(tenant_id: str, session_id: str, **kwargs: Any) -> bool:
        """The stop job enqueued, then run to its end by an instant worker."""
        done = await real_terminate(tenant_id, session_id, **kwargs)
        enqueued.append(session_id)
        current = await repo.get(tenant_id, session_id)
        assert current is not None and current.status == "terminating"
        now = now_ms()
        ended = await repo.transition(current, allowed="terminating", status="terminated", lease="del",
                                      due_expiry="del", fields={"terminated_at": now}, publish=True)
        assert ended.applied
        return done

    queue.terminate = terminate_and_end_at_once  # type: ignore[method-assign]
    first = await sessions.stop(tenant.id, rec.id)
    assert enqueued == [rec.id]  # the stop job was enqueued, and the session ended before the call returned
    assert (await repo.get(tenant.id, rec.id)).status == "terminated"  # type: ignore[union-attr]
    assert (first.status, first.termination_reason) == ("terminating", "requested")
    again = await sessions.stop(tenant.id, rec.id)
    assert again.status == "terminated" and enqueued == [rec.id]  # nothing left to stop: no second job
