"""Credentials at rest: Fernet under BROKER_SECRET_KEY, never stored in plaintext, rotatable
to a new key while old tokens stay readable, errors that never echo a token or key."""

from __future__ import annotations

import base64

import pytest
import redis.asyncio as aioredis

from broker.core.errors import InvalidInput
from broker.core.settings import Settings, SettingsError
from tenants.crypto import CredentialCipher, CredentialError, generate_secret_key
from tenants.models import TenantView
from tenants.scope import TENANTS_INDEX, tenant_record
from tenants.service import TenantService, decode_create

OPENAI_KEY = "sk-proj-PLAINTEXTopenaiKEY0123456789"
AVATURN_KEY = "avt-PLAINTEXTavaturnKEY9876543210"


async def dump_values(redis: aioredis.Redis) -> list[bytes]:
    """Every key name and every value (strings, hashes, zsets) in the Redis database."""
    out: list[bytes] = []
    async for key in redis.scan_iter():
        out.append(key)
        kind = (await redis.type(key)).decode()
        if kind == "string":
            out.append(await redis.get(key))
        elif kind == "hash":
            for field, value in (await redis.hgetall(key)).items():
                out += [field, value]
        elif kind == "zset":
            out += [m for m, _ in await redis.zrange(key, 0, -1, withscores=True)]
        else:
            raise AssertionError(f"unexpected type {kind} at {key!r}")
    return out


def test_generated_key_is_32_urlsafe_bytes_and_accepted_by_settings() -> None:
    key = generate_secret_key()
    assert len(base64.urlsafe_b64decode(key)) == 32
    settings = Settings.from_env({"BROKER_SECRET_KEY": f"{key},{generate_secret_key()}"})
    assert CredentialCipher.from_settings(settings).key_count == 2


def test_round_trip_and_token_hides_the_plaintext() -> None:
    cipher = CredentialCipher([generate_secret_key()])
    one, two = cipher.encrypt(OPENAI_KEY), cipher.encrypt(OPENAI_KEY)
    assert one != two and OPENAI_KEY not in one
    assert cipher.decrypt(one) == cipher.decrypt(two) == OPENAI_KEY


def test_decrypt_failure_is_clear_and_never_echoes_the_token() -> None:
    token = CredentialCipher([generate_secret_key()]).encrypt(OPENAI_KEY)
    other = CredentialCipher([generate_secret_key()])
    for bad in (token, "not-a-token", token[:-4]):
        with pytest.raises(CredentialError) as exc:
            other.decrypt(bad)
        assert "BROKER_SECRET_KEY" in str(exc.value)
        assert bad not in str(exc.value) and exc.value.__cause__ is None and exc.value.__suppress_context__


def test_missing_or_malformed_secret_key_names_the_variable_without_echo() -> None:
    with pytest.raises(SettingsError, match="BROKER_SECRET_KEY"):
        CredentialCipher.from_settings(Settings())
    assert CredentialCipher.optional(Settings()) is None
    with pytest.raises(SettingsError) as exc:
        CredentialCipher(["c2hvcnQ="])
    assert "BROKER_SECRET_KEY" in str(exc.value) and "c2hvcnQ=" not in str(exc.value)


def test_rotate_moves_a_token_to_the_first_key() -> None:
    k1, k2 = generate_secret_key(), generate_secret_key()
    token = CredentialCipher([k1]).encrypt(OPENAI_KEY)
    rotated = CredentialCipher([k2, k1]).rotate(token)
    assert CredentialCipher([k2]).decrypt(rotated) == OPENAI_KEY
    with pytest.raises(CredentialError):
        CredentialCipher([k1]).decrypt(rotated)
    with pytest.raises(CredentialError):
        CredentialCipher([generate_secret_key()]).rotate(token)


