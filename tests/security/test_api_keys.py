"""Tenant API keys through the real API: format (prefix, >= 128 random bits, checksum), storage
(only the SHA-256 is kept), several active keys, rotation with an overlap, revocation across
two API processes within 1 s, and ``last_used_at`` without a write per request."""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

import httpx

from broker.core.settings import Settings
from tenants.apikeys import ALPHABET, BODY_LEN, KEY_PREFIX, looks_valid
from tenants.scope import TenantScope
from tests.fixtures.stack import Admin, ApiServer, tenant_client
from tests.fixtures.wait import wait_until

from .support import assert_error, command_calls, leaked_fragments, redis_dump

KEY_COUNT = 40


def _new_key(admin: Admin, tenant_id: str, **body: object) -> dict[str, str]:
    r = admin.http.post(f"/admin/v1/tenants/{tenant_id}/keys", json=body or None)
    assert r.status_code == 201, r.text
    return r.json()


def _status(base_url: str, key: str) -> int:
    return httpx.get(f"{base_url}/v1/sessions", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code


def test_issued_keys_are_prefixed_random_checksummed_and_shown_once(api: ApiServer, admin: Admin) -> None:
    """Invariant: keys from the admin API are sbk_ + >= 128 random bits + checksum; the plaintext
    appears in the create answer only (listings show the id and an 8-character prefix)."""
    tenant, _ = admin.tenant("a")
    created = [_new_key(admin, tenant["id"]) for _ in range(KEY_COUNT)]
    keys = [c["key"] for c in created]
    assert len(set(keys)) == KEY_COUNT
    assert BODY_LEN * math.log2(len(ALPHABET)) >= 128
    for c in created:
        key = c["key"]
        assert key.startswith(KEY_PREFIX) and looks_valid(key)
        assert set(key[len(KEY_PREFIX):len(KEY_PREFIX) + BODY_LEN]) <= set(ALPHABET)
        assert c["prefix"] == key[:8] and c["id"].startswith("key_")
    # the random part is spread over the alphabet at every position (no constant or counter part)
    for pos in range(len(KEY_PREFIX), len(KEY_PREFIX) + BODY_LEN):
        assert len({k[pos] for k in keys}) >= 15, pos
    listing = admin.http.get(f"/admin/v1/tenants/{tenant['id']}/keys")
    assert listing.status_code == 200 and len(listing.json()["data"]) == KEY_COUNT + 1
    for key in keys:
        assert key not in listing.text and key[8:] not in listing.text
        assert not leaked_fragments(key, listing.text, allowed=frozenset({key[:8]}))


def test_mistyped_key_is_refused_without_a_redis_lookup(api: ApiServer, admin: Admin, settings: Settings) -> None:
    """Invariant: a key whose checksum does not match is refused (401) before any key lookup: the
    Redis HGETALL count does not move, while an unknown well-formed key costs one lookup."""
    _, key = admin.tenant("a")
    typo = key[:10] + ("a" if key[10] != "a" else "b") + key[11:]
    swapped = key[:10] + key[11] + key[10] + key[12:] if key[10] != key[11] else key[:-1]
    before = command_calls(settings.redis_url, "hgetall")
    for bad in (typo, swapped, key[:-1], key + "x", key.upper(), " " + key[1:]):
        assert not looks_valid(bad)
        err = assert_error(httpx.get(f"{api.url}/v1/sessions", headers={"Authorization": f"Bearer {bad}"}), 401)
        assert err["code"] == "invalid_api_key" and bad.strip() not in err["message"]
    assert command_calls(settings.redis_url, "hgetall") == before
    assert _status(api.url, key) == 200  # the real key, one character apart, works
    assert command_calls(settings.redis_url, "hgetall") > before


def test_only_hashes_of_keys_are_stored(api: ApiServer, admin: Admin, settings: Settings) -> None:
    """Invariant: no Redis key or value holds a tenant API key or any 8+ character piece of it
    (other than the documented display prefix, its first 8 characters); its SHA-256 is the lookup."""
    tenants = [admin.tenant(name) for name in ("a", "b")]
    keys = [key for t, key in tenants] + [_new_key(admin, t["id"])["key"] for t, _ in tenants for _ in range(3)]
    for key in keys:  # used once, so last_used_at and caches were written too
        assert _status(api.url, key) == 200
    dump = redis_dump(settings.redis_url)
    for key in keys:
        assert key not in dump
        assert not leaked_fragments(key, dump, allowed=frozenset({key[:8]})), key[:8]
        assert f"sb:apikey:{hashlib.sha256(key.encode()).hexdigest()}" in dump


def test_several_keys_are_active_at_once_and_revoking_one_spares_the_others(api: ApiServer, admin: Admin) -> None:
    """Invariant: every issued key of a tenant works; revoking one refuses it alone."""
    tenant, first = admin.tenant("a")
    extra = [_new_key(admin, tenant["id"]) for _ in range(3)]
    keys = [first] + [c["key"] for c in extra]
    assert [_status(api.url, k) for k in keys] == [200] * 4
    assert admin.http.delete(f"/admin/v1/tenants/{tenant['id']}/keys/{extra[0]['id']}").status_code == 200
    wait_until(lambda: _status(api.url, keys[1]) == 401, 1.0, "the revoked key refused (the 1 s revocation bound)")
    assert [_status(api.url, k) for k in (keys[0], keys[2], keys[3])] == [200] * 3


def test_rotation_keeps_the_old_key_for_the_overlap_only(api: ApiServer, admin: Admin) -> None:
    """Invariant: after a rotation with overlap_seconds=N both keys work, the old one stops within
    N s (+1 s rounding +1 s revocation budget), the new one keeps working; overlap 0 revokes at once."""
    tenant, old = admin.tenant("a")
    old_id = admin.http.get(f"/admin/v1/tenants/{tenant['id']}/keys").json()["data"][0]["id"]
    assert _status(api.url, old) == 200
    started = time.monotonic()
    r = admin.http.post(f"/admin/v1/tenants/{tenant['id']}/keys/{old_id}/rotate", json={"overlap_seconds": 2})
    assert r.status_code == 201, r.text
    new = r.json()["key"]
    assert new != old and looks_valid(new)
    assert _status(api.url, new) == 200 and _status(api.url, old) == 200
    listed = {k["id"]: k for k in admin.http.get(f"/admin/v1/tenants/{tenant['id']}/keys").json()["data"]}
    assert listed[old_id]["not_after"] is not None and listed[old_id]["revoked_at"] is None
    wait_until(lambda: _status(api.url, old) != 200, 4.0 - (time.monotonic() - started),
               "the old key refused once its overlap is over", interval=0.05)
    assert time.monotonic() - started >= 1.0  # it did overlap
    assert_error(httpx.get(f"{api.url}/v1/sessions", headers={"Authorization": f"Bearer {old}"}), 401, "invalid_api_key")
    assert _status(api.url, new) == 200
    new_id = r.json()["id"]
    newest = admin.http.post(f"/admin/v1/tenants/{tenant['id']}/keys/{new_id}/rotate", json={"overlap_seconds": 0})
    assert newest.status_code == 201
    wait_until(lambda: _status(api.url, new) == 401, 1.0, "a rotation without overlap revoked the old key")
    assert _status(api.url, newest.json()["key"]) == 200


def test_revocation_reaches_two_api_processes_within_one_second(settings: Settings, admin: Admin, api: ApiServer) -> None:
    """Invariant: a key revoked through one API process is refused by another API process (its own
    app, cache and Redis connections on the same Redis) within 1 s, though both had it cached."""
    other = ApiServer(settings).start()
    try:
        tenant, key = admin.tenant("a")
        key_id = admin.http.get(f"/admin/v1/tenants/{tenant['id']}/keys").json()["data"][0]["id"]
        for _ in range(5):  # warm both processes' caches
            assert _status(api.url, key) == 200 and _status(other.url, key) == 200
        assert admin.http.delete(f"/admin/v1/tenants/{tenant['id']}/keys/{key_id}").status_code == 200
        pending = {api.url, other.url}

        def refused_by_both() -> bool:
            pending.intersection_update({url for url in pending if _status(url, key) != 401})
            return not pending

        wait_until(refused_by_both, 1.0, "the key refused by both API processes", interval=0.01,
                   state=lambda: f"still accepted by {pending}")
        with tenant_client(other.url, key) as c:
            assert_error(c.get("/v1/usage"), 401, "invalid_api_key")
    finally:
        other.stop()


def _writes(pubsub: Any, wait: float) -> list[str]:
    """Keyspace events received within ``wait`` seconds (the commands that wrote the key)."""
    events, deadline = [], time.monotonic() + wait
    while time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if message is not None:
            events.append(message["data"].decode())
    return events


def test_last_used_at_is_recorded_without_a_write_per_request(api: ApiServer, admin: Admin, settings: Settings) -> None:
    """Invariant: the first use of a key writes last_used_at once; the next 30 requests write
    nothing to it (watched with Redis keyspace notifications) and leave the recorded time as it was."""
    import redis as sync_redis

    tenant, key = admin.tenant("a")
    listing = f"/admin/v1/tenants/{tenant['id']}/keys"
    assert admin.http.get(listing).json()["data"][0]["last_used_at"] is None
    client = sync_redis.Redis.from_url(settings.redis_url)
    previous = client.config_get("notify-keyspace-events")["notify-keyspace-events"]
    client.config_set("notify-keyspace-events", "Kh")
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(f"__keyspace@0__:{TenantScope(tenant['id']).keys_last_used()}")
        assert pubsub.get_message(timeout=1)["type"] == "subscribe"
        assert _status(api.url, key) == 200
        assert _writes(pubsub, 0.5) == ["hset"]  # the watch works: the first use was recorded
        first = admin.http.get(listing).json()["data"][0]["last_used_at"]
        assert first is not None
        for _ in range(30):
            assert _status(api.url, key) == 200
        assert _writes(pubsub, 0.3) == []
        assert admin.http.get(listing).json()["data"][0]["last_used_at"] == first
    finally:
        pubsub.close()
        client.config_set("notify-keyspace-events", previous)
        client.close()
