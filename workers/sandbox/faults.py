"""Sandbox configuration: per-operation latency and failure-injection rules.

Wire shape of ``PUT /_sandbox/config`` (every key optional; a PUT replaces the whole config)::

    {"seed": 7,
     "mint":   {"latency_ms": 300, "fail": [{"status": 429, "count": 2, "retry_after": 1,
                                              "code": "rate_limit_exceeded"}]},
     "create": {"fail": [{"status": 503, "rate": 0.3}, {"after_apply": true, "hang": true, "count": 1}]},
     "delete": {"fail": [{"close": true, "count": 1}]}}

A rule does exactly one of: answer ``status`` (with an upstream-shaped error body, or the raw
``body`` given), ``hang`` (no answer for ``hang_seconds`` or until the client goes away, then
504) or ``close`` (drop the connection without answering). ``after_apply`` first performs the
operation for real and then misbehaves (the "outcome unknown" case). ``count`` limits a rule to
its first N firings; ``rate`` makes it fire with that probability (seeded RNG); rules are tried
in order and the first that fires wins. ``latency_ms`` is spent before the operation is
applied, and a client that gives up meanwhile does not stop it (like a slow real server).
"""

from __future__ import annotations

import random

import msgspec

OPERATIONS = ("mint", "create", "delete")


class FaultRule(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    status: int | None = None
    hang: bool = False
    close: bool = False
    after_apply: bool = False
    count: int | None = None
    rate: float | None = None
    code: str | None = None
    message: str | None = None
    retry_after: float | None = None
    retry_after_ms: int | None = None
    should_retry: bool | None = None
    hang_seconds: float = 30.0
    body: str | None = None
    content_type: str = "application/json"

    def __post_init__(self) -> None:
        kinds = (self.status is not None) + self.hang + self.close
        if kinds != 1:
            raise msgspec.ValidationError("a fail rule needs exactly one of `status`, `hang`, `close`")
        if self.status is not None and not 200 <= self.status <= 599:
            raise msgspec.ValidationError("`status` must be 200..599")
        if self.count is not None and self.count < 0:
            raise msgspec.ValidationError("`count` must be >= 0")
        if self.rate is not None and not 0.0 <= self.rate <= 1.0:
            raise msgspec.ValidationError("`rate` must be within 0..1")
        if not 0.0 <= self.hang_seconds <= 600.0:
            raise msgspec.ValidationError("`hang_seconds` must be within 0..600")


class OpConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    latency_ms: float = 0.0
    fail: list[FaultRule] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0.0 <= self.latency_ms <= 600_000.0:
            raise msgspec.ValidationError("`latency_ms` must be within 0..600000")


class SandboxConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    seed: int | None = None
    mint: OpConfig = msgspec.field(default_factory=OpConfig)
    create: OpConfig = msgspec.field(default_factory=OpConfig)
    delete: OpConfig = msgspec.field(default_factory=OpConfig)

    def op(self, name: str) -> OpConfig:
        cfg: OpConfig = getattr(self, name)
        return cfg


def decode_config(raw: bytes) -> SandboxConfig:
    """Parse a ``PUT /_sandbox/config`` body; raises ``msgspec.ValidationError``/``DecodeError``."""
    return msgspec.json.decode(raw, type=SandboxConfig)


class FaultPlan:
    """The live config plus each rule's remaining ``count`` and the seeded RNG."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.rng = random.Random(self.config.seed if self.config.seed is not None else 0)
        self._remaining: dict[str, list[int | None]] = {
            op: [rule.count for rule in self.config.op(op).fail] for op in OPERATIONS
        }

    def latency(self, op: str) -> float:
        """Seconds to wait before answering ``op``."""
        return self.config.op(op).latency_ms / 1000.0

    def pick(self, op: str) -> FaultRule | None:
        """The rule that fires for this call of ``op``, if any (consumes its count)."""
        remaining = self._remaining[op]
        for index, rule in enumerate(self.config.op(op).fail):
            left = remaining[index]
            if left is not None and left <= 0:
                continue
            if rule.rate is not None and self.rng.random() >= rule.rate:
                continue
            if left is not None:
                remaining[index] = left - 1
            return rule
        return None

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = msgspec.to_builtins(self.config)
        out["remaining_counts"] = {op: list(self._remaining[op]) for op in OPERATIONS}
        return out
