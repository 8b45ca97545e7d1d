"""The tenant registry's rules: tenants (create, read, update, disable), their API keys
(create, list, revoke, rotate) and their credentials (encrypted at rest): upstream keys, and
the MCP credentials of the session defaults (:mod:`tenants.session_secrets`).

All Redis access goes through :class:`tenants.repository.TenantRepository`; admin input is
checked here (quotas by :mod:`tenants.quotas`, session defaults by
:mod:`tenants.session_config`) and every refusal is an :class:`InvalidInput` naming the field.
Changes that API processes cache (status, quotas, config, key validity) are announced on
pub/sub so :class:`tenants.auth.KeyAuthenticator` drops its cached copy at once.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import string
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

import msgspec
import redis.asyncio as aioredis

from broker.core.errors import Conflict, InvalidInput, NotFound
from tenants.apikeys import ApiKeyService
from tenants.crypto import CredentialCipher, CredentialError
from tenants.models import (
    DEFAULT_MODEL, ApiKeyCreated, ApiKeyMeta, AvaturnConfig, AvaturnInput, OpenAIInput, Tenant, TenantCreate, TenantPatch,
)
from tenants.quotas import build_quotas
from tenants.repository import TenantNameTaken, TenantRepository, parse_rfc3339, rfc3339, utc_now
from tenants.scope import TenantScope
from tenants.session_config import GA_FIELDS, MAX_SESSION_BYTES, validate_session
from tenants.session_secrets import SEALED_PREFIX, is_sealed, keep_stored, reseal, seal, slots, unseal

__all__ = ["TenantService", "decode_create", "decode_patch", "parse_rfc3339", "rfc3339", "utc_now"]

T = TypeVar("T")
_ID_ALPHABET = string.ascii_letters + string.digits


def _invalid(field: str, message: str, code: str = "invalid_request") -> InvalidInput:
    return InvalidInput(message, code=code, field=field)


# ---- admin input ---------------------------------------------------------------------------


def _decode(body: bytes | str | dict[str, Any], kind: type[T]) -> T:
    try:
        if isinstance(body, (bytes, bytearray, memoryview, str)):
            return msgspec.json.decode(body, type=kind)
        return msgspec.convert(body, kind)
    except msgspec.ValidationError as exc:
        raise _from_validation_error(str(exc)) from None
    except msgspec.DecodeError:
        raise InvalidInput("The request body is not valid JSON.", code="invalid_json") from None


def _from_validation_error(text: str) -> InvalidInput:
    """msgspec's ``Expected `int`, got `str` - at `$.quotas.x``` -> field ``quotas.x``."""
    detail, _, where = text.partition(" - at ")
    path = where.strip("`").rsplit("` in `", 1)[-1]  # "`key` in `$.a`": a bad key of object $.a
    path = path.removeprefix("$").removeprefix(".")
    named = re.fullmatch(r"Object (contains unknown|missing required) field `([^`]*)`", detail)
    if named:
        field = f"{path}.{named[2]}" if path else named[2]
        what = "is not a known field" if named[1].startswith("contains") else "is required"
        return InvalidInput(f"{field} {what}", code="invalid_request", field=field)
    if not path:
        return InvalidInput(f"The request body is invalid: {detail}", code="invalid_request")
    return InvalidInput(f"{path} is invalid: {detail[:1].lower()}{detail[1:]}", code="invalid_request", field=path)


def decode_create(body: bytes | str | dict[str, Any]) -> TenantCreate:
    """JSON bytes (or an already parsed dict) -> TenantCreate, or InvalidInput naming the field."""
    return _decode(body, TenantCreate)


def decode_patch(body: bytes | str | dict[str, Any]) -> TenantPatch:
    return _decode(body, TenantPatch)


def _check_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 128 or not name.isprintable():
        raise _invalid("name", "name must be 1..128 printable characters")
    return name


