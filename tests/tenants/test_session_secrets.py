"""MCP credentials of session configs (tenants/session_secrets.py) and the services that use them:
redaction, sealing, the marker's keep rule, rotation, the worker's opening; the admission path
does no cipher work and no extra round trip for them. Real Redis, a real cipher (counted)."""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from broker.core.errors import InvalidInput
from broker.sessions.jobs import JobQueue, new_arq_redis
from broker.sessions.models import CreateSessionRequest
from broker.sessions.repository import SessionRepository
from broker.sessions.service import SessionService
from tenants.crypto import CredentialCipher, CredentialError, generate_secret_key
from tenants.models import TenantView
from tenants.scope import TenantScope, tenant_record
from tenants.service import TenantService, decode_create, decode_patch
from tenants.session_config import MAX_SESSION_BYTES, merge_session, validate_session
from tenants.session_secrets import (
    MAX_SEALED_CHARS, REDACTED, SEALED_PREFIX, keep_stored, mentions, redacted, reseal, seal, slots, unseal,
)

AUTH = "mcp-auth-" + secrets.token_urlsafe(24)
HEADER = "mcp-hdr-" + secrets.token_urlsafe(24)


def mcp(label: str = "crm", auth: str = AUTH, header: str = HEADER,
        url: str = "https://mcp.example/crm") -> dict[str, Any]:
    return {"type": "mcp", "server_label": label, "server_url": url, "authorization": auth,
            "headers": {"X-Api-Key": header, "X-Trace": ""}}


def config(*tools: dict[str, Any]) -> dict[str, Any]:
    fn = {"type": "function", "name": "lookup", "description": "d", "parameters": {"type": "object"}}
    return validate_session({"instructions": "hi", "tools": [fn, *tools]})


class CountingCipher(CredentialCipher):
    """The real cipher, counting its calls (the admission path must make none without MCP credentials)."""

    __slots__ = ("calls",)

    def __init__(self, keys: list[str]) -> None:
        super().__init__(keys)
        self.calls = 0

    def encrypt(self, plaintext: str) -> str:
        self.calls += 1
        return super().encrypt(plaintext)

    def decrypt(self, token: str) -> str:
        self.calls += 1
        return super().decrypt(token)


@pytest.fixture
def cipher() -> CountingCipher:
    return CountingCipher([generate_secret_key()])


# ---- the pure functions ------------------------------------------------------------------------


def test_slots_are_the_credentials_of_mcp_tools_only() -> None:
    """Invariant: only a non-empty authorization and non-empty header values of mcp tools count."""
    cfg = config(mcp(), mcp("wiki", auth="", url="https://mcp.example/wiki"))
    assert [s.path for s in slots(cfg)] == ["session.tools[1].authorization", "session.tools[1].headers.X-Api-Key",
                                            "session.tools[2].headers.X-Api-Key"]
    assert slots(validate_session({"instructions": "x"})) == [] and slots({"tools": "junk"}) == []


def test_redacted_hides_every_value_and_leaves_the_rest(cipher: CountingCipher) -> None:
    """Invariant: a view shows each credential (plaintext or sealed) as the marker, an empty one as
    it is, every other field unchanged, and never changes the stored config."""
    cfg = config(mcp())
    for stored in (cfg, seal(cfg, cipher)):
        before = copy.deepcopy(stored)
        view = redacted(stored)
        assert stored == before
        tool = view["tools"][1]
        assert tool["authorization"] == REDACTED and tool["headers"] == {"X-Api-Key": REDACTED, "X-Trace": ""}
        assert AUTH not in json.dumps(view) and SEALED_PREFIX not in json.dumps(view)
        assert {k: v for k, v in view.items() if k != "tools"} == {k: v for k, v in cfg.items() if k != "tools"}
    plain = validate_session({"instructions": "x"})
    assert redacted(plain) is plain


