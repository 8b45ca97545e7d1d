"""Structured logging: one JSON object per line (or a console format for humans), with
the context that matters (request id, tenant id, session id, job id) and secrets
redacted by construction: anything that looks like a key or client secret is masked
before a line is written."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_SECRET = re.compile(r"\b(sk-[A-Za-z0-9_\-]{4,}|ek_[A-Za-z0-9_\-]{4,}|sbk_[A-Za-z0-9]{8,}|Bearer\s+\S+)")


def redact(text: str) -> str:
    return _SECRET.sub(lambda m: m.group(0)[:4] + "***", text)


class JsonFormatter(logging.Formatter):
    CONTEXT = ("request_id", "tenant_id", "session_id", "job_id")

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact(record.getMessage()),
        }
        for key in self.CONTEXT:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, separators=(",", ":"))


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure_logging(fmt: str = "json", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "console":
        handler.setFormatter(ConsoleFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # arq logs every job start/end at INFO (hundreds of lines a second under load); our
    # jobs log their own events.
    for noisy in ("uvicorn.access", "httpx", "httpcore", "arq.worker", "arq.jobs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
