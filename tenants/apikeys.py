"""Tenant API keys: their format (prefixed, checksummed, stored only as a hash) and their
lifecycle (:class:`ApiKeyService`: create, revoke, rotate with an overlap).

A key looks like ``sbk_<22 base62 chars: 131 random bits><6 base62 chars: CRC32 of the body>``.
The checksum lets :func:`looks_valid` refuse a mistyped or truncated key without a Redis
round trip (CRC32 detects every single-character change and every adjacent transposition).
Only :func:`hash_key` (SHA-256 hex) of a key is ever stored; the plaintext is shown once.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import zlib
from collections.abc import Callable
from datetime import datetime, timedelta

import msgspec

from broker.core.errors import InvalidInput, NotFound
from tenants.models import ApiKeyCreated, ApiKeyMeta
from tenants.repository import KeyRecord, TenantRepository, parse_rfc3339, rfc3339

KEY_PREFIX = "sbk_"
ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase  # base62
BODY_LEN = 22  # 62**22 > 2**130
CHECKSUM_LEN = 6  # 62**6 > 2**32 (a CRC32 always fits)
KEY_LEN = len(KEY_PREFIX) + BODY_LEN + CHECKSUM_LEN
DISPLAY_PREFIX_LEN = 8  # "sbk_" + 4 body chars: enough to recognise a key in a listing
_ALPHABET_SET = frozenset(ALPHABET)
MAX_ROTATION_OVERLAP_SECONDS = 7 * 86400


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, rem = divmod(number, 62)
        digits.append(ALPHABET[rem])
    return "".join(reversed(digits))


def checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LEN)


def generate_api_key() -> tuple[str, str]:
    """A new key: ``(plaintext, sha256 hex)``. Store the hash, show the plaintext once."""
    body = _random_base62(BODY_LEN)
    key = f"{KEY_PREFIX}{body}{checksum(body)}"
    return key, hash_key(key)


def looks_valid(key: object) -> bool:
    """Format and checksum check, no I/O: refuses typos and truncations before any lookup."""
    if not isinstance(key, str) or len(key) != KEY_LEN or not key.startswith(KEY_PREFIX):
        return False
    rest = key[len(KEY_PREFIX) :]
    if not _ALPHABET_SET.issuperset(rest):
        return False
    body, check = rest[:BODY_LEN], rest[BODY_LEN:]
    return secrets.compare_digest(checksum(body), check)


def hash_key(key: str) -> str:
    """SHA-256 hex of the plaintext (keys carry 131 random bits: no slow hash needed)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_prefix(key: str) -> str:
    return key[:DISPLAY_PREFIX_LEN]


def new_key_id() -> str:
    return "key_" + _random_base62(16)


def _key_not_found() -> NotFound:
    return NotFound("No API key with this id for this tenant.", code="api_key_not_found")


class ApiKeyService:
    """Key lifecycle for one tenant id (the caller checks that the tenant exists).

    Every change to a key's validity (revocation, a shortened ``not_after``) is published on
    ``KEY_REVOCATIONS_CHANNEL`` so every API process drops its cached lookup at once.
    """

    def __init__(self, repo: TenantRepository, clock: Callable[[], datetime]) -> None:
        self._repo = repo
        self._clock = clock

    async def create(self, tenant_id: str, not_after: datetime | None = None) -> ApiKeyCreated:
        now = self._clock()
        if not_after is not None and (not_after.tzinfo is None or not_after <= now):
            raise InvalidInput("not_after must be a future time with a timezone", field="not_after")
        plaintext, key_hash = generate_api_key()
        record = KeyRecord(
            id=new_key_id(),
            key_hash=key_hash,
            prefix=key_prefix(plaintext),
            created_at=rfc3339(now),
            not_after=rfc3339(not_after, round_up=True) if not_after else None,
        )
        await self._repo.insert_key(tenant_id, record)
        return ApiKeyCreated(
            id=record.id, key=plaintext, prefix=record.prefix, created_at=record.created_at, not_after=record.not_after
        )

    async def revoke(self, tenant_id: str, key_id: str) -> ApiKeyMeta:
        """Idempotent: revoking a revoked key answers its metadata again."""
        now = rfc3339(self._clock())
        changed = await self._repo.modify_key(
            tenant_id, key_id, lambda r: r if r.revoked_at else msgspec.structs.replace(r, revoked_at=now)
        )
        if changed is None:
            raise _key_not_found()
        await self._repo.publish_key_changed(changed[1].key_hash)
        return changed[1].meta()

    async def rotate(self, tenant_id: str, key_id: str, overlap_seconds: int) -> ApiKeyCreated:
        """A new key; the old one stays valid ``overlap_seconds`` more (0: revoked at once)."""
        if type(overlap_seconds) is not int or not 0 <= overlap_seconds <= MAX_ROTATION_OVERLAP_SECONDS:
            raise InvalidInput(
                f"overlap_seconds must be an integer 0..{MAX_ROTATION_OVERLAP_SECONDS}", field="overlap_seconds"
            )
        old = await self._repo.get_key(tenant_id, key_id)
        now = self._clock()
        if old is None:
            raise _key_not_found()
        if old.revoked_at is not None or (old.not_after is not None and parse_rfc3339(old.not_after) <= now):
            raise InvalidInput(
                "This API key is revoked or expired; create a new key instead.", code="api_key_inactive", field="key_id"
            )
        created = await self.create(tenant_id)  # first the new key: there is never a moment without one
        deadline = now + timedelta(seconds=overlap_seconds)

        def shorten(r: KeyRecord) -> KeyRecord:
            if r.revoked_at is not None:
                return r
            if overlap_seconds == 0:
                return msgspec.structs.replace(r, revoked_at=rfc3339(now))
            if r.not_after is not None and parse_rfc3339(r.not_after) <= deadline:
                return r  # never extends a key's life
            return msgspec.structs.replace(r, not_after=rfc3339(deadline, round_up=True))

        changed = await self._repo.modify_key(tenant_id, key_id, shorten)
        if changed is not None:
            await self._repo.publish_key_changed(changed[1].key_hash)
        return created

    async def record_use(self, tenant_id: str, key_id: str) -> None:
        await self._repo.touch_key(tenant_id, key_id, rfc3339(self._clock()))

    async def record_uses(self, uses: list[tuple[str, str]]) -> None:
        """``last_used_at`` = now for every (tenant id, key id), in one round trip."""
        await self._repo.touch_keys(uses, rfc3339(self._clock()))
