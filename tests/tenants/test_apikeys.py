"""API key format: prefix, >= 128 random bits, a checksum that refuses every single-character
typo and adjacent transposition without any I/O, and SHA-256 hashes as the only stored form."""

from __future__ import annotations

import hashlib
import math

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.embedded_redis import free_port
from broker.core.errors import Unauthorized
from tenants import apikeys
from tenants.apikeys import ALPHABET, BODY_LEN, KEY_LEN, generate_api_key, hash_key, key_prefix, looks_valid, new_key_id
from tenants.auth import KeyAuthenticator
from tenants.service import TenantService


def test_generated_key_has_prefix_entropy_and_passes_its_own_check() -> None:
    keys = {generate_api_key()[0] for _ in range(200)}
    assert len(keys) == 200
    assert BODY_LEN * math.log2(62) >= 128
    for key in keys:
        assert key.startswith("sbk_") and len(key) == KEY_LEN
        assert set(key[4:]) <= set(ALPHABET)
        assert looks_valid(key)


def test_hash_is_sha256_hex_of_the_plaintext() -> None:
    key, key_hash = generate_api_key()
    assert key_hash == hashlib.sha256(key.encode()).hexdigest() == hash_key(key)
    assert key not in key_hash


def test_every_single_character_substitution_is_refused() -> None:
    """Invariant: changing any one character of the body or checksum makes the key invalid."""
    key, _ = generate_api_key()
    checked = 0
    for pos in range(4, len(key)):
        for char in ALPHABET:
            if char != key[pos]:
                assert not looks_valid(key[:pos] + char + key[pos + 1 :]), (pos, char)
                checked += 1
    assert checked == (len(key) - 4) * 61


def test_adjacent_transpositions_truncation_and_garbage_are_refused() -> None:
    key, _ = generate_api_key()
    for pos in range(4, len(key) - 1):
        if key[pos] != key[pos + 1]:
            swapped = key[:pos] + key[pos + 1] + key[pos] + key[pos + 2 :]
            assert not looks_valid(swapped), pos
    for bad in (key[:-1], key + "a", "sk_" + key[3:], "SBK_" + key[4:], key[:10] + "-" + key[11:], "", None, 42):
        assert not looks_valid(bad)  # type: ignore[arg-type]


def test_prefix_and_ids() -> None:
    key, _ = generate_api_key()
    assert key_prefix(key) == key[:8] and key_prefix(key).startswith("sbk_")
    ids = {new_key_id() for _ in range(100)}
    assert len(ids) == 100 and all(i.startswith("key_") and len(i) == 20 for i in ids)
    assert apikeys.checksum("a" * BODY_LEN) == apikeys.checksum("a" * BODY_LEN)


async def test_mistyped_key_is_refused_without_touching_redis() -> None:
    """Invariant: a malformed key is refused before any Redis call. The client points at a
    port where nothing listens: a well-formed key fails there with a connection error (so the
    client really is unreachable), a mistyped one gets a clean 401 at once."""
    dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    try:
        auth = KeyAuthenticator(dead, TenantService(dead))
        key, _ = generate_api_key()
        typo = key[:-1] + ("a" if key[-1] != "a" else "b")
        # a Redis call would raise the connection error the well-formed key gets below: the 401 is the proof
        with pytest.raises(Unauthorized) as exc:
            await auth.authenticate(typo)
        assert exc.value.code == "invalid_api_key" and typo not in exc.value.message and key[4:] not in str(exc.value)
        with pytest.raises(RedisConnectionError):
            await auth.authenticate(key)
    finally:
        await dead.aclose()
