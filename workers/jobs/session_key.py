"""The Avaturn key of a session: the key that created it is the one that deletes it
(CONTRACT.md section 14).

A tenant may change its Avaturn key (another account) or the platform's may change while its
sessions live; Avaturn answers a DELETE with another account's key 404, which would be taken
for "gone" while the avatar runs on until ``max_duration``. So the key the create uses is kept
with the session, encrypted with the credential cipher (like ``secret_enc``), written in the
step that marks the create in flight (:func:`inflight_mark`: a create that lands after a crash
is deleted with the right key too), used by every DELETE of the session (:func:`delete_key`),
and dropped with the rest of what a terminal session no longer needs
(``broker/sessions/terminal.py``).

A record written before this existed has no key: it is deleted as before, with the tenant's
current key or the platform's. A stored key that does not decrypt (``BROKER_SECRET_KEY`` lost
the key that encrypted it) is never replaced by another one: :class:`SessionKeyUndecryptable`
keeps the session ``terminating`` and retried, so a 404 is "gone" only from the key that
created the session.
"""

from __future__ import annotations

from broker.core.errors import NotFound
from broker.sessions.models import SessionRecord
from tenants.crypto import CredentialError

from ..context import WorkerContext

FIELD = "avaturn_key_enc"


class MissingCredentials(Exception):
    code = "upstream_not_configured"


class SessionKeyUndecryptable(Exception):
    """The session's stored Avaturn key does not decrypt with any configured BROKER_SECRET_KEY."""

    code = "session_key_undecryptable"


def inflight_mark(ctx: WorkerContext, avaturn_key: str) -> dict[str, str]:
    """The fields of the step that marks a create in flight: the mark, and the key the create
    is about to use, encrypted."""
    return {"create_state": "inflight", FIELD: ctx.cipher.encrypt(avaturn_key)}


async def delete_key(ctx: WorkerContext, rec: SessionRecord) -> str:
    """The key to DELETE ``rec``'s upstream session with: the one that created it; for a record
    without one (written before keys were kept), the tenant's current key or the platform's.
    Raises :class:`SessionKeyUndecryptable` or :class:`MissingCredentials`."""
    if rec.avaturn_key_enc:
        try:
            return ctx.cipher.decrypt(rec.avaturn_key_enc)
        except CredentialError:
            raise SessionKeyUndecryptable(
                "the session's stored Avaturn key cannot be decrypted with BROKER_SECRET_KEY") from None
    return await _current_key(ctx, rec.tenant_id)


async def _current_key(ctx: WorkerContext, tenant_id: str) -> str:
    try:
        tenant = await ctx.tenants.get(tenant_id)  # the worker's tenant cache: no Redis read or decrypt per session
        key = ctx.tenants.credentials(tenant)[1] or ctx.settings.avaturn_api_key
    except (NotFound, CredentialError):
        key = ctx.settings.avaturn_api_key
    if key is None:
        raise MissingCredentials("no Avaturn key for this tenant or the platform")
    return key
