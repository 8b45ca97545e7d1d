"""Webhooks (contract section 11): the tenant's endpoints, and the signed, ordered, at-least-once
delivery of its events to them.

An endpoint is the hash ``TenantScope.webhook_endpoint(weid)`` (ids ``we_`` + 24 hex), listed
in the set ``TenantScope.webhook_endpoints()`` (at most 10); a tenant with at least one is in
``WEBHOOK_TENANTS``. Its fields, written by ``endpoints.py`` and read by the delivery:

    url              the https URL (validated at create/update: ``urls.py``)
    description      free text ('' when none)
    events           '' = every event type, else a comma-separated list of types
    secret_enc       the signing secret ``whsec_<base64>``, encrypted (tenants.crypto.CredentialCipher)
    prev_secret_enc  the secret before the last rotation ('' when none) ...
    prev_secret_until  ... which also signs until this time (ms; rotation + 24 h)
    disabled         '1' or '0'
    disabled_reason  '' | 'gone' (the receiver answered 410) | 'failing' (5 days of failures) | 'tenant' (PATCH)
    disabled_at      ms, '' when enabled
    failing_since    ms of the first failure since the last success, '' when healthy
    created_at       ms
    since            outbox entry id: the tenant's last event at creation (and again when
                     re-enabled; '0-0' when none): only later events are delivered to it (a resend excepted)

Attempt log entries (stream ``TenantScope.webhook_attempts(weid)``, written by the delivery):
``event_id`` (evt_...), ``event_type``, ``attempt`` (1, 2, ...), ``status`` (HTTP status, '' when
none), ``error`` ('' or a short reason: timeout, connect_error, address_not_public, ...),
``latency_ms``, ``response`` (at most 4 KiB of the body, redacted), ``at`` (ms).

Modules: ``signing.py`` (Standard Webhooks v1 signatures, secrets), ``addresses.py`` (which
addresses may be delivered to).
"""
