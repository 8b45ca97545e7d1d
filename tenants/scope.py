"""Every Redis key of the project, built in one place.

Tenant-owned keys can only be built through :class:`TenantScope`, which takes the tenant
id: a handler cannot address a session (or an idempotency record, a quota counter...)
without the caller's tenant. Global keys are module functions.

Layout (prefix ``sb:``)::

    sb:tenants                      zset  tenant id -> created_at (ms)
    sb:tenant:{tid}                 string  tenant record (msgspec JSON, credentials encrypted)
    sb:apikey:{sha256}              hash  {tenant_id, key_id, not_after}   (lookup by hash)
    sb:t:{tid}:keys                 hash  key id -> key metadata JSON
    sb:t:{tid}:keys:used            hash  key id -> last_used_at (written at most once a minute per process)
    sb:t:{tid}:s:{sid}              hash  the session record
    sb:t:{tid}:sessions             zset  sid -> created_at (ms)        (listing, newest first)
    sb:t:{tid}:live                 zset  sid -> lease deadline (ms)    (concurrency leases)
    sb:t:{tid}:eu:{end_user}        zset  sid -> created_at (ms)        (live sessions of one end user)
    sb:t:{tid}:rate                 zset  sid -> admission ms           (the sliding 60 s window log)
    sb:t:{tid}:day:{yyyymmdd}       string counter, expires after 48 h
    sb:t:{tid}:idem:{sha256(key)}   hash  {body, sid, state}            (24 h)
    sb:t:{tid}:mint                 hash  OpenAI mint schedule (GCRA {tat, last}), reserved at admission
    sb:t:{tid}:sched:prov           zset  sid -> when the scheduler takes it next (ms): the mint slot
                                          reserved at admission, then a retry time or a claim lease
    sb:t:{tid}:budget:{yyyymm}      hash  {used, reserved, t50|t80|t100}  session seconds of a UTC month
                                           (tenants/budget.lua; expires 40 d after the month)
    sb:t:{tid}:budget:{yyyymm}:eu   hash  {u:{eu}, r:{eu}, t50:{eu}...}  the same per end user
    sb:t:{tid}:usage:d:{yyyymmdd}   hash  {s, b, s:{eu}, b:{eu}}  sessions admitted / billable seconds (400 d)
    sb:t:{tid}:usage:h:{yyyymmddhh} hash  the same per UTC hour (31 d)
    sb:t:{tid}:events               stream  the tenant's events (evt_ + entry id; 7 days: tenants/outbox.lua)
    sb:t:{tid}:wh:eps               set   the tenant's webhook endpoint ids (at most 10)
    sb:t:{tid}:wh:ep:{weid}         hash  one webhook endpoint (fields: broker/webhooks/__init__.py)
    sb:t:{tid}:wh:ep:{weid}:attempts stream its delivery attempts (capped; read newest first)
    sb:wh:tenants                   set   tenant ids with at least one webhook endpoint
    sb:t:{tid}:wh:cursor            string  the last outbox entry id fanned out to the delivery queues
    sb:t:{tid}:wh:q:{weid}:{sid}    list  entry ids queued for one endpoint and one session ('-' for a
                                          tenant event), oldest first; only the head is delivered
    sb:t:{tid}:wh:due:{weid}        zset  sid ('-') -> when its queue's head is tried next (ms): now, a
                                          retry time or a claim's lease end (broker/webhooks/queue.py)
    sb:t:{tid}:wh:heads:{weid}      hash  {sid}:n -> failed attempts at the queue's head, {sid}:c -> claim token
    sb:wh:ring                      zset  "{tid}:{weid}" -> no later than the earliest score of its wh:due
    sb:wh:pending                   string  deliveries queued, all tenants (the pending gauge)
    sb:wh:wake                      pub/sub channel: a delivery was queued outside the fan-out (resend)
    sb:due:expiry                   zset  "{tid}:{sid}" -> expires_at (ms)   (sweeper)
    sb:due:expiring                 zset  "{tid}:{sid}" -> expires_at (ms) of a ready session whose
                                          session.expiring event is still to come (workers/expiry.py)
    sb:due:provision                zset  no longer written (before issue 15: provisioning deadlines)
    sb:sched:prov:tenants           zset  tid -> no later than the earliest score of its sched:prov
    sb:sched:prov:wake              list  wake-up tokens for idle provisioning loops (BLPOP, at most 64)
    sb:stats:live                   hash  status -> count of sessions in that live status
    sb:sweep:index_cursor           string "{rank}:{tid}:{score}": where the sweeper's trim of the
                                           sessions indexes resumes (workers/jobs/sweep.py)
    sb:console:{sha256(token)}      hash  {tenant_id, key_id, key_hash, csrf, expires_at}  (a console
                                           sign-in; expires with it, <= 12 h: broker/api/console_session.py)
    sb:events:{tid}:{sid}           pub/sub channel: session reached ready/failed/terminated
    sb:t:{tid}:events               pub/sub channel (same name as the stream): an event was appended (its id)
    sb:keys:revoked                 pub/sub channel: a key hash was revoked or its not_after changed
    sb:tenants:changed              pub/sub channel: a tenant record changed (quotas, status, config)
"""

