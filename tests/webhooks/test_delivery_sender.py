"""The sender's pure parts: redaction of the answer, Retry-After, the jittered schedule."""

from __future__ import annotations

import email.utils

from broker.webhooks.queue import RETRY_SCHEDULE_S
from broker.webhooks.signing import new_secret
from workers.webhook_sender import RETRY_AFTER_CAP_S, redact, retry_after_seconds
from workers.webhooks import retry_delay_s


def test_redaction_removes_the_endpoints_secret_and_secret_looking_strings() -> None:
    secret = new_secret()
    key = secret.removeprefix("whsec_")
    body = (f"bad signature with {secret}; key {key}; other whsec_abcDEF123== and sk-proj-XYZ_123 "
            "Authorization: Bearer eyJhbGciOi.abc.def done")
    out = redact(body, [secret])
    assert secret not in out and key not in out
    assert "abcDEF123" not in out and "proj-XYZ_123" not in out and "eyJhbGciOi" not in out
    assert out.endswith("done") and "bad signature with" in out


def test_retry_after_seconds_and_http_date_capped() -> None:
    assert retry_after_seconds("120") == 120
    assert retry_after_seconds("999999999") == RETRY_AFTER_CAP_S
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 300, usegmt=True)
    assert retry_after_seconds(date, now=now) == 300
    assert retry_after_seconds(email.utils.formatdate(now - 300, usegmt=True), now=now) == 0


def test_the_retry_schedule_with_jitter() -> None:
    assert RETRY_SCHEDULE_S == (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
    for n, base in enumerate(RETRY_SCHEDULE_S, start=1):
        assert retry_delay_s(n, lambda: 0.0) == base * 0.9
        assert retry_delay_s(n, lambda: 1.0) == base * 1.1
    assert retry_delay_s(len(RETRY_SCHEDULE_S) + 1) is None
