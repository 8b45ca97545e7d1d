"""Fake of OpenAI's ``POST /v1/realtime/client_secrets`` (GA API), see /work/shared/UPSTREAMS.md.

Checks the bearer key (``sk-`` prefix, no ``invalid`` in it; the 401 message echoes part of
the key like the real API does), then the GA body: ``expires_after`` and a ``session`` of
``type: "realtime"`` with GA fields only. Beta-era fields (``temperature``, top-level
``voice``...) and any unknown field answer 400 ``unknown_parameter`` naming the parameter.
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec

from workers.sandbox.reply import OpenAIError, Reply, bearer, json_reply
from workers.sandbox.state import SandboxState

SESSION_FIELDS = frozenset({
    "type", "model", "instructions", "audio", "output_modalities", "tools", "tool_choice", "prompt",
    "max_output_tokens", "truncation", "tracing", "include", "reasoning", "parallel_tool_calls",
})
VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"})
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a decimal", bool: "a boolean",
               dict: "an object", list: "an array", type(None): "null"}


def masked_key(key: str) -> str:
    """How OpenAI echoes a rejected key: its first 6 and last 4 characters."""
    if len(key) <= 10:
        return key[:3] + "*" * max(len(key) - 3, 0)
    return key[:6] + "*" * (len(key) - 10) + key[-4:]


def check_key(headers: dict[str, str]) -> str:
    key = bearer(headers)
    if key is None:
        raise OpenAIError(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code=None,
        )
    if not key.startswith("sk-") or "invalid" in key:
        raise OpenAIError(
            401,
            f"Incorrect API key provided: {masked_key(key)}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            code="invalid_api_key",
        )
    return key


def _unknown(param: str) -> OpenAIError:
    return OpenAIError(400, f"Unknown parameter: '{param}'.", code="unknown_parameter", param=param)


def _invalid(param: str, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, code=code, param=param)


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), "an unsupported value")


def _expect(value: Any, kinds: tuple[type, ...], param: str) -> None:
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        wanted = " or ".join(_TYPE_NAMES[k] for k in kinds)
        raise _invalid(param, f"Invalid type for '{param}': expected {wanted}, but got {_type_name(value)} instead.",
                       "invalid_type")


def _only(obj: dict[str, Any], allowed: frozenset[str] | set[str], prefix: str) -> None:
    for name in obj:
        if name not in allowed:
            raise _unknown(f"{prefix}.{name}" if prefix else name)


def _range(value: Any, lo: float, hi: float, param: str, kinds: tuple[type, ...] = (int,)) -> None:
    _expect(value, kinds, param)
    noun = "integer" if kinds == (int,) else "decimal"
    if value < lo:
        raise _invalid(param, f"Invalid '{param}': {noun} below minimum value. Expected a value >= {lo:g}, "
                              f"but got {value} instead.", f"{noun}_below_min_value")
    if value > hi:
        raise _invalid(param, f"Invalid '{param}': {noun} above maximum value. Expected a value <= {hi:g}, "
                              f"but got {value} instead.", f"{noun}_above_max_value")


def _one_of(value: Any, allowed: frozenset[str] | set[str], param: str) -> None:
    if value not in allowed:
        raise _invalid(param, f"Invalid value: '{value}'. Supported values are: "
                              + ", ".join(f"'{v}'" for v in sorted(allowed)) + ".")


def _check_audio(audio: Any) -> None:
    _expect(audio, (dict,), "session.audio")
    _only(audio, {"input", "output"}, "session.audio")
    inp = audio.get("input")
    if inp is not None:
        _expect(inp, (dict,), "session.audio.input")
        _only(inp, {"format", "noise_reduction", "transcription", "turn_detection"}, "session.audio.input")
        for name in ("format", "noise_reduction", "transcription", "turn_detection"):
            if inp.get(name) is not None:
                _expect(inp[name], (dict,), f"session.audio.input.{name}")
        td = inp.get("turn_detection")
        if td is not None:
            _one_of(td.get("type"), {"server_vad", "semantic_vad"}, "session.audio.input.turn_detection.type")
        tr = inp.get("transcription")
        if tr is not None:
            _only(tr, {"model", "language", "prompt"}, "session.audio.input.transcription")
    out = audio.get("output")
    if out is not None:
        _expect(out, (dict,), "session.audio.output")
        _only(out, {"format", "voice", "speed"}, "session.audio.output")
        voice = out.get("voice")
        if isinstance(voice, dict):
            _only(voice, {"id"}, "session.audio.output.voice")
            _expect(voice.get("id"), (str,), "session.audio.output.voice.id")
        elif voice is not None:
            _expect(voice, (str,), "session.audio.output.voice")
            _one_of(voice, VOICES, "session.audio.output.voice")
        if out.get("speed") is not None:
            _range(out["speed"], 0.25, 1.5, "session.audio.output.speed", (int, float))


def _check_tools(tools: Any) -> None:
    _expect(tools, (list,), "session.tools")
    for i, tool in enumerate(tools):
        param = f"session.tools[{i}]"
        _expect(tool, (dict,), param)
        _one_of(tool.get("type"), {"function", "mcp"}, f"{param}.type")
        if tool["type"] == "function":
            _only(tool, {"type", "name", "description", "parameters"}, param)
            _expect(tool.get("name"), (str,), f"{param}.name")
            if tool.get("parameters") is not None:
                _expect(tool["parameters"], (dict,), f"{param}.parameters")


def _check_prompt(prompt: Any) -> None:
    _expect(prompt, (dict,), "session.prompt")
    _only(prompt, {"id", "version", "variables"}, "session.prompt")
    _expect(prompt.get("id"), (str,), "session.prompt.id")
    if prompt.get("version") is not None:
        _expect(prompt["version"], (str,), "session.prompt.version")
    if prompt.get("variables") is not None:
        _expect(prompt["variables"], (dict,), "session.prompt.variables")


def check_session(session: Any) -> dict[str, Any]:
    if session is None:
        raise _invalid("session.type", "Missing required parameter: 'session.type'.", "missing_required_parameter")
    _expect(session, (dict,), "session")
    for name in session:  # beta-only fields are unknown to the GA API, like any other stray field
        if name not in SESSION_FIELDS:
            raise _unknown(f"session.{name}")
    if "type" not in session:
        raise _invalid("session.type", "Missing required parameter: 'session.type'.", "missing_required_parameter")
    if session["type"] != "realtime":
        raise _invalid("session.type", f"Invalid value: '{session['type']}'. Supported values are: 'realtime'.")
    if "model" in session:
        _expect(session["model"], (str,), "session.model")
    if "instructions" in session:
        _expect(session["instructions"], (str,), "session.instructions")
    if "output_modalities" in session:
        mods = session["output_modalities"]
        _expect(mods, (list,), "session.output_modalities")
        if mods not in (["audio"], ["text"]):
            raise _invalid("session.output_modalities", "Invalid 'session.output_modalities': expected ['audio'] "
                                                        "or ['text'].")
    if "max_output_tokens" in session and session["max_output_tokens"] != "inf":
        _range(session["max_output_tokens"], 1, 4096, "session.max_output_tokens")
    if "audio" in session:
        _check_audio(session["audio"])
    if "tools" in session:
        _check_tools(session["tools"])
    if "prompt" in session:
        _check_prompt(session["prompt"])
    checked: dict[str, Any] = session
    return checked


def check_expires_after(value: Any) -> int:
    if value is None:
        return 600
    _expect(value, (dict,), "expires_after")
    _only(value, {"anchor", "seconds"}, "expires_after")
    if value.get("anchor", "created_at") != "created_at":
        raise _invalid("expires_after.anchor", f"Invalid value: '{value.get('anchor')}'. Supported values are: "
                                               "'created_at'.")
    seconds = value.get("seconds", 600)
    _range(seconds, 10, 7200, "expires_after.seconds")
    return int(seconds)


def mint(state: SandboxState, headers: dict[str, str], raw: bytes) -> Reply:
    """Answer one ``POST /v1/realtime/client_secrets``."""
    try:
        key = check_key(headers)
        try:
            body = msgspec.json.decode(raw) if raw else None
        except msgspec.DecodeError:
            body = None
        if not isinstance(body, dict):
            raise OpenAIError(400, "We could not parse the JSON body of your request. (HINT: This likely means you "
                                   "aren't using your HTTP library correctly.)", code=None)
        _only(body, {"expires_after", "session"}, "")
        seconds = check_expires_after(body.get("expires_after"))
        session = check_session(body.get("session"))
    except OpenAIError as err:
        return err.reply()
    value = "ek_" + secrets.token_hex(16)
    record = state.add_secret(value, key, session, seconds)
    answer = dict(session)
    answer.update(id="sess_" + secrets.token_hex(12), object="realtime.session")
    answer.setdefault("model", "gpt-realtime")
    answer.setdefault("output_modalities", ["audio"])
    return json_reply(200, {"value": value, "expires_at": record.expires_at, "session": answer})