def _check_overrides(names: list[str]) -> list[str]:
    out: list[str] = []
    for i, name in enumerate(names):
        if name not in GA_FIELDS:
            raise _invalid(
                f"openai.allowed_overrides[{i}]",
                f"openai.allowed_overrides[{i}] must be a top-level GA session field ({', '.join(sorted(GA_FIELDS))})",
            )
        if name not in out:
            out.append(name)
    return out


def _apply_avaturn(cfg: AvaturnConfig, inp: AvaturnInput, api_key_enc: Callable[[], str | None]) -> AvaturnConfig:
    changes: dict[str, Any] = {}
    if inp.avatar_id is not None:
        if not 1 <= len(inp.avatar_id) <= 128 or not inp.avatar_id.isprintable():
            raise _invalid("avaturn.avatar_id", "avaturn.avatar_id must be 1..128 printable characters")
        changes["avatar_id"] = inp.avatar_id
    if inp.background is not None:
        if inp.background not in ("default", "transparent"):
            raise _invalid("avaturn.background", 'avaturn.background must be "default" or "transparent"')
        changes["background"] = inp.background
    if inp.user_absent_timeout is not None:
        if not 10 <= inp.user_absent_timeout <= 86400:
            raise _invalid("avaturn.user_absent_timeout", "avaturn.user_absent_timeout must be 10..86400 seconds")
        changes["user_absent_timeout"] = inp.user_absent_timeout
    if inp.api_key is not None:
        changes["api_key_enc"] = api_key_enc()
    return msgspec.structs.replace(cfg, **changes)


# ---- the service ---------------------------------------------------------------------------