def test_seal_then_unseal_round_trips_and_costs_nothing_without_credentials(cipher: CountingCipher) -> None:
    """Invariant: sealing encrypts each plaintext credential once, keeps sealed ones, passes the GA
    validation as stored; the worker's unseal gives back the exact config; no credentials, no calls."""
    cfg = config(mcp())
    sealed = seal(cfg, cipher)
    assert cipher.calls == 2 and AUTH not in json.dumps(sealed) and HEADER not in json.dumps(sealed)
    assert validate_session(sealed) == sealed
    assert seal(sealed, cipher) is sealed and cipher.calls == 2
    opened = json.loads(json.dumps(sealed))
    assert unseal(opened, cipher) == [AUTH, HEADER] and opened == cfg
    plain = validate_session({"instructions": "x", "tools": [{**mcp(), "authorization": "", "headers": None}]})
    cipher.calls = 0
    assert seal(plain, cipher) is plain and unseal(copy.deepcopy(plain), cipher) == [] and cipher.calls == 0
    with pytest.raises(CredentialError):
        unseal(json.loads(json.dumps(sealed)), CredentialCipher([generate_secret_key()]))


def test_sealed_values_are_accepted_by_validation_only_within_bounds() -> None:
    tool = {**mcp(), "authorization": SEALED_PREFIX + "x" * (MAX_SEALED_CHARS - len(SEALED_PREFIX))}
    assert validate_session({"tools": [tool]})["tools"][0] == tool
    with pytest.raises(InvalidInput) as exc:
        validate_session({"tools": [{**tool, "authorization": tool["authorization"] + "x"}]})
    assert exc.value.field == "session.tools[0].authorization"


def test_the_marker_keeps_only_the_same_field_of_the_same_server(cipher: CountingCipher) -> None:
    """Invariant: a marker resolves to the stored value of the same field of the stored mcp tool
    with the same server_label and server; anything else is a 400 naming the field."""
    stored = seal(config(mcp(), mcp("wiki", auth="wiki-" + AUTH, url="https://mcp.example/wiki")), cipher)
    view = redacted(stored)
    assert keep_stored(validate_session(view), stored, "openai.session") == stored
    reordered = copy.deepcopy(view)
    reordered["tools"] = [reordered["tools"][2], reordered["tools"][1]]
    kept = keep_stored(validate_session(reordered), stored, "openai.session")
    assert kept["tools"] == [stored["tools"][2], stored["tools"][1]]
    cases = {
        "openai.session.tools[1].authorization": lambda v: v["tools"][1].update(server_url="https://evil.example"),
        "openai.session.tools[1].headers.X-Other": lambda v: v["tools"][1]["headers"].update({"X-Other": REDACTED}),
        "openai.session.tools[1].headers.X-Trace": lambda v: v["tools"][1]["headers"].update({"X-Trace": REDACTED}),
    }
    for field, change in cases.items():
        bad = copy.deepcopy(view)
        change(bad)
        with pytest.raises(InvalidInput) as exc:
            keep_stored(validate_session(bad), stored, "openai.session")
        assert exc.value.field == field and exc.value.code == "invalid_session_config"
    with pytest.raises(InvalidInput) as exc:
        keep_stored(validate_session(view), {}, "openai.session")
    assert exc.value.field == "openai.session.tools[1].authorization"
    copied = copy.deepcopy(view)
    copied["tools"][1]["authorization"] = stored["tools"][2]["authorization"]  # a sealed value as input
    with pytest.raises(InvalidInput) as exc:
        keep_stored(validate_session(copied), stored, "openai.session")
    assert exc.value.field == "openai.session.tools[1].authorization" and "reserved" in exc.value.message


