"""``session-broker secrets rotate`` (TenantService.rotate_all) and the webhook endpoints'
signing secrets, on real Redis. Invariant: after a rotation, dropping the older
BROKER_SECRET_KEY keys loses nothing: every endpoint's secret (and the previous one of a secret
rotation) is re-encrypted with the first key, or, when one cannot be decrypted, nothing at all
is written and the line names the record."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from broker.webhooks.endpoints import EndpointCreate, WebhookEndpoints
from tenants.crypto import CredentialCipher, generate_secret_key
from tenants.models import TenantCreate
from tenants.scope import TenantScope
from tenants.service import TenantService

URL = "https://93.184.216.34/hook"


@pytest.mark.asyncio
async def test_rotate_re_encrypts_the_webhook_secrets(redis) -> None:
    old, new, stranger = generate_secret_key(), generate_secret_key(), generate_secret_key()
    tenants = TenantService(redis, CredentialCipher([old]))
    tid = (await tenants.create(TenantCreate(name="wh-rotation"))).id
    repo = WebhookEndpoints(redis, CredentialCipher([old]), allow_private=False)
    first = await repo.create(tid, EndpointCreate(url=URL))
    rotated = await repo.rotate_secret(tid, first.id)  # leaves a previous secret, signing for 24 h
    other = await repo.create(tid, EndpointCreate(url=URL))
    scope = TenantScope(tid)

    async def stored() -> dict[str, list[bytes | None]]:
        return {w: await redis.hmget(scope.webhook_endpoint(w), "secret_enc", "prev_secret_enc")
                for w in (first.id, other.id)}

    # a key list that cannot open one of them: nothing written, the record named
    await redis.hset(scope.webhook_endpoint(other.id), "secret_enc",
                     Fernet(stranger.encode()).encrypt(b"whsec_x").decode())
    before = await stored()
    report = await TenantService(redis, CredentialCipher([new, old])).rotate_all()
    line = next(x for x in report.lines if x.tenant_id == tid)
    assert report.refused and line.outcome == "cannot-decrypt"
    assert line.records == (f"webhook.{other.id}.secret",)
    assert await stored() == before

    await redis.hset(scope.webhook_endpoint(other.id), "secret_enc", CredentialCipher([old]).encrypt(other.secret))
    report = await TenantService(redis, CredentialCipher([new, old])).rotate_all()
    line = next(x for x in report.lines if x.tenant_id == tid)
    assert not report.refused and line.outcome == "rotated", report
    assert set(line.records) == {f"webhook.{first.id}.secret", f"webhook.{first.id}.prev_secret",
                                 f"webhook.{other.id}.secret"}
    only_new = CredentialCipher([new])
    after = await stored()
    assert only_new.decrypt(after[first.id][0].decode()) == rotated.secret
    assert only_new.decrypt(after[first.id][1].decode()) == first.secret
    assert only_new.decrypt(after[other.id][0].decode()) == other.secret
    # a second run changes nothing
    again = await TenantService(redis, CredentialCipher([new, old])).rotate_all()
    assert next(x for x in again.lines if x.tenant_id == tid).outcome == "unchanged"
    assert await stored() == after