class TenantService:
    def __init__(
        self,
        redis: aioredis.Redis,
        cipher: CredentialCipher | None = None,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.repo = TenantRepository(redis)
        self._redis = redis
        self.keys = ApiKeyService(self.repo, clock)
        self._cipher = cipher
        self._clock = clock

    # ---- tenants ---------------------------------------------------------------------

    def build(self, data: TenantCreate) -> Tenant:
        """The tenant ``create`` would store (every field checked), without storing it."""
        now = rfc3339(self._clock())
        tenant = Tenant(
            id="ten_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(22)),
            name=_check_name(data.name),
            created_at=now,
            updated_at=now,
            quotas=build_quotas(data.quotas),
        )
        return self._apply_config(tenant, data.openai, data.avaturn)

    async def create(self, data: TenantCreate) -> Tenant:
        """409 ``tenant_name_taken`` when another tenant has this name (names are unique per
        deployment, taken atomically: of two concurrent creates of one name, one wins)."""
        tenant = self.build(data)
        try:
            await self.repo.insert(tenant)
        except TenantNameTaken as exc:
            raise _name_taken(exc) from None
        return tenant

    async def find_by_name(self, name: str) -> Tenant | None:
        tenant_id = await self.repo.find_by_name(name.strip())
        return None if tenant_id is None else await self.repo.get(tenant_id)

    async def get(self, tenant_id: str) -> Tenant:
        tenant = await self.repo.get(tenant_id) if _plausible_id(tenant_id, "ten_") else None
        if tenant is None:
            raise NotFound("No tenant with this id.", code="tenant_not_found")
        return tenant

    async def list(self, limit: int = 20, cursor: str | None = None) -> tuple[list[Tenant], str | None]:
        """Tenants oldest first; ``cursor`` is the opaque ``next_cursor`` of the previous page."""
        if not 1 <= limit <= 100:
            raise _invalid("limit", "limit must be between 1 and 100")
        ids, after = await self.repo.page(limit, _decode_cursor(cursor) if cursor else None)
        tenants = await self.repo.get_many(ids)
        next_cursor = base64.urlsafe_b64encode(f"{after[0]}:{after[1]}".encode()).decode() if after else None
        return tenants, next_cursor

    async def update(self, tenant_id: str, patch: TenantPatch) -> Tenant:
        """Merge ``patch``: quotas field by field; ``openai.session`` and ``allowed_overrides`` are
        replaced whole (the session is validated; an MCP credential sent as the view's marker
        keeps the stored one); ``api_key: ""`` clears a key. A new ``name`` taken by another
        tenant: 409 ``tenant_name_taken``."""
        return await self._modify(tenant_id, lambda tenant: self.patched(tenant, patch))

    def patched(self, tenant: Tenant, patch: TenantPatch) -> Tenant:
        """``tenant`` with ``patch`` applied (every field checked), without storing it."""
        changes: dict[str, Any] = {"updated_at": rfc3339(self._clock())}
        if patch.name is not None:
            changes["name"] = _check_name(patch.name)
        if patch.status is not None:
            if patch.status not in ("active", "disabled"):
                raise _invalid("status", 'status must be "active" or "disabled"')
            changes["status"] = patch.status
        if patch.quotas is not None:
            changes["quotas"] = build_quotas(patch.quotas, tenant.quotas)
        return self._apply_config(msgspec.structs.replace(tenant, **changes), patch.openai, patch.avaturn)

    def same_settings(self, a: Tenant, b: Tenant) -> bool:
        """Whether two versions of a tenant hold the same settings: ``updated_at`` aside, and
        credentials compared by their plaintext (each encryption of one value differs)."""
        return self._comparable(a) == self._comparable(b)

    def _comparable(self, tenant: Tenant) -> Any:
        out = msgspec.to_builtins(tenant)
        out.pop("updated_at", None)
        if self._cipher is not None:
            for part in ("openai", "avaturn"):
                token = out[part].get("api_key_enc")
                out[part]["api_key_enc"] = None if token is None else self._cipher.decrypt(token)
            if slots(out["openai"]["session"]):
                unseal(out["openai"]["session"], self._cipher)
        return out

    async def disable(self, tenant_id: str) -> Tenant:
        return await self.update(tenant_id, TenantPatch(status="disabled"))

    async def enable(self, tenant_id: str) -> Tenant:
        return await self.update(tenant_id, TenantPatch(status="active"))

    async def _modify(self, tenant_id: str, change: Callable[[Tenant], Tenant]) -> Tenant:
        if not _plausible_id(tenant_id, "ten_"):
            raise NotFound("No tenant with this id.", code="tenant_not_found")
        try:
            tenant = await self.repo.modify(tenant_id, change)
        except TenantNameTaken as exc:
            raise _name_taken(exc) from None
        if tenant is None:
            raise NotFound("No tenant with this id.", code="tenant_not_found")
        await self.repo.publish_tenant_changed(tenant_id)
        return tenant

    def _apply_config(self, tenant: Tenant, openai: OpenAIInput | None, avaturn: AvaturnInput | None) -> Tenant:
        changes: dict[str, Any] = {}
        if openai is not None:
            oa: dict[str, Any] = {}
            if openai.session is not None:
                session = validate_session(openai.session, "openai.session")
                oa["session"] = self._stored_session({**session, "model": session.get("model", DEFAULT_MODEL)},
                                                     tenant.openai.session)
            if openai.allowed_overrides is not None:
                oa["allowed_overrides"] = _check_overrides(openai.allowed_overrides)
            if openai.api_key is not None:
                oa["api_key_enc"] = self._encrypt(openai.api_key, "openai.api_key")
            changes["openai"] = msgspec.structs.replace(tenant.openai, **oa)
        if avaturn is not None:
            key = avaturn.api_key
            changes["avaturn"] = _apply_avaturn(
                tenant.avaturn, avaturn, lambda: self._encrypt(key or "", "avaturn.api_key")
            )
        return msgspec.structs.replace(tenant, **changes)

    def _stored_session(self, session: dict[str, Any], stored: dict[str, Any]) -> dict[str, Any]:
        """The validated ``openai.session`` as stored: a ``REDACTED`` credential keeps the stored
        one, the others are sealed (:mod:`tenants.session_secrets`). The sealed form must fit the
        size limit too, since every admission re-validates the stored defaults."""
        session = seal(keep_stored(session, stored, "openai.session"), self._cipher, "openai.session")
        size = len(msgspec.json.encode(session))
        if size > MAX_SESSION_BYTES:
            raise _invalid(
                "openai.session",
                f"openai.session is too large once its MCP credentials are encrypted at rest ({size} bytes "
                f"serialized; at most {MAX_SESSION_BYTES})",
                code="invalid_session_config",
            )
        return session

    def _encrypt(self, api_key: str, field: str) -> str | None:
        """``""`` clears the credential (the platform's is used); anything else is encrypted."""
        if api_key == "":
            return None
        if len(api_key) > 1024 or any(c.isspace() or not c.isprintable() for c in api_key):
            raise _invalid(field, f"{field} must be at most 1024 printable characters without spaces")
        if self._cipher is None:
            raise _invalid(
                field,
                f"{field} cannot be stored: BROKER_SECRET_KEY is not set, and tenant credentials are only "
                "stored encrypted (generate a key with `session-broker secrets generate`)",
                code="secret_key_missing",
            )
        return self._cipher.encrypt(api_key)

    # ---- credentials -----------------------------------------------------------------

    def credentials(self, tenant: Tenant) -> tuple[str | None, str | None]:
        """(openai key, avaturn key) in plaintext; None where the tenant brings none (the worker
        then uses the platform's). A stored key that cannot be decrypted raises CredentialError:
        it never silently falls back to the platform's key."""
        return self._decrypt(tenant.openai.api_key_enc), self._decrypt(tenant.avaturn.api_key_enc)

    def _decrypt(self, token: str | None) -> str | None:
        if token is None:
            return None
        if self._cipher is None:
            raise CredentialError("a tenant credential is stored but BROKER_SECRET_KEY is not set")
        return self._cipher.decrypt(token)

    async def rotate_secrets(self) -> int:
        """:meth:`rotate_all`, the count of tenants rewritten; CredentialError (nothing written)
        when some stored credential cannot be decrypted."""
        report = await self.rotate_all()
        if report.refused:
            raise CredentialError(
                f"credentials of {len(report.refused)} tenant(s) cannot be decrypted with any configured "
                "BROKER_SECRET_KEY: nothing was re-encrypted"
            )
        return sum(1 for line in report.lines if line.outcome == "rotated")

    async def rotate_all(self) -> RotationReport:
        """Re-encrypt every tenant's credentials (upstream keys, the MCP credentials of its
        session defaults, its webhook endpoints' signing secrets) with the first BROKER_SECRET_KEY; afterwards the older keys can be
        dropped from BROKER_SECRET_KEY. Session hashes are not rewritten: a session's config is
        opened only while it is provisioned (at most ``BROKER_PROVISION_DEADLINE_SECONDS``), so
        the old key must stay until those have settled.

        Every record is checked first; if any credential cannot be decrypted with the configured
        keys, nothing is written (``refused``) and each tenant's line says what it would be (or
        which record cannot be decrypted). Otherwise every tenant whose credentials are not all
        under the first key already is rewritten (WATCH/MULTI, re-checked on the fresh record)."""
        cipher = self._cipher
        if cipher is None:
            raise CredentialError("BROKER_SECRET_KEY is not set: nothing can be re-encrypted")
        lines: list[RotationLine] = []
        webhook_stale: dict[str, list[tuple[str, str, str, str]]] = {}
        tenant_stale: set[str] = set()
        async for tenant_id in self.repo.iter_ids():
            tenant = await self.repo.get(tenant_id)
            if tenant is not None:
                line = _rotation_check(tenant, cipher)
                if line.outcome == "rotated":
                    tenant_stale.add(tenant_id)
                hooks = await self._webhook_tokens(tenant_id)
                bad, stale = _webhook_check(hooks, cipher)
                webhook_stale[tenant_id] = stale
                lines.append(_merge_webhooks(line, [b[0] for b in bad], [t[0] for t in stale]))
        refused = [line for line in lines if line.outcome == "cannot-decrypt"]
        if refused:
            lines = [RotationLine(line.tenant_id, "rotatable", line.records) if line.outcome == "rotated" else line
                     for line in lines]
            return RotationReport(lines, refused)
        written: list[RotationLine] = []
        for line in lines:
            if line.outcome == "rotated":
                for _, key, field, token in webhook_stale.get(line.tenant_id, []):
                    # only if unchanged meanwhile (a secret rotated by the tenant since is under the first key)
                    await self._redis.eval(_SWAP_FIELD, 1, key, field, token, cipher.rotate(token))
                if line.tenant_id in tenant_stale:
                    try:
                        if await self.repo.modify(line.tenant_id, lambda t: _rotated(t, cipher)) is None:
                            line = RotationLine(line.tenant_id, "unchanged", ("deleted meanwhile",))
                    except CredentialError:  # changed meanwhile to a credential no key opens
                        line = _rotation_check(await self.repo.get(line.tenant_id) or _gone(line.tenant_id), cipher)
            written.append(line)
        return RotationReport(written, [line for line in written if line.outcome == "cannot-decrypt"])

    async def _webhook_tokens(self, tenant_id: str) -> list[tuple[str, str, str, str]]:
        """(record name, hash key, field, stored value) of the tenant's webhook signing secrets
        (``broker/webhooks/__init__.py``: ``secret_enc``, ``prev_secret_enc``)."""
        redis = self._redis
        scope = TenantScope(tenant_id)
        out: list[tuple[str, str, str, str]] = []
        for weid in sorted(m.decode() for m in await redis.smembers(scope.webhook_endpoints())):
            key = scope.webhook_endpoint(weid)
            for field, value in zip(_WEBHOOK_FIELDS, await redis.hmget(key, *_WEBHOOK_FIELDS), strict=True):
                if value:
                    out.append((f"webhook.{weid}.{field.removesuffix('_enc')}", key, field, value.decode()))
        return out

    # ---- API keys --------------------------------------------------------------------

    async def create_key(self, tenant_id: str, not_after: datetime | None = None) -> ApiKeyCreated:
        await self.get(tenant_id)
        return await self.keys.create(tenant_id, not_after)

    async def list_keys(self, tenant_id: str) -> list[ApiKeyMeta]:
        await self.get(tenant_id)
        return await self.repo.list_keys(tenant_id)

    async def revoke_key(self, tenant_id: str, key_id: str) -> ApiKeyMeta:
        """Idempotent; every API process stops accepting the key within a second."""
        await self.get(tenant_id)
        return await self.keys.revoke(tenant_id, key_id)

    async def rotate_key(self, tenant_id: str, key_id: str, overlap_seconds: int = 3600) -> ApiKeyCreated:
        """A new key; the old one stays valid for ``overlap_seconds`` more (0: revoked now)."""
        await self.get(tenant_id)
        return await self.keys.rotate(tenant_id, key_id, overlap_seconds)

    async def record_key_use(self, tenant_id: str, key_id: str) -> None:
        await self.keys.record_use(tenant_id, key_id)


class RotationLine(NamedTuple):
    """One tenant's outcome of a rotation: ``rotated`` (or ``rotatable`` when the run was
    refused), ``unchanged`` (no credential, or all under the first key already), or
    ``cannot-decrypt``; ``records`` names the credentials concerned (never their values)."""

    tenant_id: str
    outcome: str
    records: tuple[str, ...]


class RotationReport(NamedTuple):
    lines: list[RotationLine]
    refused: list[RotationLine]  # non-empty: nothing was written


def _tokens(tenant: Tenant) -> list[tuple[str, str]]:
    """(record name, stored value) of every credential of ``tenant``; MCP values are sealed
    tokens or plaintext left by an older version."""
    out = [(name, enc) for name, enc in (("openai.api_key", tenant.openai.api_key_enc),
                                         ("avaturn.api_key", tenant.avaturn.api_key_enc)) if enc]
    out += [(f"openai.{slot.path}", slot.value) for slot in slots(tenant.openai.session)]
    return out


def _rotation_check(tenant: Tenant, cipher: CredentialCipher) -> RotationLine:
    bad, stale = [], []
    for name, value in _tokens(tenant):
        sealed = not name.startswith("openai.session") or is_sealed(value)
        token = value[len(SEALED_PREFIX):] if name.startswith("openai.session") and sealed else value
        if not sealed:
            stale.append(name)  # plaintext of an older version: sealed by the rotation
        elif not cipher.is_current(token):
            try:
                cipher.decrypt(token)
                stale.append(name)
            except CredentialError:
                bad.append(name)
    if bad:
        return RotationLine(tenant.id, "cannot-decrypt", tuple(bad))
    if stale:
        return RotationLine(tenant.id, "rotated", tuple(stale))
    return RotationLine(tenant.id, "unchanged", ("no stored credential",) if not _tokens(tenant) else ())


_WEBHOOK_FIELDS = ("secret_enc", "prev_secret_enc")
# KEYS: a hash; ARGV: field, expected value, new value. Sets the field only if it still holds
# the expected value.
_SWAP_FIELD = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) return 1 end
return 0
"""


def _webhook_check(hooks: list[tuple[str, str, str, str]], cipher: CredentialCipher
                   ) -> tuple[list[tuple[str, str, str, str]], list[tuple[str, str, str, str]]]:
    """(the webhook secrets no key decrypts, those not under the first key)."""
    bad, stale = [], []
    for hook in hooks:
        token = hook[3]
        if cipher.is_current(token):
            continue
        try:
            cipher.decrypt(token)
            stale.append(hook)
        except CredentialError:
            bad.append(hook)
    return bad, stale


def _merge_webhooks(line: RotationLine, bad: list[str], stale: list[str]) -> RotationLine:
    """A tenant's line with its webhook secrets: cannot-decrypt wins, then rotated."""
    if line.outcome == "cannot-decrypt" or bad:
        own = line.records if line.outcome == "cannot-decrypt" else ()
        return RotationLine(line.tenant_id, "cannot-decrypt", (*own, *bad))
    if line.outcome == "rotated" or stale:
        own = line.records if line.outcome == "rotated" else ()
        return RotationLine(line.tenant_id, "rotated", (*own, *stale))
    return line


