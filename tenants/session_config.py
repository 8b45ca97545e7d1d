"""OpenAI Realtime **GA** session config: validation, normalisation and tenant overrides.

The GA ``client_secrets`` endpoint answers 400 ``unknown_parameter`` to the beta field names
that many published examples still show (``temperature``, a top-level ``voice``...), and the
SDK forwards whatever it is given. So every config is checked here before anything is
queued, and a beta name gets a 400 saying what to send instead. Shapes follow the ``openai``
3.5x ``RealtimeSessionCreateRequestParam`` (see /work/shared/UPSTREAMS.md). The checks are
small composable functions ``(value, path) -> normalised value`` that raise
:class:`InvalidInput` naming the JSON path of the offending field.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from broker.core.errors import InvalidInput
from tenants.session_secrets import MAX_SEALED_CHARS, SEALED_PREFIX, refuse_reserved

CODE = "invalid_session_config"
Check = Callable[[Any, str], Any]

# Beta (non-GA) top-level names -> what to send instead. Checked before anything else.
NON_GA_FIELDS: dict[str, str] = {
    "temperature": "is not a GA Realtime field; remove it (GA sessions have no temperature)",
    "voice": "is not a GA Realtime field at the top level; send it as session.audio.output.voice",
    "modalities": 'is not a GA Realtime field; send session.output_modalities instead (["audio"] or ["text"])',
    "input_audio_format": "is not a GA Realtime field; send it as session.audio.input.format, "
    'e.g. {"type": "audio/pcm", "rate": 24000}',
    "output_audio_format": "is not a GA Realtime field; send it as session.audio.output.format, "
    'e.g. {"type": "audio/pcm", "rate": 24000}',
    "input_audio_transcription": "is not a GA Realtime field; send it as session.audio.input.transcription",
    "input_audio_noise_reduction": "is not a GA Realtime field; send it as session.audio.input.noise_reduction",
    "turn_detection": "is not a GA Realtime field at the top level; send it as session.audio.input.turn_detection",
    "speed": "is not a GA Realtime field at the top level; send it as session.audio.output.speed",
    "max_response_output_tokens": "is not a GA Realtime field; send session.max_output_tokens instead "
    '(1..4096 or "inf")',
}
VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
MAX_SCHEMA_BYTES = 16 * 1024
MAX_SESSION_BYTES = 128 * 1024


def _error(path: str, message: str, code: str = CODE) -> InvalidInput:
    return InvalidInput(f"{path} {message}", code=code, field=path)


def _size(value: Any) -> int:
    try:
        return len(msgspec.json.encode(value))
    except (TypeError, msgspec.EncodeError):
        return -1


# ---- check builders ----------------------------------------------------------------------


class obj:  # noqa: N801 - reads as a schema keyword
    """A JSON object with known fields only; ``hints`` give advice for well-known wrong names."""

    def __init__(self, fields: dict[str, Check], required: tuple[str, ...] = (),
                 hints: Mapping[str, str] | None = None, any_of: tuple[str, ...] = ()) -> None:
        self.fields, self.required, self.hints, self.any_of = fields, required, hints or {}, any_of

    def unknown_message(self) -> str:
        return "is not a known GA Realtime field here (known: " + ", ".join(sorted(self.fields)) + ")"

    def __call__(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _error(path, "must be a JSON object")
        for name in value:  # advice for a well-known wrong name wins over every other error
            if name in self.hints:
                raise _error(f"{path}.{name}", self.hints[name])
        out: dict[str, Any] = {}
        for name, item in value.items():
            check = self.fields.get(name)
            if check is None:
                raise _error(f"{path}.{name}", self.unknown_message())
            out[name] = check(item, f"{path}.{name}")
        for name in self.required:
            if name not in value:
                raise _error(f"{path}.{name}", "is required")
        if self.any_of and not any(name in value for name in self.any_of):
            raise _error(path, "needs one of: " + ", ".join(self.any_of))
        return out


def tagged(variants: dict[str, obj], tag: str = "type") -> Check:
    """A union of objects told apart by their ``type`` field."""
    for name, variant in variants.items():
        variant.fields = {tag: literal(name), **variant.fields}
        variant.required = (tag, *variant.required)
    names = ", ".join(f'"{n}"' for n in variants)

    def check(value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise _error(path, f"must be a JSON object with {tag} one of {names}")
        variant = variants.get(value.get(tag)) if isinstance(value.get(tag), str) else None
        if variant is None:
            raise _error(f"{path}.{tag}", f"must be one of {names}")
        return variant(value, path)

    return check


def literal(*allowed: Any) -> Check:
    shown = ", ".join(msgspec.json.encode(a).decode() for a in allowed)

    def check(value: Any, path: str) -> Any:
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise _error(path, f"must be {'one of ' if len(allowed) > 1 else ''}{shown}")
        return value

    return check


def string(lo: int, hi: int, pattern: str | None = None) -> Check:
    regex = re.compile(pattern) if pattern else None

    def check(value: Any, path: str) -> str:
        if not isinstance(value, str) or not lo <= len(value) <= hi:
            raise _error(path, f"must be a string of {lo}..{hi} characters")
        if regex is not None and not regex.fullmatch(value):
            raise _error(path, f"must match {pattern}")
        return value

    return check


def number(lo: float, hi: float, *, integral: bool = False) -> Check:
    kinds = (int,) if integral else (int, float)
    what = "an integer" if integral else "a number"

    def check(value: Any, path: str) -> Any:
        if type(value) not in kinds or not math.isfinite(value) or not lo <= value <= hi:
            raise _error(path, f"must be {what} between {lo:g} and {hi:g}")
        return value

    return check


def integer(lo: int, hi: int) -> Check:
    return number(lo, hi, integral=True)


def boolean() -> Check:
    return literal(True, False)


def nullable(inner: Check) -> Check:
    return lambda value, path: None if value is None else inner(value, path)


def by_type(checks: dict[type, Check], expected: str) -> Check:
    def check(value: Any, path: str) -> Any:
        inner = checks.get(type(value))
        if inner is None:
            raise _error(path, f"must be {expected}")
        return inner(value, path)

    return check


def list_of(item: Check, max_items: int) -> Check:
    def check(value: Any, path: str) -> list[Any]:
        if not isinstance(value, list) or len(value) > max_items:
            raise _error(path, f"must be a JSON array of at most {max_items} items")
        return [item(v, f"{path}[{i}]") for i, v in enumerate(value)]

    return check


def dict_of(item: Check, max_items: int) -> Check:
    def check(value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict) or len(value) > max_items:
            raise _error(path, f"must be a JSON object of at most {max_items} entries")
        return {k: item(v, f"{path}.{k}") for k, v in value.items()}

    return check


def json_value(max_bytes: int, *, object_only: bool = False) -> Check:
    def check(value: Any, path: str) -> Any:
        size = _size(value)
        if (object_only and not isinstance(value, dict)) or size < 0 or size > max_bytes:
            kind = "a JSON object" if object_only else "JSON"
            raise _error(path, f"must be {kind} of at most {max_bytes} bytes serialized")
        return value

    return check


def secret(hi: int) -> Check:
    """An MCP credential: a string of 0..``hi`` characters, or its sealed form as stored
    (:mod:`tenants.session_secrets`; input carrying one is refused before it gets here)."""
    plain = string(0, hi)

    def check(value: Any, path: str) -> str:
        if isinstance(value, str) and value.startswith(SEALED_PREFIX) and len(value) <= MAX_SEALED_CHARS:
            return value
        return plain(value, path)

    return check


def _prompt_version(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _error(path, 'must be a string; send the version as a string, e.g. "6"')
    return string(1, 64)(value, path)


# ---- the GA session shape ----------------------------------------------------------------

_FORMAT = tagged({"audio/pcm": obj({"rate": literal(24000)}), "audio/pcmu": obj({}), "audio/pcma": obj({})})
_VAD: dict[str, Check] = {"create_response": boolean(), "interrupt_response": boolean()}
_SERVER_VAD = obj({**_VAD, "threshold": number(0, 1), "prefix_padding_ms": integer(0, 10_000),
                   "silence_duration_ms": integer(0, 10_000), "idle_timeout_ms": nullable(integer(0, 3_600_000))})
_SEMANTIC_VAD = obj({**_VAD, "eagerness": literal("low", "medium", "high", "auto")})
_TRANSCRIPTION = obj({"model": string(1, 64), "language": string(1, 16), "languages": list_of(string(1, 16), 32),
                      "prompt": string(0, 4096), "keywords": list_of(string(1, 256), 100),
                      "delay": literal("minimal", "low", "medium", "high", "xhigh")})
_VOICE = by_type({str: literal(*VOICES), dict: obj({"id": string(1, 128)}, required=("id",))},
                 f'a voice name ({", ".join(VOICES)}) or {{"id": "voice_..."}}')
_MOVED = "is not a GA Realtime field here; send it as session.audio."
_AUDIO = obj(
    {
        "input": obj({"format": _FORMAT, "transcription": nullable(_TRANSCRIPTION),
                      "noise_reduction": nullable(obj({"type": literal("near_field", "far_field"),
                                                       "strength": number(0, 100)})),
                      "turn_detection": nullable(tagged({"server_vad": _SERVER_VAD, "semantic_vad": _SEMANTIC_VAD}))},
                     hints={"voice": "belongs to the output; send it as session.audio.output.voice"}),
        "output": obj({"format": _FORMAT, "voice": _VOICE, "speed": number(0.25, 1.5)}),
    },
    hints={"voice": _MOVED + "output.voice", "speed": _MOVED + "output.speed",
           "turn_detection": _MOVED + "input.turn_detection", "transcription": _MOVED + "input.transcription"},
)
_FUNCTION_TOOL = obj({"name": string(1, 64, r"[A-Za-z0-9_-]+"), "description": string(0, 8192),
                      "parameters": json_value(MAX_SCHEMA_BYTES, object_only=True)}, required=("name",))
_MCP_TOOL = obj(
    {"server_label": string(1, 256), "server_url": string(1, 2048), "connector_id": string(1, 64),
     "tunnel_id": string(1, 256), "server_description": string(0, 4096), "authorization": secret(8192),
     "headers": nullable(dict_of(secret(8192), 64)), "defer_loading": boolean(),
     "allowed_callers": nullable(list_of(literal("direct", "programmatic"), 2)),
     "allowed_tools": nullable(json_value(MAX_SCHEMA_BYTES)), "require_approval": nullable(json_value(MAX_SCHEMA_BYTES))},
    required=("server_label",), any_of=("server_url", "connector_id", "tunnel_id"),
)
_TOOL_CHOICE = by_type(
    {str: literal("none", "auto", "required"),
     dict: tagged({"function": obj({"name": string(1, 64)}, required=("name",)),
                   "mcp": obj({"server_label": string(1, 256), "name": nullable(string(1, 256))},
                              required=("server_label",))})},
    '"none", "auto", "required" or {"type": "function", "name": ...}',
)
_PROMPT_VARIABLE = by_type({str: string(0, 32_768), dict: json_value(MAX_SCHEMA_BYTES)}, "a string or an input object")
_PROMPT = obj({"id": string(1, 256), "version": nullable(_prompt_version),
               "variables": nullable(dict_of(_PROMPT_VARIABLE, 256))}, required=("id",))
_RETENTION = obj({"retention_ratio": number(0, 1), "token_limits": obj({"post_instructions": integer(1, 10_000_000)})},
                 required=("retention_ratio",))
_TRUNCATION = by_type({str: literal("auto", "disabled"), dict: tagged({"retention_ratio": _RETENTION})},
                      '"auto", "disabled" or {"type": "retention_ratio", "retention_ratio": 0.8}')
_TRACING = by_type(
    {str: literal("auto"), dict: obj({"workflow_name": string(1, 256), "group_id": string(1, 256),
                                      "metadata": json_value(4096, object_only=True)})},
    '"auto", null or {"workflow_name", "group_id", "metadata"}',
)

SESSION_SCHEMA = obj(
    {
        "type": literal("realtime"),
        "model": string(1, 64, r"\S+"),
        "instructions": string(0, 32_768),
        "audio": _AUDIO,
        "output_modalities": literal(["audio"], ["text"]),
        "tools": list_of(tagged({"function": _FUNCTION_TOOL, "mcp": _MCP_TOOL}), 128),
        "tool_choice": _TOOL_CHOICE,
        "prompt": nullable(_PROMPT),
        "max_output_tokens": by_type({int: integer(1, 4096), str: literal("inf")}, 'an integer 1..4096 or "inf"'),
        "truncation": _TRUNCATION,
        "tracing": nullable(_TRACING),
        "include": list_of(literal("item.input_audio_transcription.logprobs"), 1),
        "reasoning": obj({"effort": literal("minimal", "low", "medium", "high", "xhigh")}),
        "parallel_tool_calls": boolean(),
    },
    hints=NON_GA_FIELDS,
)
# Top-level GA fields: the only names a tenant's ``allowed_overrides`` may list.
GA_FIELDS: frozenset[str] = frozenset(SESSION_SCHEMA.fields)


# ---- public API --------------------------------------------------------------------------


def _check_top_level(cfg: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise _error(prefix, "must be a JSON object of OpenAI Realtime (GA) session fields")
    for name in cfg:  # beta names first: they get the helpful message
        if name in NON_GA_FIELDS:
            raise _error(f"{prefix}.{name}", NON_GA_FIELDS[name])
    return cfg


def validate_session(cfg: Any, field_prefix: str = "session") -> dict[str, Any]:
    """A normalised copy of ``cfg`` (``type: "realtime"`` added), or InvalidInput naming the field."""
    _check_top_level(cfg, field_prefix)
    size = _size(cfg)
    if size < 0:
        raise _error(field_prefix, "must contain only JSON values")
    if size > MAX_SESSION_BYTES:
        raise _error(field_prefix, f"is too large ({size} bytes serialized; at most {MAX_SESSION_BYTES})")
    out = SESSION_SCHEMA(copy.deepcopy(cfg), field_prefix)
    return {"type": "realtime", **out}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` wins at the leaves; nested objects merge, except when ``over`` names another
    variant (a different ``type`` or ``id``): then it replaces the whole object. Lists replace."""
    out = copy.deepcopy(base)
    for name, value in over.items():
        old = out.get(name)
        if isinstance(old, dict) and isinstance(value, dict) and not _other_variant(old, value):
            out[name] = deep_merge(old, value)
        else:
            out[name] = copy.deepcopy(value)
    return out