from __future__ import annotations

from broker.core.text import text

PREFIX = "sb:"

TENANTS_INDEX = PREFIX + "tenants"
DUE_EXPIRY = PREFIX + "due:expiry"
DUE_EXPIRING = PREFIX + "due:expiring"  # zset: ready sessions -> expires_at, until their session.expiring
DUE_PROVISION = PREFIX + "due:provision"
PROVISION_TENANTS = PREFIX + "sched:prov:tenants"  # zset: tenants with scheduled provisioning work
PROVISION_WAKE = PREFIX + "sched:prov:wake"        # list: LPUSHed when a slot is due (BLPOPped by idle workers)
PROVISION_WAKE_CAP = 64                             # tokens kept at most (LTRIM 0 63)
STATS_LIVE = PREFIX + "stats:live"   # hash: live status -> number of sessions in it (all tenants)
SWEEP_INDEX_CURSOR = PREFIX + "sweep:index_cursor"  # string: the sweeper's place in its pass over the tenants
EVENTS_PATTERN = PREFIX + "events:*"
# what precedes "{tid}:" in every tenant key: for Lua that builds a session key from a
# "{tid}:{sid}" member (TenantScope(tid).session(sid) = TENANT_KEYS + tid + ":s:" + sid)
TENANT_KEYS = PREFIX + "t:"
OUTBOX_PATTERN = PREFIX + "t:*:events"  # tenants/outbox.lua publishes each event's id on its stream's name
WEBHOOK_TENANTS = PREFIX + "wh:tenants"  # set: tenants with at least one webhook endpoint
WEBHOOK_RING = PREFIX + "wh:ring"        # zset: "{tid}:{weid}" -> earliest due delivery (broker/webhooks/queue.py)
WEBHOOK_PENDING = PREFIX + "wh:pending"  # string: deliveries queued, all tenants
WEBHOOK_WAKE = PREFIX + "wh:wake"        # pub/sub channel: a delivery was queued outside the fan-out
KEY_REVOCATIONS_CHANNEL = PREFIX + "keys:revoked"
TENANT_CHANGED_CHANNEL = PREFIX + "tenants:changed"


def tenant_record(tenant_id: str) -> str:
    return f"{PREFIX}tenant:{tenant_id}"


def api_key_lookup(key_hash: str) -> str:
    return f"{PREFIX}apikey:{key_hash}"


def console_session(token_digest: str) -> str:
    """A console session, named by the SHA-256 of its cookie (a Redis dump opens no console)."""
    return f"{PREFIX}console:{token_digest}"


def due_member(tenant_id: str, session_id: str) -> str:
    """Member of the global due sets; split back with :func:`split_due_member`."""
    return f"{tenant_id}:{session_id}"


