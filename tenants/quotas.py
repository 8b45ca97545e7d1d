"""Validation of a tenant's quotas (admin input -> :class:`tenants.models.Quotas`)."""

from __future__ import annotations

from typing import Any

import msgspec

from broker.core.errors import InvalidInput
from tenants.models import MAX_SESSION_SECONDS_CAP, Quotas

CODE = "invalid_quota"

# name -> inclusive integer range
INT_RANGES: dict[str, tuple[int, int]] = {
    "sessions_per_minute": (1, 100_000),
    "max_concurrent_sessions": (1, 100_000),
    "sessions_per_day": (1, 10_000_000),
    "max_session_seconds": (10, MAX_SESSION_SECONDS_CAP),
    "max_sessions_per_end_user": (1, 1000),
    "openai_requests_per_minute": (1, 100_000),
}
# name -> inclusive integer range, or null for none (the session-second budgets)
NULLABLE_INT_RANGES: dict[str, tuple[int, int]] = {
    "session_seconds_per_month": (60, 1_000_000_000),
    "session_seconds_per_end_user_per_month": (60, 1_000_000_000),
}
END_USER_POLICIES = ("reject", "replace_oldest")
FIELDS = (*INT_RANGES, "end_user_policy", *NULLABLE_INT_RANGES)


def build_quotas(raw: dict[str, Any] | None, base: Quotas | None = None) -> Quotas:
    """``base`` (or the defaults) with the fields of ``raw`` applied, each checked.

    Raises :class:`InvalidInput` with ``field="quotas.<name>"`` for an unknown name or a
    value out of range.
    """
    base = base if base is not None else Quotas()
    if raw is None:
        return base
    if not isinstance(raw, dict):
        raise InvalidInput("quotas must be a JSON object", code=CODE, field="quotas")
    changes: dict[str, Any] = {}
    for name, value in raw.items():
        field = f"quotas.{name}"
        if name in INT_RANGES:
            lo, hi = INT_RANGES[name]
            if type(value) is not int or not lo <= value <= hi:
                raise InvalidInput(f"{field} must be an integer between {lo} and {hi}", code=CODE, field=field)
        elif name in NULLABLE_INT_RANGES:
            lo, hi = NULLABLE_INT_RANGES[name]
            if value is not None and (type(value) is not int or not lo <= value <= hi):
                raise InvalidInput(
                    f"{field} must be null (no budget) or an integer between {lo} and {hi}", code=CODE, field=field
                )
        elif name == "end_user_policy":
            if value not in END_USER_POLICIES:
                raise InvalidInput(
                    f'{field} must be "reject" or "replace_oldest"', code=CODE, field=field
                )
        else:
            raise InvalidInput(
                f"{field} is not a known quota (known: {', '.join(FIELDS)})", code=CODE, field=field
            )
        changes[name] = value
    return msgspec.structs.replace(base, **changes)