def test_a_tenant_override_carries_plaintext_only(cipher: CountingCipher) -> None:
    """Invariant: a per-request override with the marker or a sealed value is a 400 naming the
    field (after the policy check); the defaults' sealed values pass through a merge untouched."""
    defaults = seal(config(mcp()), cipher)
    assert merge_session(defaults, {"instructions": "x"}, ["instructions"])["tools"] == defaults["tools"]
    for value in (REDACTED, defaults["tools"][1]["authorization"]):
        with pytest.raises(InvalidInput) as exc:
            merge_session(defaults, {"tools": [{**mcp(), "authorization": value}]}, ["tools"])
        assert exc.value.field == "session.tools[0].authorization"
        with pytest.raises(InvalidInput) as exc:
            merge_session(defaults, {"tools": [{**mcp(), "authorization": value}]}, ["instructions"])
        assert exc.value.code == "override_not_allowed"


def test_reseal_rotates_sealed_and_seals_leftover_plaintext() -> None:
    old, new = generate_secret_key(), generate_secret_key()
    sealed = seal(config(mcp()), CredentialCipher([old]))
    legacy = config(mcp("wiki", url="https://mcp.example/wiki"))
    for cfg in (sealed, legacy):
        rotated = reseal(cfg, CredentialCipher([new, old]))
        assert rotated is not None and all(s.value.startswith(SEALED_PREFIX) for s in slots(rotated))
        assert unseal(rotated, CredentialCipher([new]))[0].endswith(AUTH)
    with pytest.raises(CredentialError):
        unseal(reseal(sealed, CredentialCipher([new, old])) or {}, CredentialCipher([old]))
    assert reseal(validate_session({"instructions": "x"}), CredentialCipher([new])) is None


def test_mentions_finds_a_credential_or_a_piece_of_one() -> None:
    assert mentions(f"bad value '{HEADER[3:15]}'", [AUTH, HEADER])
    assert mentions("got 'abcde'", ["abcde"]) and not mentions("got 'abc'", ["abc"])
    assert not mentions("OpenAI rejected the session configuration.", [AUTH, HEADER])


# ---- TenantService -----------------------------------------------------------------------------


async def test_service_stores_sealed_and_views_redacted(redis: aioredis.Redis, cipher: CountingCipher) -> None:
    """Invariant: the tenant record holds MCP credentials only sealed; the view shows the marker;
    a PATCH of the view keeps the very same ciphertexts; without BROKER_SECRET_KEY nothing is stored."""
    service = TenantService(redis, cipher)
    tenant = await service.create(decode_create({"name": "a", "openai": {"session": {"tools": [mcp()]}}}))
    raw = await redis.get(tenant_record(tenant.id))
    assert AUTH.encode() not in raw and HEADER.encode() not in raw and SEALED_PREFIX.encode() in raw
    view = msgspec.to_builtins(TenantView.of(tenant))
    assert view["openai"]["session"]["tools"][0]["authorization"] == REDACTED
    patched = await service.update(tenant.id, decode_patch({"openai": {"session": view["openai"]["session"]}}))
    assert patched.openai.session == tenant.openai.session
    with pytest.raises(InvalidInput) as exc:
        await TenantService(redis, None).create(decode_create({"name": "b", "openai": {"session": {"tools": [mcp()]}}}))
    assert exc.value.code == "secret_key_missing" and exc.value.field == "openai.session.tools[0].authorization"
    assert AUTH not in exc.value.message


async def test_a_session_that_only_fits_in_plaintext_is_refused(redis: aioredis.Redis, cipher: CountingCipher) -> None:
    """Invariant: stored defaults always pass the admission's re-validation, so defaults whose
    sealed form exceeds the size limit are refused at the admin call, naming openai.session."""
    headers = {f"X-{i}": "v" * 2000 for i in range(55)}  # ~110 KB in plaintext, ~150 KB sealed
    body = {"name": "a", "openai": {"session": {"tools": [{**mcp(), "headers": headers}]}}}
    assert len(json.dumps(body)) < MAX_SESSION_BYTES
    with pytest.raises(InvalidInput) as exc:
        await TenantService(redis, cipher).create(decode_create(body))
    assert exc.value.field == "openai.session" and "encrypted" in exc.value.message


