"""Tenant data: what is stored (``Tenant``), what the admin sends (``TenantCreate`` /
``TenantPatch``) and what the admin API shows (``TenantView``: upstream keys only as
``*_api_key_set`` booleans, MCP credentials of the session config only as the marker
``tenants.session_secrets.REDACTED``; never their values)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from tenants.session_secrets import redacted

EndUserPolicy = Literal["reject", "replace_oldest"]
TenantStatus = Literal["active", "disabled"]

MAX_SESSION_SECONDS_CAP = 7200
DEFAULT_MODEL = "gpt-realtime"
DEFAULT_ALLOWED_OVERRIDES = ("instructions", "audio", "prompt")


class Quotas(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Per-tenant quotas and their defaults (the README's quota table mirrors these)."""

    sessions_per_minute: int = 60
    max_concurrent_sessions: int = 10
    sessions_per_day: int = 1000
    max_session_seconds: int = 3600
    max_sessions_per_end_user: int = 1
    end_user_policy: EndUserPolicy = "reject"
    openai_requests_per_minute: int = 300
    session_seconds_per_month: int | None = None               # budgets (tenants/budgets.py): None = none
    session_seconds_per_end_user_per_month: int | None = None


class OpenAIConfig(msgspec.Struct, kw_only=True):
    # Fernet token of the tenant's OpenAI key; None: use the platform key.
    api_key_enc: str | None = None
    # Default GA realtime session config (validated by tenants.session_config); its MCP
    # credentials are sealed (tenants.session_secrets).
    session: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "realtime", "model": DEFAULT_MODEL})
    allowed_overrides: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_ALLOWED_OVERRIDES))


class AvaturnConfig(msgspec.Struct, kw_only=True):
    api_key_enc: str | None = None
    avatar_id: str = "jane_20240829"
    background: Literal["default", "transparent"] = "default"
    user_absent_timeout: int = 60


class Tenant(msgspec.Struct, kw_only=True):
    id: str
    name: str
    status: TenantStatus = "active"
    created_at: str
    updated_at: str
    quotas: Quotas = msgspec.field(default_factory=Quotas)
    openai: OpenAIConfig = msgspec.field(default_factory=OpenAIConfig)
    avaturn: AvaturnConfig = msgspec.field(default_factory=AvaturnConfig)

    @property
    def active(self) -> bool:
        return self.status == "active"


# ---- admin input -------------------------------------------------------------------------


class OpenAIInput(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    api_key: str | None = None
    session: dict[str, Any] | None = None
    allowed_overrides: list[str] | None = None


class AvaturnInput(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    api_key: str | None = None
    avatar_id: str | None = None
    background: str | None = None
    user_absent_timeout: int | None = None


class TenantCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    quotas: dict[str, Any] | None = None
    openai: OpenAIInput | None = None
    avaturn: AvaturnInput | None = None


class TenantPatch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every field optional; quotas are merged field by field; ``api_key: ""`` clears a key."""

    name: str | None = None
    status: TenantStatus | None = None
    quotas: dict[str, Any] | None = None
    openai: OpenAIInput | None = None
    avaturn: AvaturnInput | None = None


# ---- admin output ------------------------------------------------------------------------


class OpenAIView(msgspec.Struct, kw_only=True):
    api_key_set: bool
    session: dict[str, Any]  # MCP credentials shown as REDACTED: sent back in a PATCH, it keeps them
    allowed_overrides: list[str]


class AvaturnView(msgspec.Struct, kw_only=True):
    api_key_set: bool
    avatar_id: str
    background: str
    user_absent_timeout: int


class TenantView(msgspec.Struct, kw_only=True):
    id: str
    name: str
    status: TenantStatus
    created_at: str
    updated_at: str
    quotas: Quotas
    openai: OpenAIView
    avaturn: AvaturnView

    @classmethod
    def of(cls, t: Tenant) -> TenantView:
        return cls(
            id=t.id,
            name=t.name,
            status=t.status,
            created_at=t.created_at,
            updated_at=t.updated_at,
            quotas=t.quotas,
            openai=OpenAIView(
                api_key_set=t.openai.api_key_enc is not None,
                session=redacted(t.openai.session),
                allowed_overrides=t.openai.allowed_overrides,
            ),
            avaturn=AvaturnView(
                api_key_set=t.avaturn.api_key_enc is not None,
                avatar_id=t.avaturn.avatar_id,
                background=t.avaturn.background,
                user_absent_timeout=t.avaturn.user_absent_timeout,
            ),
        )


class ApiKeyMeta(msgspec.Struct, kw_only=True):
    id: str                       # key_...
    prefix: str                   # first chars of the plaintext, for recognition (e.g. "sbk_AbC1")
    created_at: str
    not_after: str | None = None  # rotation overlap: valid until this time
    revoked_at: str | None = None
    last_used_at: str | None = None


class ApiKeyCreated(msgspec.Struct, kw_only=True):
    id: str
    key: str                      # plaintext, shown once
    prefix: str
    created_at: str
    not_after: str | None = None


# ---- the answers of disable and revoke (the same from the admin API and the CLI) --------------


class TenantDisabled(TenantView, kw_only=True):
    sessions_stopped: int         # active sessions the disable terminated (reason tenant_disabled)


def disabled_view(tenant: Tenant, sessions_stopped: int) -> TenantDisabled:
    return TenantDisabled(**msgspec.structs.asdict(TenantView.of(tenant)), sessions_stopped=sessions_stopped)


class ApiKeyRevoked(ApiKeyMeta, kw_only=True):
    revoked: bool = True          # with revoked_at: when (a repeated revoke answers the first time)


def revoked_view(meta: ApiKeyMeta) -> ApiKeyRevoked:
    return ApiKeyRevoked(**msgspec.structs.asdict(meta))
