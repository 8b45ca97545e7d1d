"""GA Realtime session validation: every beta field is a 400 naming the field and saying what to
send instead; GA fields are type- and range-checked; unknown fields are refused; overrides
merge over tenant defaults only where the tenant's policy allows."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from broker.core.errors import InvalidInput
from tenants.session_config import GA_FIELDS, merge_session, validate_session

FULL_GA: dict[str, Any] = {
    "type": "realtime",
    "model": "gpt-realtime-2",
    "instructions": "Be brief.",
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "noise_reduction": {"type": "near_field"},
            "transcription": {"model": "gpt-4o-transcribe", "language": "en", "prompt": "tech words"},
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 500,
                               "prefix_padding_ms": 300, "create_response": True, "idle_timeout_ms": None},
        },
        "output": {"format": {"type": "audio/pcmu"}, "voice": "marin", "speed": 1.1},
    },
    "output_modalities": ["audio"],
    "tools": [
        {"type": "function", "name": "get_weather", "description": "Weather now",
         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"type": "mcp", "server_label": "docs", "server_url": "https://mcp.example/sse", "require_approval": "never"},
    ],
    "tool_choice": {"type": "function", "name": "get_weather"},
    "prompt": {"id": "pmpt_123", "version": "6", "variables": {"city": "Paris"}},
    "max_output_tokens": "inf",
    "truncation": {"type": "retention_ratio", "retention_ratio": 0.8},
    "tracing": {"workflow_name": "avatar", "metadata": {"a": "b"}},
    "include": ["item.input_audio_transcription.logprobs"],
    "reasoning": {"effort": "low"},
    "parallel_tool_calls": False,
}

# beta field -> (value a tenant would send, words the advice must contain)
NON_GA = {
    "temperature": (0.8, "remove it (GA sessions have no temperature)"),
    "voice": ("alloy", "send it as session.audio.output.voice"),
    "modalities": (["audio", "text"], "session.output_modalities"),
    "input_audio_format": ("pcm16", "session.audio.input.format"),
    "output_audio_format": ("pcm16", "session.audio.output.format"),
    "input_audio_transcription": ({"model": "whisper-1"}, "session.audio.input.transcription"),
    "turn_detection": ({"type": "server_vad"}, "session.audio.input.turn_detection"),
    "max_response_output_tokens": (100, "session.max_output_tokens"),
}


def bad(cfg: Any, prefix: str = "session") -> InvalidInput:
    with pytest.raises(InvalidInput) as exc:
        validate_session(cfg, prefix)
    assert exc.value.status == 400 and exc.value.field and exc.value.message.startswith(exc.value.field)
    return exc.value


def test_full_ga_config_is_accepted_unchanged_and_input_is_not_mutated() -> None:
    original = copy.deepcopy(FULL_GA)
    assert validate_session(FULL_GA) == FULL_GA
    assert FULL_GA == original


def test_type_realtime_is_added_when_absent() -> None:
    assert validate_session({"model": "gpt-realtime"}) == {"type": "realtime", "model": "gpt-realtime"}
    assert validate_session({}) == {"type": "realtime"}
    assert bad({"type": "transcription"}).field == "session.type"


@pytest.mark.parametrize("name", sorted(NON_GA))
def test_each_beta_field_is_refused_with_its_replacement(name: str) -> None:
    value, advice = NON_GA[name]
    err = bad({"model": "gpt-realtime", name: value})
    assert err.field == f"session.{name}" and err.code == "invalid_session_config"
    assert advice in err.message and "not a GA Realtime field" in err.message


def test_beta_field_wins_over_other_errors_and_names_the_admin_prefix() -> None:
    err = bad({"bogus": 1, "audio": "x", "temperature": 0.7}, "openai.session")
    assert err.field == "openai.session.temperature"


def test_prompt_version_must_be_a_string() -> None:
    err = bad({"prompt": {"id": "pmpt_1", "version": 6}})
    assert err.field == "session.prompt.version" and 'send the version as a string, e.g. "6"' in err.message
    assert bad({"prompt": {"version": "6"}}).field == "session.prompt.id"
    assert validate_session({"prompt": {"id": "pmpt_1", "version": "6"}})["prompt"]["version"] == "6"


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"audio": {"output": {"speed": 0.24}}}, "session.audio.output.speed"),
        ({"audio": {"output": {"speed": 1.51}}}, "session.audio.output.speed"),
        ({"audio": {"output": {"speed": "1"}}}, "session.audio.output.speed"),
        ({"audio": {"output": {"voice": "nova"}}}, "session.audio.output.voice"),
        ({"audio": {"output": {"voice": {"name": "x"}}}}, "session.audio.output.voice.name"),
        ({"audio": {"output": {"voice": {}}}}, "session.audio.output.voice.id"),
        ({"audio": {"voice": "alloy"}}, "session.audio.voice"),
        ({"audio": {"input": {"format": "pcm16"}}}, "session.audio.input.format"),
        ({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}, "session.audio.input.format.rate"),
        ({"audio": {"input": {"turn_detection": {"type": "semantic_vad", "threshold": 0.5}}}},
         "session.audio.input.turn_detection.threshold"),
        ({"audio": {"input": {"turn_detection": {"type": "vad"}}}}, "session.audio.input.turn_detection.type"),
        ({"output_modalities": ["audio", "text"]}, "session.output_modalities"),
        ({"output_modalities": []}, "session.output_modalities"),
        ({"max_output_tokens": 0}, "session.max_output_tokens"),
        ({"max_output_tokens": 4097}, "session.max_output_tokens"),
        ({"max_output_tokens": True}, "session.max_output_tokens"),
        ({"max_output_tokens": "100"}, "session.max_output_tokens"),
        ({"model": ""}, "session.model"),
        ({"model": "m" * 65}, "session.model"),
        ({"model": 4}, "session.model"),
        ({"instructions": "x" * 32_769}, "session.instructions"),
        ({"tools": [{"type": "function", "description": "no name"}]}, "session.tools[0].name"),
        ({"tools": [{"type": "function", "name": "f", "parameters": "{}"}]}, "session.tools[0].parameters"),
        ({"tools": [{"type": "retrieval"}]}, "session.tools[0].type"),
        ({"tools": [{"type": "mcp", "server_label": "x"}]}, "session.tools[0]"),
        ({"tools": {"type": "function"}}, "session.tools"),
        ({"tool_choice": "sometimes"}, "session.tool_choice"),
        ({"tracing": "on"}, "session.tracing"),
        ({"truncation": {"type": "retention_ratio", "retention_ratio": 1.5}}, "session.truncation.retention_ratio"),
        ({"parallel_tool_calls": 1}, "session.parallel_tool_calls"),
        ({"reasoning": {"effort": "max"}}, "session.reasoning.effort"),
        ({"client_secret": {"expires_after": 60}}, "session.client_secret"),
        ({"audio": {"output": {"pitch": 2}}}, "session.audio.output.pitch"),
    ],
)
def test_ga_fields_are_type_and_range_checked(cfg: dict[str, Any], field: str) -> None:
    assert bad(cfg).field == field


def test_bounds_are_inclusive() -> None:
    for speed in (0.25, 1.5, 1):
        validate_session({"audio": {"output": {"speed": speed}}})
    for tokens in (1, 4096, "inf"):
        validate_session({"max_output_tokens": tokens})
    validate_session({"instructions": "x" * 32_768, "model": "m" * 64, "output_modalities": ["text"]})
    validate_session({"audio": {"output": {"voice": {"id": "voice_1234"}}}})


def test_tool_count_and_schema_size_are_bounded() -> None:
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    validate_session({"tools": [tool] * 128})
    assert bad({"tools": [tool] * 129}).field == "session.tools"
    huge = {"type": "object", "description": "x" * (16 * 1024)}
    assert bad({"tools": [{**tool, "parameters": huge}]}).field == "session.tools[0].parameters"


def test_non_json_and_non_object_configs_are_refused() -> None:
    assert bad(["model"]).field == "session"
    assert bad({"instructions": object()}).field == "session"


# ---- merge ---------------------------------------------------------------------------------

DEFAULTS = {"type": "realtime", "model": "gpt-realtime", "instructions": "Default.",
            "audio": {"output": {"voice": "marin", "speed": 1.0},
                      "input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 700}}}}
ALLOWED = ["instructions", "audio", "prompt"]


def merge_bad(overrides: Any, allowed: list[str] = ALLOWED) -> InvalidInput:
    with pytest.raises(InvalidInput) as exc:
        merge_session(DEFAULTS, overrides, allowed)
    return exc.value


def test_no_overrides_gives_validated_defaults() -> None:
    assert merge_session(DEFAULTS, None, ALLOWED) == DEFAULTS


def test_nested_objects_merge_and_defaults_are_not_mutated() -> None:
    snapshot = copy.deepcopy(DEFAULTS)
    merged = merge_session(DEFAULTS, {"audio": {"output": {"voice": "cedar"}}, "instructions": "Hi"}, ALLOWED)
    assert merged["audio"]["output"] == {"voice": "cedar", "speed": 1.0}
    assert merged["audio"]["input"] == DEFAULTS["audio"]["input"]
    assert merged["instructions"] == "Hi" and merged["model"] == "gpt-realtime"
    assert DEFAULTS == snapshot


def test_an_object_of_another_type_replaces_instead_of_merging() -> None:
    merged = merge_session(
        DEFAULTS, {"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}}, ALLOWED
    )
    assert merged["audio"]["input"]["turn_detection"] == {"type": "semantic_vad", "eagerness": "high"}


def test_override_outside_policy_is_refused_naming_the_field() -> None:
    err = merge_bad({"model": "gpt-realtime-2"})
    assert err.field == "session.model" and err.code == "override_not_allowed"
    assert "instructions" in err.message  # says what may be overridden
    assert merge_bad({"instructions": "x"}, allowed=[]).code == "override_not_allowed"
    assert merge_session(DEFAULTS, {"type": "realtime"}, [])["type"] == "realtime"


def test_beta_names_get_their_advice_even_when_not_overridable() -> None:
    for name, (value, advice) in NON_GA.items():
        err = merge_bad({name: value}, allowed=[])
        assert err.field == f"session.{name}" and err.code == "invalid_session_config" and advice in err.message


def test_unknown_and_invalid_overrides() -> None:
    assert merge_bad({"bogus": 1}).field == "session.bogus"
    assert merge_bad({"bogus": 1}).code == "invalid_session_config"
    err = merge_bad({"audio": {"output": {"speed": 3}}})
    assert (err.field, err.code) == ("session.audio.output.speed", "invalid_session_config")
    assert merge_bad(["instructions"]).field == "session"


def test_ga_fields_are_the_top_level_names() -> None:
    assert {"instructions", "audio", "prompt", "model", "tools", "output_modalities"} <= GA_FIELDS
    assert not GA_FIELDS & set(NON_GA)
