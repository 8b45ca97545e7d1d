"""Settings: read from the environment once, in one place, and passed down.

Nothing else in the project reads ``os.environ``. A missing or malformed value raises
:class:`SettingsError` whose message is one line naming the variable; the CLI prints it
and exits 2.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from urllib.parse import urlparse

import msgspec

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_AVATURN_BASE_URL = "https://api.avaturn.live/api/v1"
DEFAULT_SENTINEL_SERVICE = "mymaster"
MIN_MINT_WINDOW_SECONDS = 10.0   # the admission's mint window is never shorter (unless the deadline is)


class SettingsError(ValueError):
    """One line naming the variable at fault."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    redis_url: str = DEFAULT_REDIS_URL
    redis_configured: bool = False       # BROKER_REDIS_URL was set (``dev`` embeds Redis otherwise)
    # Redis Sentinel (HA): when set, the master of ``redis_sentinel_service`` is found through these
    # sentinels; BROKER_REDIS_URL then only supplies credentials, db and TLS (``rediss://``).
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_service: str = DEFAULT_SENTINEL_SERVICE
    admin_token: str | None = None
    secret_keys: tuple[str, ...] = ()
    openai_base_url: str = DEFAULT_OPENAI_BASE_URL
    avaturn_base_url: str = DEFAULT_AVATURN_BASE_URL
    openai_api_key: str | None = None
    avaturn_api_key: str | None = None
    # Tuning knobs (documented in docs/operations.md, "Settings"; all optional).
    provision_deadline_seconds: float = 60.0
    upstream_timeout_seconds: float = 10.0
    # Time kept after a session's mint slot for the mint and the create themselves; None: twice
    # the upstream timeout (one full attempt of each). See :meth:`mint_window_seconds`.
    provision_margin_seconds: float | None = None
    worker_max_jobs: int = 500
    # session.expiring is recorded this long before expires_at (contract: 60 s; workers/expiry.py)
    session_expiring_lead_seconds: float = 60.0
    log_format: str = "json"
    log_level: str = "INFO"
    library_log_level: str = "WARNING"   # arq, httpx, httpx2, openai: INFO logs a line per job/request
    metrics_top_tenants: int = 20
    access_log: str = "all"              # API access lines: all | errors (status >= 400) | off
    # HTTP input limits of the API's ports (CONTRACT.md section 14; broker/api/http_guard.py)
    http_max_header_bytes: int = 16 * 1024    # request line + headers: more is a 431, connection closed
    http_header_timeout_seconds: float = 10.0  # headers not complete this long after they began: dropped
    http_body_timeout_seconds: float = 30.0    # no body bytes for this long mid-body: dropped
    # Tracing (broker/core/tracing.py), from OpenTelemetry's standard variables: otlp | console | none
    otel_traces_exporter: str = "none"
    otel_service_name: str | None = None
    # Webhooks (contract section 11): http and private/loopback endpoint addresses (development, tests)
    webhook_allow_private: bool = False

    def __repr__(self) -> str:  # never print secrets
        return (
            f"Settings(redis_url={_redact_url(self.redis_url)!r}, admin_token={'set' if self.admin_token else None}, "
            f"secret_keys={len(self.secret_keys)} key(s), openai_base_url={self.openai_base_url!r}, "
            f"avaturn_base_url={self.avaturn_base_url!r}, webhook_allow_private={self.webhook_allow_private})"
        )

    __str__ = __repr__

    def mint_window_seconds(self) -> float:
        """How far ahead of now a new session's mint slot may be for it to be admitted: the
        provisioning deadline minus the margin, at least ``MIN_MINT_WINDOW_SECONDS`` (a margin
        that eats the deadline would otherwise refuse everything but the burst), at most the
        deadline."""
        return mint_window(self.provision_deadline_seconds, self.provision_margin_seconds,
                           self.upstream_timeout_seconds)

    def require_secret_key(self) -> None:
        if not self.secret_keys:
            raise SettingsError(
                "BROKER_SECRET_KEY is not set: generate one with `session-broker secrets generate`"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            redis_url=_redis_url(env),
            redis_configured=_optional(env, "BROKER_REDIS_URL") is not None,
            redis_sentinels=_sentinels(env),
            redis_sentinel_service=_sentinel_service(env),
            admin_token=_optional(env, "BROKER_ADMIN_TOKEN"),
            secret_keys=_secret_keys(env),
            openai_base_url=_http_url(env, "BROKER_OPENAI_BASE_URL", DEFAULT_OPENAI_BASE_URL),
            avaturn_base_url=_http_url(env, "BROKER_AVATURN_BASE_URL", DEFAULT_AVATURN_BASE_URL),
            openai_api_key=_optional(env, "BROKER_OPENAI_API_KEY"),
            avaturn_api_key=_optional(env, "BROKER_AVATURN_API_KEY"),
            provision_deadline_seconds=_number(env, "BROKER_PROVISION_DEADLINE_SECONDS", 60.0, 5.0, 3600.0),
            upstream_timeout_seconds=_number(env, "BROKER_UPSTREAM_TIMEOUT_SECONDS", 10.0, 0.5, 120.0),
            provision_margin_seconds=(None if _optional(env, "BROKER_PROVISION_MARGIN_SECONDS") is None
                                      else _number(env, "BROKER_PROVISION_MARGIN_SECONDS", 0.0, 0.0, 3600.0)),
            worker_max_jobs=int(_number(env, "BROKER_WORKER_MAX_JOBS", 500, 1, 10000)),
            session_expiring_lead_seconds=_number(env, "BROKER_SESSION_EXPIRING_LEAD_SECONDS", 60.0, 1.0, 3600.0),
            log_format=_choice(env, "BROKER_LOG_FORMAT", "json", ("json", "console")),
            log_level=_choice(env, "BROKER_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            library_log_level=_choice(env, "BROKER_LIBRARY_LOG_LEVEL", "WARNING",
                                      ("DEBUG", "INFO", "WARNING", "ERROR")),
            metrics_top_tenants=int(_number(env, "BROKER_METRICS_TOP_TENANTS", 20, 0, 1000)),
            access_log=_choice(env, "BROKER_ACCESS_LOG", "all", ("all", "errors", "off")),
            http_max_header_bytes=int(_number(env, "BROKER_HTTP_MAX_HEADER_BYTES", 16 * 1024, 1024, 1024 * 1024)),
            http_header_timeout_seconds=_number(env, "BROKER_HTTP_HEADER_TIMEOUT_SECONDS", 10.0, 0.1, 300.0),
            http_body_timeout_seconds=_number(env, "BROKER_HTTP_BODY_TIMEOUT_SECONDS", 30.0, 0.1, 600.0),
            otel_traces_exporter=_traces_exporter(env),
            otel_service_name=_optional(env, "OTEL_SERVICE_NAME"),
            webhook_allow_private=_bool(env, "BROKER_WEBHOOK_ALLOW_PRIVATE", False),
        )


