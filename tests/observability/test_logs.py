"""Structured logs: context binding (request id, tenant id, session id, job id) through
contextvars, the JSON and console formats, and redaction."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from broker.core.logs import ConsoleFormatter, JsonFormatter, bind_log_context, current_log_context, log_context
from tests.fixtures.stack import Admin, tenant_client, wait_status

from .helpers import wait_for


@contextmanager
def captured(logger_name: str, level: int = logging.DEBUG) -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(logger_name)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_context_binds_nests_and_resets() -> None:
    assert current_log_context() == {}
    with log_context(request_id="r1", tenant_id="t1"):
        with log_context(session_id="ses_1", tenant_id=None):
            out = json.loads(JsonFormatter().format(_record("hello %s", "world")))
            assert (out["event"], out["request_id"], out["tenant_id"], out["session_id"]) == ("hello world", "r1", "t1", "ses_1")
        assert current_log_context() == {"request_id": "r1", "tenant_id": "t1"}
        explicit = json.loads(JsonFormatter().format(_record("x", request_id="r2")))
        assert explicit["request_id"] == "r2"   # an explicit extra wins over the context
    assert current_log_context() == {}
    assert "request_id" not in json.loads(JsonFormatter().format(_record("x")))


def test_secrets_are_redacted_everywhere() -> None:
    """Invariant: a key or client secret never reaches a log line, whether in the message,
    the bound context, extra fields or a traceback."""
    secrets = ("sk-proj-abcdef0123456789", "ek_68af0123456789abcdef", "sbk_abcdefgh0123456789")
    with log_context(tenant_id=secrets[0]):
        try:
            raise ValueError(f"boom {secrets[1]}")
        except ValueError:
            import sys

            record = _record("key %s and Bearer %s", secrets[0], secrets[2], fields={"k": secrets[2]})
            record.exc_info = sys.exc_info()
        for formatter in (JsonFormatter(), ConsoleFormatter("%(message)s")):
            text = formatter.format(record)
            for secret in secrets:
                assert secret not in text and secret[6:] not in text, (formatter, text)


def test_console_format_shows_context() -> None:
    with log_context(request_id="abc", job_id="prov:ses_1"):
        line = ConsoleFormatter("%(levelname)s %(message)s").format(_record("started", fields={"status": 201}))
    assert line == "INFO started [request_id=abc job_id=prov:ses_1 status=201]"


def test_unknown_context_key_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError):
        bind_log_context(api_key="x")  # type: ignore[arg-type]


def test_request_lines_carry_request_tenant_and_session_ids(api, admin: Admin) -> None:
    tenant, key = admin.tenant("acme")
    with captured("broker.access") as stream, tenant_client(api.url, key) as c:
        created = c.post("/v1/sessions")
        sid = created.json()["id"]
        got = c.get(f"/v1/sessions/{sid}")
        anonymous = httpx.get(f"{api.url}/v1/sessions")
        ids = {r.headers["x-request-id"] for r in (created, got, anonymous)}
        # The access line is written once the answer is sent: the client may see it first.
        wait_for(lambda: ids <= {line["request_id"] for line in lines(stream)}, 5, "the access lines")
    by_request = {line["request_id"]: line for line in lines(stream)}
    post = by_request[created.headers["x-request-id"]]
    assert (post["tenant_id"], post["session_id"], post["route"], post["status"]) == (tenant["id"], sid, "/v1/sessions", 202)
    get = by_request[got.headers["x-request-id"]]
    assert (get["tenant_id"], get["session_id"], get["route"]) == (tenant["id"], sid, "/v1/sessions/{session_id}")
    anon = by_request[anonymous.headers["x-request-id"]]
    assert anon["status"] == 401 and "tenant_id" not in anon and "session_id" not in anon
    assert key not in stream.getvalue()


def test_job_lines_carry_job_tenant_and_session_ids(api, worker, admin: Admin, sandbox) -> None:
    tenant, key = admin.tenant("acme")
    sandbox.configure({"delete": {"fail": [{"status": 503, "count": 1}]}})
    with captured("workers", logging.WARNING) as stream, tenant_client(api.url, key) as c:
        sid = c.post("/v1/sessions?wait=10").json()["id"]
        c.delete(f"/v1/sessions/{sid}")
        wait_status(c, sid, {"terminated"})
    failed = [line for line in lines(stream) if "upstream delete failed" in line["event"]]
    assert failed, stream.getvalue()
    assert failed[0]["job_id"] == f"term:{sid}:stop"
    assert (failed[0]["tenant_id"], failed[0]["session_id"]) == (tenant["id"], sid)
    assert "request_id" not in failed[0]
