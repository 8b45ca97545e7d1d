"""Structured logging: one JSON object per line (or a console format for humans), with
the context that matters (request id, tenant id, session id, job id) and secrets
redacted by construction: anything that looks like a key or client secret is masked
before a line is written.

Context is bound with :func:`bind_log_context` / :func:`log_context` on a contextvar, so
every line logged while a request or a job runs carries it (the API middleware binds the
request id, the tenant guard the tenant id, the worker's job wrapper the job, tenant and
session ids). The formatters read the contextvar at emit time (handlers here are
synchronous, so that is the context of the code that logged)."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any

import msgspec

_SECRET = re.compile(r"\b(sk-[A-Za-z0-9_\-]{4,}|ek_[A-Za-z0-9_\-]{4,}|sbk_[A-Za-z0-9]{8,}|Bearer\s+\S+)")

CONTEXT_KEYS = ("request_id", "tenant_id", "session_id", "job_id")
_CONTEXT_KEY_SET = frozenset(CONTEXT_KEYS)
_MAX_CONTEXT_VALUE = 128
_EMPTY: Mapping[str, str] = {}
_context: ContextVar[Mapping[str, str]] = ContextVar("broker_log_context", default=_EMPTY)
# Tracing on (broker/core/tracing.py): returns the current trace id, written as ``trace_id`` on each line.
_trace_id_source: Callable[[], str | None] | None = None
_encode_json = msgspec.json.Encoder(enc_hook=str).encode  # json.dumps(default=str), at a fifth of the cost


_MARKERS = ("sk-", "ek_", "sbk_", "Bearer")  # every _SECRET match contains one of these


def redact(text: str) -> str:
    # most text (ids, events): no regex pass (the four _MARKERS, tested inline: a generator costs more)
    if "sk-" not in text and "ek_" not in text and "sbk_" not in text and "Bearer" not in text:
        return text
    return _SECRET.sub(lambda m: m.group(0)[:4] + "***", text)


def bind_log_context(**values: str | None) -> Token[Mapping[str, str]]:
    """Add ``request_id``/``tenant_id``/``session_id``/``job_id`` to the current context
    (``None`` values are ignored). Returns a token for :func:`reset_log_context`."""
    if not _CONTEXT_KEY_SET.issuperset(values):
        raise ValueError(f"unknown log context keys: {sorted(set(values) - _CONTEXT_KEY_SET)}")
    merged = dict(_context.get())
    for key, value in values.items():
        if value is not None:
            merged[key] = redact(str(value))[:_MAX_CONTEXT_VALUE]
    return _context.set(merged)


def reset_log_context(token: Token[Mapping[str, str]]) -> None:
    _context.reset(token)


@contextmanager
def log_context(**values: str | None) -> Iterator[None]:
    token = bind_log_context(**values)
    try:
        yield
    finally:
        reset_log_context(token)


def set_trace_id_source(source: Callable[[], str | None] | None) -> None:
    """Called by ``broker.core.tracing.configure``/``shutdown``: lines then carry ``trace_id``."""
    global _trace_id_source
    _trace_id_source = source


def current_log_context() -> dict[str, str]:
    return dict(_context.get())


def _context_of(record: logging.LogRecord) -> dict[str, str]:
    bound = _context.get()
    out: dict[str, str] = {}
    for key in CONTEXT_KEYS:
        value = getattr(record, key, None)  # an explicit extra={...} wins
        if value is not None:
            out[key] = redact(str(value))
        else:
            value = bound.get(key)
            if value is not None:  # redacted when bound (bind_log_context is the only writer)
                out[key] = value
    if _trace_id_source is not None:
        trace_id = _trace_id_source()
        if trace_id:
            out["trace_id"] = trace_id
    return out


def _fields_of(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, Mapping) else {}


class JsonFormatter(logging.Formatter):
    CONTEXT = CONTEXT_KEYS

    _second = -1
    _second_text = ""

    def _ts(self, record: logging.LogRecord) -> str:
        second = int(record.created)  # strftime once per second, not per line (the API's access lines)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self._ts(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact(record.getMessage()),
        }
        out.update(_context_of(record))
        for key, value in _fields_of(record).items():
            if key not in out:
                out[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return _encode_json(out).decode()


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = {**_context_of(record), **_fields_of(record)}
        if extra:
            line += " [" + " ".join(f"{k}={v}" for k, v in extra.items()) + "]"
        return redact(line)


# Libraries that log one INFO line per HTTP request or per job: arq's "→ job started" and
# "← finished" lines, the request line of httpx (Avaturn) and of httpx2 (inside the openai SDK).
# At a few hundred sessions a second these lines cost more worker CPU than everything else we
# log, and say nothing that the metrics and our own job lines (failures, retries, orphans) do
# not. They log at ``library_level`` (BROKER_LIBRARY_LOG_LEVEL, default WARNING: their warnings
# and errors still show); BROKER_LIBRARY_LOG_LEVEL=INFO brings the per-job/per-request lines back.
# arq's worker keeps its INFO lifecycle lines (start, signal, shutdown summary): only its
# per-job lines (their format starts with the job's elapsed time) and its "recording health"
# line (every health_check_interval, 5 s) are dropped, by a filter. Its "shutdown on SIGxxx"
# line is written once: a second signal (Ctrl-C in a terminal whose process group also got a
# SIGTERM from a supervisor) repeats it with the other signal's name, as if it were news.
CHATTY_LOGGERS = ("arq.jobs", "arq.connections", "httpx", "httpx2", "httpcore", "openai")
ARQ_WORKER_LOGGER = "arq.worker"


class _ArqJobLines(logging.Filter):
    """Drops arq's per-job INFO lines ("%6.2fs → job(...)", "← ... ●", "↻ retrying") and its
    periodic "recording health: ..." line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        msg = str(record.msg)
        return not (msg.startswith("%6.2fs") or msg.startswith("recording health"))


class _ArqShutdownOnce(logging.Filter):
    """Lets each of arq's "shutdown on %s ..." formats through once per process."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if not msg.startswith("shutdown on %s"):
            return True
        if msg in self._seen:
            return False
        self._seen.add(msg)
        return True


def configure_logging(fmt: str = "json", level: str = "INFO", library_level: str = "WARNING") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "console":
        handler.setFormatter(ConsoleFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # the API writes its own access line
    for chatty in CHATTY_LOGGERS:
        logging.getLogger(chatty).setLevel(library_level)
    arq = logging.getLogger(ARQ_WORKER_LOGGER)
    for old in [f for f in arq.filters if isinstance(f, (_ArqJobLines, _ArqShutdownOnce))]:
        arq.removeFilter(old)
    arq.setLevel(min(logging.INFO, logging.getLevelName(library_level)))
    if logging.getLevelName(library_level) > logging.INFO:
        arq.addFilter(_ArqJobLines())
    arq.addFilter(_ArqShutdownOnce())