def _other_variant(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return any(k in new and k in old and new[k] != old[k] for k in ("type", "id"))


def merge_session(
    defaults: dict[str, Any], overrides: dict[str, Any] | None, allowed: list[str] | tuple[str, ...]
) -> dict[str, Any]:
    """The tenant's defaults with the caller's ``overrides`` merged over them, validated.

    Only top-level fields in ``allowed`` may be overridden (``type`` always may: it can only be
    ``"realtime"``); any other gives ``override_not_allowed`` naming ``session.<name>``. MCP
    credentials in ``overrides`` must be plaintext (the defaults' are sealed): the caller seals
    the result (:func:`tenants.session_secrets.seal`).
    """
    if overrides is None:
        return validate_session(defaults)
    _check_top_level(overrides, "session")
    for name in overrides:
        if name not in GA_FIELDS:
            raise _error(f"session.{name}", SESSION_SCHEMA.unknown_message())
        if name != "type" and name not in allowed:
            permitted = ", ".join(sorted(allowed)) or "none"
            raise _error(
                f"session.{name}",
                f"may not be overridden under this tenant's policy (overridable: {permitted})",
                code="override_not_allowed",
            )
    if "tools" in overrides:
        refuse_reserved(overrides)
    return validate_session(deep_merge(defaults, overrides))
