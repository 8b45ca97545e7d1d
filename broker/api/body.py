"""Reading JSON request bodies with the contract's errors (415, 400 naming the field)."""

from __future__ import annotations

import functools
import json
import re
from typing import TypeVar

import msgspec
from litestar import Request

from broker.core.errors import InvalidInput, UnsupportedMediaType

from .deps import raw_header

T = TypeVar("T")
MAX_DEPTH = 64  # nesting of objects/arrays in a body: deeper input is refused before any recursive code sees it
_PATH = re.compile(r"at `\$((?:\.[A-Za-z0-9_\-]+|\[\d+\]|\[\.\.\.\])*)`")


async def read_json(request: Request, model: type[T], *, empty_ok: bool) -> tuple[T, bytes]:
    body = await request.body()
    if not body.strip():
        if empty_ok:
            return msgspec.convert({}, model), b""
        raise InvalidInput("a JSON body is required", code="missing_body", field="body")
    ctype = raw_header(request, b"content-type") or ""
    media, _, params = ctype.partition(";")
    media = media.strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(
            "Send the body as JSON with Content-Type: application/json", code="unsupported_media_type",
            field="Content-Type",
        )
    if params and not _utf8_charset(params):
        raise UnsupportedMediaType(
            "JSON bodies are UTF-8: send Content-Type: application/json (or charset=utf-8)",
            code="unsupported_charset", field="Content-Type",
        )
    try:
        if body.count(b"[") + body.count(b"{") > MAX_DEPTH:  # fewer brackets cannot nest deeper
            _check_depth(msgspec.json.decode(body))
        if body.count(b":") > 1:  # an object with two keys has two colons (outside its strings)
            _check_duplicates(body)
        return _decoder(model).decode(body), body
    except RecursionError:
        raise _too_deep() from None
    except msgspec.ValidationError as exc:
        raise InvalidInput(_clean(str(exc)), code="invalid_field", field=field_of(str(exc))) from None
    except msgspec.DecodeError:
        raise InvalidInput("the body is not valid JSON", code="invalid_json", field="body") from None


@functools.cache
def _decoder(model: type[T]) -> msgspec.json.Decoder[T]:
    return msgspec.json.Decoder(model)


def _too_deep() -> InvalidInput:
    return InvalidInput(f"the body is nested more than {MAX_DEPTH} levels deep", code="body_too_deep", field="body")


def _check_depth(value: object) -> None:
    """Iterative (no recursion of our own): refuses objects/arrays nested deeper than MAX_DEPTH."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > MAX_DEPTH:
            raise _too_deep()
        stack.extend((child, depth + 1) for child in children)


def _utf8_charset(params: str) -> bool:
    """The parameters of an application/json Content-Type: only ``charset=utf-8`` (any case,
    quoted or not, or ``utf8``) may be named; other parameters are ignored."""
    for param in params.split(";"):
        name, eq, value = param.partition("=")
        if name.strip().lower() == "charset" and (
            not eq or value.strip().strip('"').lower() not in ("utf-8", "utf8")
        ):
            return False
    return True


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise InvalidInput(f'the key "{key[:64]}" appears twice in one JSON object', code="duplicate_key",
                           field="body")
    return obj


def _check_duplicates(body: bytes) -> None:
    """A key given twice in one object (msgspec, like most parsers, keeps the last one, so two
    readers of the same body could disagree on what it says): refused. Parsed a second time, with
    the standard library's hook that sees every object's pairs; run only on bodies with at least
    two keys, after the depth check; its own syntax errors are left to msgspec's decode."""
    try:
        json.loads(body, object_pairs_hook=_refuse_duplicates)
    except (ValueError, RecursionError):  # not JSON (msgspec says so, naming the body)
        pass


def field_of(message: str) -> str | None:
    m = _PATH.search(message)
    if not m or not m.group(1):
        # unknown top-level field: "Object contains unknown field `x`"
        unk = re.search(r"unknown field `([^`]+)`", message)
        return unk.group(1) if unk else None
    path = m.group(1).replace("[...]", "").lstrip(".").replace("[", ".").replace("]", "")
    unk = re.search(r"unknown field `([^`]+)`", message)
    return f"{path}.{unk.group(1)}" if unk else path


def _clean(message: str) -> str:
    text = _PATH.sub("", message).strip().rstrip(" -")
    field = field_of(message)
    return f"{field}: {text}" if field else text
