"""The one error tree of the broker, and its one wire shape.

::

    BrokerError                      -> {"error": {"code", "message"[, "field"]}} with .status
     +-- InvalidInput (400)          a field is wrong; names it
     +-- Unauthorized (401)          missing, unknown or revoked key
     +-- Forbidden (403)             tenant disabled
     +-- NotFound (404)              unknown id, or another tenant's id
     +-- Conflict (409)              idempotency key in flight
     +-- PayloadTooLarge (413)
     +-- UnsupportedMediaType (415)
     +-- Unprocessable (422)         idempotency key reused with another body
     +-- BudgetExhausted (402)       a session-second budget is used up (issue 21); Retry-After
     +-- QuotaExceeded (429)         carries Retry-After / RateLimit headers and usage
     +-- ServiceUnavailable (503)    Redis unreachable

Domain code raises these; ``broker.api.errors`` maps them (and every unexpected exception)
to the contract's body. Messages are written for tenants and never contain secrets.
"""

from __future__ import annotations

from typing import Any, ClassVar


class BrokerError(Exception):
    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.field = field
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        err.update(self.extra)
        return {"error": err}


class InvalidInput(BrokerError):
    status = 400
    default_code = "invalid_request"


class Unauthorized(BrokerError):
    status = 401
    default_code = "unauthorized"


class Forbidden(BrokerError):
    status = 403
    default_code = "tenant_disabled"


class NotFound(BrokerError):
    status = 404
    default_code = "not_found"


class Conflict(BrokerError):
    status = 409
    default_code = "idempotency_key_in_flight"


class PayloadTooLarge(BrokerError):
    status = 413
    default_code = "payload_too_large"


class UnsupportedMediaType(BrokerError):
    status = 415
    default_code = "unsupported_media_type"


class Unprocessable(BrokerError):
    status = 422
    default_code = "idempotency_key_reused"


class BudgetExhausted(BrokerError):
    status = 402
    default_code = "budget_exhausted"


class QuotaExceeded(BrokerError):
    status = 429
    default_code = "rate_limited"


class ServiceUnavailable(BrokerError):
    status = 503
    default_code = "service_unavailable"