async def test_upstream_keys_never_reach_redis_in_plaintext(redis: aioredis.Redis) -> None:
    """Invariant: after storing a tenant with both upstream keys, no Redis key or value contains
    either plaintext; the service decrypts them back and the admin view shows only booleans."""
    service = TenantService(redis, CredentialCipher([generate_secret_key()]))
    tenant = await service.create(
        decode_create({"name": "acme", "openai": {"api_key": OPENAI_KEY}, "avaturn": {"api_key": AVATURN_KEY}})
    )
    blob = b"\n".join(await dump_values(redis))
    assert tenant.id.encode() in blob  # the scan does see the tenant's data
    assert OPENAI_KEY.encode() not in blob and AVATURN_KEY.encode() not in blob
    assert service.credentials(await service.get(tenant.id)) == (OPENAI_KEY, AVATURN_KEY)
    view = TenantView.of(tenant)
    assert view.openai.api_key_set and view.avaturn.api_key_set
    assert "PLAINTEXT" not in repr(view) and tenant.openai.api_key_enc not in repr(view)


async def test_tenant_without_credentials_falls_back_to_platform(redis: aioredis.Redis) -> None:
    service = TenantService(redis, None)  # no BROKER_SECRET_KEY needed without credentials
    tenant = await service.create(decode_create({"name": "no-creds"}))
    assert service.credentials(tenant) == (None, None)


async def test_a_credential_without_secret_key_is_refused_and_nothing_is_stored(redis: aioredis.Redis) -> None:
    service = TenantService(redis, None)
    with pytest.raises(InvalidInput) as exc:
        await service.create(decode_create({"name": "acme", "avaturn": {"api_key": AVATURN_KEY}}))
    assert exc.value.field == "avaturn.api_key" and exc.value.code == "secret_key_missing"
    assert "BROKER_SECRET_KEY" in exc.value.message and AVATURN_KEY not in exc.value.message
    assert await redis.zcard(TENANTS_INDEX) == 0 and await redis.dbsize() == 0


async def test_credentials_that_cannot_be_decrypted_raise_instead_of_using_the_platform_key(
    redis: aioredis.Redis,
) -> None:
    """Invariant: a tenant that brought its own key is never silently served with the platform's."""
    tenant = await TenantService(redis, CredentialCipher([generate_secret_key()])).create(
        decode_create({"name": "acme", "openai": {"api_key": OPENAI_KEY}})
    )
    with pytest.raises(CredentialError):
        TenantService(redis, CredentialCipher([generate_secret_key()])).credentials(tenant)
    with pytest.raises(CredentialError):
        TenantService(redis, None).credentials(tenant)


async def test_rotate_secrets_reencrypts_every_tenant_with_the_first_key(redis: aioredis.Redis) -> None:
    """Invariant: after rotate_secrets with keys (new, old), every credential decrypts with the
    new key alone and no longer with the old one; tenants without credentials are untouched."""
    old, new = generate_secret_key(), generate_secret_key()
    before = TenantService(redis, CredentialCipher([old]))
    ids = []
    for i in range(3):
        body = {"name": f"t{i}", "openai": {"api_key": f"{OPENAI_KEY}{i}"}}
        if i == 2:
            body["avaturn"] = {"api_key": AVATURN_KEY}
        ids.append((await before.create(decode_create(body))).id)
    bare = await before.create(decode_create({"name": "bare"}))
    bare_raw = await redis.get(tenant_record(bare.id))

    assert await TenantService(redis, CredentialCipher([new, old])).rotate_secrets() == 3

    after, stale = TenantService(redis, CredentialCipher([new])), TenantService(redis, CredentialCipher([old]))
    for i, tenant_id in enumerate(ids):
        tenant = await after.get(tenant_id)
        assert after.credentials(tenant) == (f"{OPENAI_KEY}{i}", AVATURN_KEY if i == 2 else None)
        with pytest.raises(CredentialError):
            stale.credentials(tenant)
    assert await redis.get(tenant_record(bare.id)) == bare_raw
    assert OPENAI_KEY.encode() not in b"\n".join(await dump_values(redis))