async def test_rotate_secrets_counts_and_reencrypts_mcp_only_tenants(redis: aioredis.Redis) -> None:
    """Invariant: rotate_secrets re-encrypts the MCP credentials of every tenant's defaults with the
    first key (a record from before sealing gets sealed), counting tenants with no upstream key."""
    old, new = generate_secret_key(), generate_secret_key()
    before = TenantService(redis, CredentialCipher([old]))
    sealed = await before.create(decode_create({"name": "a", "openai": {"session": {"tools": [mcp()]}}}))
    legacy = await before.create(decode_create({"name": "b"}))
    record = json.loads(await redis.get(tenant_record(legacy.id)))
    record["openai"]["session"]["tools"] = [mcp("wiki", url="https://mcp.example/wiki")]
    await redis.set(tenant_record(legacy.id), json.dumps(record))
    await before.create(decode_create({"name": "bare"}))

    assert await TenantService(redis, CredentialCipher([new, old])).rotate_secrets() == 2
    for tenant_id in (sealed.id, legacy.id):
        raw = await redis.get(tenant_record(tenant_id))
        assert AUTH.encode() not in raw
        session = json.loads(raw)["openai"]["session"]
        assert unseal(copy.deepcopy(session), CredentialCipher([new]))[0] == AUTH
        with pytest.raises(CredentialError):
            unseal(session, CredentialCipher([old]))


# ---- admission ---------------------------------------------------------------------------------


async def _commands(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_info",))


@pytest.fixture
async def sessions(redis: aioredis.Redis, cipher: CountingCipher) -> AsyncIterator[SessionService]:
    yield SessionService(SessionRepository(redis), JobQueue(new_arq_redis(redis.connection_pool)),
                         provision_deadline_s=60, cipher=cipher)


async def test_admission_seals_override_credentials_without_extra_work(
    redis: aioredis.Redis, cipher: CountingCipher, sessions: SessionService
) -> None:
    """Invariant: admission writes the session hash's config with every MCP credential sealed; it
    makes no cipher call for a config without credentials or with the tenant's (already sealed)
    defaults, one per credential of a request's own override, and never an extra Redis command."""
    service = TenantService(redis, cipher)
    plain = await service.create(decode_create({"name": "plain", "openai": {"allowed_overrides": ["tools"]}}))
    with_mcp = await service.create(decode_create(
        {"name": "mcp", "openai": {"session": {"tools": [mcp()]}, "allowed_overrides": ["tools"]}}))
    await sessions.create(plain, CreateSessionRequest(), body=b"", idempotency_key=None)  # loads the script

    async def admit(tenant: Any, req: CreateSessionRequest) -> tuple[int, int, dict[str, Any]]:
        cipher.calls, before = 0, await _commands(redis)
        rec, _ = await sessions.create(tenant, req, body=b"", idempotency_key=None)
        used = await _commands(redis) - before
        raw = await redis.hget(TenantScope(tenant.id).session(rec.id), "config")
        return cipher.calls, used, json.loads(raw)

    calls, baseline, _ = await admit(plain, CreateSessionRequest())
    assert calls == 0
    calls, used, cfg = await admit(with_mcp, CreateSessionRequest())
    assert (calls, used) == (0, baseline) and cfg["tools"] == with_mcp.openai.session["tools"]
    calls, used, _ = await admit(with_mcp, CreateSessionRequest())  # cached defaults
    assert (calls, used) == (0, baseline)
    override = CreateSessionRequest(session={"tools": [mcp("own", url="https://mcp.example/own")]})
    calls, used, cfg = await admit(plain, override)
    assert (calls, used) == (2, baseline)
    assert AUTH not in json.dumps(cfg) and unseal(cfg, cipher) == [AUTH, HEADER]
