"""Redis replies as text: the one helper that decodes them (redis-py returns bytes unless the
client decodes responses, and Lua scripts return integers where a reply may also be text)."""

from __future__ import annotations

from typing import overload


@overload
def text(value: None, errors: str = "strict") -> None: ...
@overload
def text(value: bytes | str | int, errors: str = "strict") -> str: ...
def text(value: bytes | str | int | None, errors: str = "strict") -> str | None:
    """UTF-8 bytes decoded (``errors`` as :meth:`bytes.decode`), a str as it is, an int as its
    digits, None as None."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors)
    if value is None or isinstance(value, str):
        return value
    return str(value)