def split_due_member(member: str | bytes) -> tuple[str, str]:
    tenant_id, _, session_id = text(member).partition(":")
    return tenant_id, session_id


class TenantScope:
    """Builds the keys owned by one tenant. The only way to name tenant data in Redis."""

    __slots__ = ("tenant_id", "_base")

    def __init__(self, tenant_id: str) -> None:
        if not tenant_id or ":" in tenant_id:
            raise ValueError("invalid tenant id")
        self.tenant_id = tenant_id
        self._base = f"{PREFIX}t:{tenant_id}:"

    def session(self, session_id: str) -> str:
        return f"{self._base}s:{session_id}"

    def sessions_index(self) -> str:
        return self._base + "sessions"

    def live(self) -> str:
        return self._base + "live"

    def end_user(self, end_user: str) -> str:
        return f"{self._base}eu:{end_user}"

    def rate_bucket(self) -> str:
        """The sliding 60 s window log of admissions (a zset; the name predates the window)."""
        return self._base + "rate"

    def day_counter(self, yyyymmdd: str) -> str:
        return f"{self._base}day:{yyyymmdd}"

    def idempotency(self, key_digest: str) -> str:
        return f"{self._base}idem:{key_digest}"

    def keys_meta(self) -> str:
        return self._base + "keys"

    def keys_last_used(self) -> str:
        return self._base + "keys:used"

    def mint_bucket(self) -> str:
        return self._base + "mint"

    def provision_schedule(self) -> str:
        """zset sid -> score: when the provisioning scheduler takes the session next (ms): the mint
        slot admission reserved, then a retry time or a claim's lease (broker/sessions/schedule.py)."""
        return self._base + "sched:prov"

    # budgets and usage history: the Lua of tenants/budget.lua builds the same names from base()
    def base(self) -> str:
        return self._base

    def budget_month(self, yyyymm: str) -> str:
        return f"{self._base}budget:{yyyymm}"

    def budget_end_users(self, yyyymm: str) -> str:
        return f"{self._base}budget:{yyyymm}:eu"

    def usage_day(self, yyyymmdd: str) -> str:
        return f"{self._base}usage:d:{yyyymmdd}"

    def usage_hour(self, yyyymmddhh: str) -> str:
        return f"{self._base}usage:h:{yyyymmddhh}"

    def events(self) -> str:
        """The tenant's event stream, and the pub/sub channel of its wake-ups (tenants/outbox.lua
        builds the same name from a session key)."""
        return self._base + "events"

    @staticmethod
    def tenant_of_events_channel(channel: str) -> str | None:
        """The tenant id of a channel matched by ``OUTBOX_PATTERN``, None for another channel."""
        head, sep, tail = channel.partition(PREFIX + "t:")
        if head or not sep or not tail.endswith(":events"):
            return None
        return tail[: -len(":events")]

    # webhooks (contract section 11): the endpoints and their attempt logs (broker/webhooks/)
    def webhook_endpoints(self) -> str:
        return self._base + "wh:eps"

    def webhook_endpoint(self, endpoint_id: str) -> str:
        return f"{self._base}wh:ep:{endpoint_id}"

    def webhook_attempts(self, endpoint_id: str) -> str:
        return f"{self._base}wh:ep:{endpoint_id}:attempts"

    # webhook delivery (broker/webhooks/queue.py): the fan-out cursor and the ordered queues
    def webhook_cursor(self) -> str:
        return self._base + "wh:cursor"

    def webhook_queue(self, endpoint_id: str, session_id: str) -> str:
        """list of entry ids for one endpoint and one session (``-`` for a tenant event)."""
        return f"{self._base}wh:q:{endpoint_id}:{session_id}"

    def webhook_due(self, endpoint_id: str) -> str:
        return f"{self._base}wh:due:{endpoint_id}"

    def webhook_heads(self, endpoint_id: str) -> str:
        return f"{self._base}wh:heads:{endpoint_id}"

    def events_channel(self, session_id: str) -> str:
        return f"{PREFIX}events:{self.tenant_id}:{session_id}"