def _rotated(tenant: Tenant, cipher: CredentialCipher) -> Tenant:
    oa, av = tenant.openai, tenant.avaturn
    session = reseal(oa.session, cipher)
    return msgspec.structs.replace(
        tenant,
        openai=msgspec.structs.replace(oa, api_key_enc=oa.api_key_enc and cipher.rotate(oa.api_key_enc),
                                       session=oa.session if session is None else session),
        avaturn=msgspec.structs.replace(av, api_key_enc=av.api_key_enc and cipher.rotate(av.api_key_enc)),
    )


def _gone(tenant_id: str) -> Tenant:
    raise CredentialError(f"tenant {tenant_id} changed during the rotation and could not be read back")


def _name_taken(exc: TenantNameTaken) -> Conflict:
    return Conflict(f"A tenant named {exc.name!r} already exists ({exc.owner_id}); tenant names are unique.",
                    code="tenant_name_taken", field="name")


def _has_credentials(tenant: Tenant) -> bool:
    return (tenant.openai.api_key_enc is not None or tenant.avaturn.api_key_enc is not None
            or bool(slots(tenant.openai.session)))


def _plausible_id(value: str, prefix: str) -> bool:
    return isinstance(value, str) and value.startswith(prefix) and 4 < len(value) <= 64 and ":" not in value


def _decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        ms, _, tenant_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
        if not tenant_id:
            raise ValueError
        return int(ms), tenant_id
    except (ValueError, binascii.Error, UnicodeError):
        raise _invalid("cursor", "cursor is not a next_cursor value from a previous page", "invalid_cursor") from None
