"""The sandbox's webhook receivers: named endpoints that verify Standard Webhooks signatures with
the ``standardwebhooks`` package (a third-party implementation, not the broker's own signing code),
record every delivery, and misbehave on request.

Routes (served by :mod:`workers.sandbox.app`)::

    POST   /_sandbox/webhooks/{name}          a delivery (the URL an endpoint is registered with)
    GET    /_sandbox/webhooks/{name}?after=N&limit=M   what it received (oldest first, after seq N)
    PUT    /_sandbox/webhooks/{name}/config   register or replace its secrets and behaviour
    DELETE /_sandbox/webhooks/{name}          forget the receiver (config and deliveries)
    GET    /_sandbox/webhooks                 every receiver with its counters

Config (``PUT .../config``, every key optional; a PUT replaces the whole config, deliveries are kept)::

    {"secrets": ["whsec_...", "whsec_..."],          # any of them verifies (a rotation: both)
     "latency_ms": 0,                                 # spent before every answer
     "slow": {"rate": 0.1, "latency_ms": 3000},       # on top, for that fraction of deliveries
     "fail": [{"status": 503, "rate": 0.3, "retry_after": 1}, {"status": 410, "count": 1}],
     "first_attempt_only": false,                     # true: a redelivery of a webhook-id is neither
     "seed": 7}                                       # slowed nor failed (a receiver that recovers)

``fail`` rules are the sandbox's (:class:`workers.sandbox.faults.FaultRule`: ``status``, ``hang``
or ``close``; ``rate``, ``count``, ``retry_after``), tried in order, the first that fires answers.
A delivery no rule fails is answered 204 when its signature verifies with one of the secrets and
401 otherwise (as a receiver following the specification rejects it). Secrets are never shown:
the GET lists their sha256.

Each delivery is recorded as ``{"seq", "received_at" (unix seconds, real clock), "webhook_id",
"webhook_timestamp", "nth" (1 for the first receipt of that webhook-id, 2 for the next...),
"verified", "verified_by" (indexes of the secrets that verify it), "error"
(why it did not verify, else null), "status" (what the receiver answered, null when it dropped the
connection or the client went away first), "delay_ms", "body" (the raw body, text)}``.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter, deque
from typing import Any

import msgspec
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from workers.sandbox.faults import FaultRule

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEFAULT_CAP = 200_000


class SlowRule(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    latency_ms: float
    rate: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.latency_ms <= 600_000.0:
            raise msgspec.ValidationError("`slow.latency_ms` must be within 0..600000")
        if not 0.0 <= self.rate <= 1.0:
            raise msgspec.ValidationError("`slow.rate` must be within 0..1")


class ReceiverConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    secrets: list[str] = msgspec.field(default_factory=list)
    latency_ms: float = 0.0
    slow: SlowRule | None = None
    fail: list[FaultRule] = msgspec.field(default_factory=list)
    first_attempt_only: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.latency_ms <= 600_000.0:
            raise msgspec.ValidationError("`latency_ms` must be within 0..600000")
        for secret in self.secrets:
            try:
                if not secret.startswith("whsec_"):
                    raise ValueError("no whsec_ prefix")
                Webhook(secret)
            except Exception:  # binascii.Error, EmptyWebhookSecretError: the library's own check
                raise msgspec.ValidationError("each of `secrets` must be a whsec_<base64> secret") from None


class Delivery(msgspec.Struct, kw_only=True):
    seq: int
    received_at: float
    webhook_id: str | None
    webhook_timestamp: str | None
    nth: int                      # 1 for the first receipt of this webhook-id, 2 for the next...
    verified: bool
    verified_by: list[int]
    error: str | None
    status: int | None
    delay_ms: float
    body: str


def decode_config(raw: bytes) -> ReceiverConfig:
    return msgspec.json.decode(raw or b"{}", type=ReceiverConfig)


def _fingerprint(secret: str) -> str:
    from workers.sandbox.state import fingerprint

    return fingerprint(secret)


class Receiver:
    """One named receiver: its config, the state of its rules, what it received."""

    def __init__(self, name: str, cap: int = DEFAULT_CAP) -> None:
        self.name = name
        self.deliveries: deque[Delivery] = deque(maxlen=cap)
        self.counters: Counter[str] = Counter()
        self.seq = 0
        self.seen: Counter[str] = Counter()   # receipts per webhook-id
        self.configure(ReceiverConfig())

    def configure(self, config: ReceiverConfig) -> None:
        self.config = config
        self._verifiers = [Webhook(s) for s in config.secrets]
        self._rng = random.Random(config.seed if config.seed is not None else 0)
        self._remaining = [rule.count for rule in config.fail]

    def misbehaves(self, delivery: Delivery) -> bool:
        """Whether the slow and fail rules apply to this delivery (see ``first_attempt_only``)."""
        return delivery.nth == 1 or not self.config.first_attempt_only

    def delay(self) -> float:
        """Seconds to wait before answering this delivery."""
        delay = self.config.latency_ms
        slow = self.config.slow
        if slow is not None and self._rng.random() < slow.rate:
            delay += slow.latency_ms
        return delay / 1000.0

    def pick(self) -> FaultRule | None:
        for index, rule in enumerate(self.config.fail):
            left = self._remaining[index]
            if left is not None and left <= 0:
                continue
            if rule.rate is not None and self._rng.random() >= rule.rate:
                continue
            if left is not None:
                self._remaining[index] = left - 1
            return rule
        return None

    def record(self, headers: dict[str, str], body: bytes) -> Delivery:
        """Verify and record one delivery (its answer is filled in by the caller)."""
        verified_by: list[int] = []
        error: str | None = None
        if not self._verifiers:
            error = "no secret registered for this receiver"
        for index, verifier in enumerate(self._verifiers):
            try:
                verifier.verify(body, headers, json_parse=False)
            except WebhookVerificationError as exc:
                error = str(exc)
            except (ValueError, UnicodeDecodeError) as exc:  # a malformed signature list or body
                error = f"malformed: {exc}"
            else:
                verified_by.append(index)
        if verified_by:
            error = None
        self.seq += 1
        webhook_id = headers.get("webhook-id")
        if webhook_id is not None:
            self.seen[webhook_id] += 1
        delivery = Delivery(
            seq=self.seq,
            received_at=time.time(),
            webhook_id=webhook_id,
            webhook_timestamp=headers.get("webhook-timestamp"),
            nth=self.seen[webhook_id] if webhook_id is not None else 1,
            verified=bool(verified_by),
            verified_by=verified_by,
            error=error,
            status=None,
            delay_ms=0.0,
            body=body.decode("utf-8", errors="replace"),
        )
        self.deliveries.append(delivery)
        self.counters["received"] += 1
        self.counters["verified" if verified_by else "not_verified"] += 1
        return delivery

    def answered(self, delivery: Delivery, status: int | None) -> None:
        delivery.status = status
        self.counters[str(status) if status is not None else "no_answer"] += 1

    def describe(self) -> dict[str, Any]:
        config: dict[str, Any] = msgspec.to_builtins(self.config)
        config.pop("secrets", None)
        return {
            "name": self.name,
            "secrets": [{"sha256": _fingerprint(s)} for s in self.config.secrets],
            "config": config,
            "remaining_counts": list(self._remaining),
            "counters": dict(self.counters),
        }

    def listing(self, after: int, limit: int) -> dict[str, Any]:
        first = self.deliveries[0].seq if self.deliveries else self.seq + 1
        start = max(0, after + 1 - first)
        page = [self.deliveries[i] for i in range(start, min(len(self.deliveries), start + limit))]
        out = self.describe()
        out["deliveries"] = page
        out["next_after"] = page[-1].seq if page else after
        out["has_more"] = start + len(page) < len(self.deliveries)
        return out


class Receivers:
    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        self.cap = cap
        self.by_name: dict[str, Receiver] = {}

    def get(self, name: str) -> Receiver:
        receiver = self.by_name.get(name)
        if receiver is None:
            receiver = self.by_name[name] = Receiver(name, self.cap)
        return receiver

    def summary(self) -> dict[str, Any]:
        return {"receivers": {name: dict(r.counters) for name, r in self.by_name.items()}}
