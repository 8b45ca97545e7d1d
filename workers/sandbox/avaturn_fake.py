"""Fake of Avaturn's ``POST /api/v1/sessions`` and ``DELETE /api/v1/sessions/{id}``.

Order of checks follows a FastAPI service: the bearer key first (401), then the body schema
(422, ``{"detail": [{"loc", "msg", "type"}]}``), then the semantic checks (400):
``background``, render preset, and the ``client_secret``, which must be one this sandbox
minted and that has not expired. ``user_absent_timeout`` is recorded, not enforced (no user
ever joins a sandbox session); ``max_duration`` is enforced: the session ends by itself.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import msgspec

from workers.sandbox.reply import AvaturnError, Reply, bearer, json_reply, unprocessable
from workers.sandbox.state import SandboxState, SessionRecord, fingerprint

DEFAULT_AVATAR = "jane_20240829"
ENGINE_TYPES = frozenset({"openai-realtime", "text-echo", "cartesia", "external"})


def check_key(headers: dict[str, str]) -> str:
    key = bearer(headers)
    if key is None:
        raise AvaturnError(401, "Not authenticated")
    if "invalid" in key:
        raise AvaturnError(401, "Invalid API key")
    return key


def _int_field(body: dict[str, Any], name: str, default: int, lo: int, hi: int | None) -> int:
    value = body.get(name, default)
    integral = isinstance(value, float) and value.is_integer()
    if isinstance(value, bool) or not (isinstance(value, int) or integral):
        raise unprocessable([name], "Input should be a valid integer", "int_type")
    if value < lo:
        raise unprocessable([name], f"Input should be greater than or equal to {lo}", "greater_than_equal")
    if hi is not None and value > hi:
        raise unprocessable([name], f"Input should be less than or equal to {hi}", "less_than_equal")
    return int(value)


def _engine_secret(body: dict[str, Any]) -> str:
    if "conversation_engine" not in body:
        raise unprocessable(["conversation_engine"], "Field required", "missing")
    engine = body["conversation_engine"]
    if not isinstance(engine, dict):
        raise unprocessable(["conversation_engine"], "Input should be a valid dictionary or object to extract "
                                                     "fields from", "model_attributes_type")
    kind = engine.get("type")
    if kind is None:
        raise unprocessable(["conversation_engine"], "Unable to extract tag using discriminator 'type'",
                            "union_tag_not_found")
    if kind not in ENGINE_TYPES:
        raise unprocessable(["conversation_engine"], "Input tag does not match any of the expected tags",
                            "union_tag_invalid")
    if kind != "openai-realtime":
        raise AvaturnError(400, f"Conversation engine '{kind}' is not available in the sandbox")
    for name in engine:
        if name not in ("type", "client_secret"):
            raise unprocessable(["conversation_engine", kind, name], "Extra inputs are not permitted",
                                "extra_forbidden")
    secret = engine.get("client_secret")
    if secret is None:
        raise unprocessable(["conversation_engine", kind, "client_secret"], "Field required", "missing")
    if not isinstance(secret, str):
        raise unprocessable(["conversation_engine", kind, "client_secret"], "Input should be a valid string",
                            "string_type")
    return secret


def create(state: SandboxState, headers: dict[str, str], raw: bytes) -> Reply:
    """Answer one ``POST /api/v1/sessions``."""
    try:
        key = check_key(headers)
        try:
            body = msgspec.json.decode(raw) if raw else None
        except msgspec.DecodeError:
            raise unprocessable([], "JSON decode error", "json_invalid") from None
        if not isinstance(body, dict):
            raise unprocessable([], "Input should be a valid dictionary", "dict_type")
        avatar_id = body.get("avatar_id", DEFAULT_AVATAR)
        if not isinstance(avatar_id, str):
            raise unprocessable(["avatar_id"], "Input should be a valid string", "string_type")
        background = body.get("background", "default")
        if not isinstance(background, str):
            raise unprocessable(["background"], "Input should be a valid string", "string_type")
        user_absent_timeout = _int_field(body, "user_absent_timeout", 60, 10, None)
        max_duration = _int_field(body, "max_duration", 3600, 60, 86400)
        secret = _engine_secret(body)
        if background not in ("default", "transparent"):
            raise AvaturnError(400, f"Unsupported background '{background}': use 'default' or 'transparent'")
        for preset in ("model", "render_model"):
            if preset in body and body[preset] not in ("delta", "golf"):
                raise AvaturnError(400, f"Unsupported render preset for '{preset}'")
        minted = state.usable_secret(secret)
        if minted is None:
            raise AvaturnError(400, "Invalid or expired OpenAI client secret")
    except AvaturnError as err:
        return err.reply()
    record = SessionRecord(
        session_id=str(uuid.uuid4()),
        created_at=state.now(),
        max_duration=max_duration,
        avatar_id=avatar_id,
        background=background,
        user_absent_timeout=user_absent_timeout,
        secret_fingerprint=minted.secret_fingerprint,
        key_fingerprint=fingerprint(key),
    )
    state.add_session(record)
    return json_reply(200, {"session_id": record.session_id, "token": secrets.token_urlsafe(32)})


def delete(state: SandboxState, headers: dict[str, str], session_id: str) -> Reply:
    """Answer one ``DELETE /api/v1/sessions/{session_id}``: 200 empty, or 404 when already gone."""
    try:
        key = check_key(headers)
    except AvaturnError as err:
        return err.reply()
    if state.delete_session(session_id, key) == 200:
        return Reply(200)
    return AvaturnError(404, "Session not found").reply()