def mint_window(deadline_s: float, margin_s: float | None = None, upstream_timeout_s: float = 10.0) -> float:
    """``deadline - margin`` (margin default ``2 x upstream_timeout``), clamped to
    ``[min(MIN_MINT_WINDOW_SECONDS, deadline), deadline]``."""
    margin = 2 * upstream_timeout_s if margin_s is None else margin_s
    return min(deadline_s, max(MIN_MINT_WINDOW_SECONDS, deadline_s - margin))


def _optional(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _redis_url(env: Mapping[str, str]) -> str:
    value = _optional(env, "BROKER_REDIS_URL") or DEFAULT_REDIS_URL
    parsed = urlparse(value)
    if parsed.scheme not in ("redis", "rediss", "unix") or (parsed.scheme != "unix" and not parsed.hostname):
        raise SettingsError("BROKER_REDIS_URL must look like redis://host:port/db or rediss://host:port/db")
    try:
        parsed.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise SettingsError("BROKER_REDIS_URL has a malformed port") from exc
    # redis-py reads a path that is not a number as db 0, silently: refuse it like any other
    # malformed value (redis://host:port/abc is a typo, not a request for db 0)
    db = parsed.path.removeprefix("/")
    if parsed.scheme != "unix" and db and not (db.isascii() and db.isdigit()):
        raise SettingsError(
            f"BROKER_REDIS_URL has a malformed database number {db[:32]!r}: use redis://host:port/N with N a number"
        )
    return value


def _sentinels(env: Mapping[str, str]) -> tuple[tuple[str, int], ...]:
    raw = _optional(env, "BROKER_REDIS_SENTINELS")
    if raw is None:
        return ()
    found: list[tuple[str, int]] = []
    for part in (p.strip() for p in raw.split(",") if p.strip()):
        host, sep, port = part.rpartition(":")
        host = host.strip("[]")  # [::1]:26379
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(
                "BROKER_REDIS_SENTINELS must be comma-separated host:port pairs, e.g. sentinel-0:26379,sentinel-1:26379"
            )
        found.append((host, int(port)))
    return tuple(found)


def _sentinel_service(env: Mapping[str, str]) -> str:
    value = _optional(env, "BROKER_REDIS_SENTINEL_SERVICE") or DEFAULT_SENTINEL_SERVICE
    if not all(c.isalnum() or c in "._-" for c in value):
        raise SettingsError("BROKER_REDIS_SENTINEL_SERVICE must be a sentinel master name (letters, digits, . _ -)")
    return value


def _http_url(env: Mapping[str, str], name: str, default: str) -> str:
    value = _optional(env, name) or default
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SettingsError(f"{name} must be an http(s) URL, got a malformed value")
    return value.rstrip("/")


def _secret_keys(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = _optional(env, "BROKER_SECRET_KEY")
    if raw is None:
        return ()
    keys = tuple(part.strip() for part in raw.split(",") if part.strip())
    for key in keys:
        try:
            decoded = base64.urlsafe_b64decode(key.encode())
        except (binascii.Error, ValueError):
            decoded = b""
        if len(decoded) != 32:
            raise SettingsError(
                "BROKER_SECRET_KEY must be urlsafe-base64 32-byte key(s), comma-separated "
                "(`session-broker secrets generate` prints one)"
            )
    return keys


def _number(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = _optional(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be a number between {lo:g} and {hi:g}") from exc
    if not lo <= value <= hi:
        raise SettingsError(f"{name} must be a number between {lo:g} and {hi:g}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = _optional(env, name)
    if raw is None:
        return default
    for choice in choices:
        if raw.lower() == choice.lower():
            return choice
    raise SettingsError(f"{name} must be one of {', '.join(choices)}")


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    """``true``/``false`` (any case; also ``1``/``0``, ``yes``/``no``, ``on``/``off``)."""
    raw = _optional(env, name)
    if raw is None:
        return default
    value = raw.lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false")


def _traces_exporter(env: Mapping[str, str]) -> str:
    """OpenTelemetry's variables, as CONTRACT.md section 13 reads them: tracing is off unless
    ``OTEL_TRACES_EXPORTER`` names an exporter or an OTLP endpoint is set (then OTLP over HTTP,
    protobuf: the only protocol shipped); ``OTEL_SDK_DISABLED=true`` turns it off."""
    if (_optional(env, "OTEL_SDK_DISABLED") or "").lower() == "true":
        return "none"
    raw = _optional(env, "OTEL_TRACES_EXPORTER")
    if raw is not None:
        kind = raw.lower()
        if kind not in ("otlp", "console", "none"):
            raise SettingsError("OTEL_TRACES_EXPORTER must be one of otlp, console, none")
    elif _optional(env, "OTEL_EXPORTER_OTLP_ENDPOINT") or _optional(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        kind = "otlp"
    else:
        return "none"
    if kind == "otlp":
        for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = _optional(env, name)
            if protocol is not None:
                if protocol != "http/protobuf":
                    raise SettingsError(f"{name} must be http/protobuf (the only OTLP protocol shipped)")
                break
    return kind


def _redact_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(parsed.password, "***")
    return url
