"""MCP credentials inside an OpenAI Realtime session config: sealed at rest, redacted in views.

An ``mcp`` tool may carry credentials for its server: ``authorization`` and every value of
``headers``. They are secrets like the tenants' upstream keys, so each one has three forms:

- **plaintext**: in admin input (``openai.session``), in a tenant's per-request ``session``
  override, and in the worker's mint request, nowhere else;
- **sealed**: ``SEALED_PREFIX`` + a Fernet token of :class:`tenants.crypto.CredentialCipher`, in the
  tenant record and in a session hash's ``config``. A sealed value passes the GA validation as
  it is, so the admission path carries the tenant's sealed defaults through without any cipher
  work; only the worker opens them (:func:`unseal`), right before the mint;
- **redacted**: ``REDACTED`` in every view (admin API, CLI), never any part of the secret.

Sending ``REDACTED`` back in an admin update keeps the stored value: the one of the same field
(``authorization``, or the header of the same name) of the stored ``mcp`` tool with the same
``server_label`` and the same server (``server_url`` / ``connector_id`` / ``tunnel_id``). So a
view can be edited and sent back whole, but a stored credential can never be redirected to
another server without being sent again. Where there is nothing to keep, the marker is a 400
naming the field. A tenant's override may carry neither the marker nor a sealed-looking value.

Empty strings are not credentials: stored, shown and sent as they are.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import msgspec

from broker.core.errors import InvalidInput

if TYPE_CHECKING:
    from tenants.crypto import CredentialCipher

REDACTED = "<set>"                # what every view shows for a credential: it is set, nothing more
SEALED_PREFIX = "sb_enc:"         # reserved: input values starting with it are refused
# A sealed 8192-character value (<= 32 KiB of UTF-8) is a Fernet token of < 44,000 characters.
MAX_SEALED_CHARS = 44_000
CODE = "invalid_session_config"
_SERVER = ("server_label", "server_url", "connector_id", "tunnel_id")


class Slot(msgspec.Struct):
    """One credential of a config: ``tools[index].authorization`` or ``tools[index].headers[header]``."""

    index: int
    tool: dict[str, Any]
    header: str | None
    path: str

    @property
    def value(self) -> str:
        value: str = self.tool["authorization"] if self.header is None else self.tool["headers"][self.header]
        return value

    def set(self, value: str) -> None:
        if self.header is None:
            self.tool["authorization"] = value
        else:
            self.tool["headers"][self.header] = value


def _credential(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def slots(cfg: Any, prefix: str = "session") -> list[Slot]:
    """Every credential of ``cfg``'s ``mcp`` tools, with its JSON path (``prefix.tools[i]...``).
    Defensive about the shape: it also walks input that is not validated yet."""
    tools = cfg.get("tools") if isinstance(cfg, dict) else None
    if not isinstance(tools, list):
        return []
    out: list[Slot] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "mcp":
            continue
        if _credential(tool.get("authorization")):
            out.append(Slot(i, tool, None, f"{prefix}.tools[{i}].authorization"))
        headers = tool.get("headers")
        if isinstance(headers, dict):
            out += [Slot(i, tool, name, f"{prefix}.tools[{i}].headers.{name}")
                    for name, value in headers.items() if _credential(value)]
    return out


def is_sealed(value: str) -> bool:
    return value.startswith(SEALED_PREFIX)


def _error(path: str, message: str, code: str = CODE) -> InvalidInput:
    return InvalidInput(f"{path} {message}", code=code, field=path)


def _reserved(path: str) -> InvalidInput:
    return _error(path, f'must not start with "{SEALED_PREFIX}" (reserved for credentials encrypted at rest)')


# ---- views ---------------------------------------------------------------------------------


def redacted(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with every credential shown as ``REDACTED`` (``cfg`` itself when it has none)."""
    if not slots(cfg):
        return cfg
    out = copy.deepcopy(cfg)
    for slot in slots(out):
        slot.set(REDACTED)
    return out


# ---- input ---------------------------------------------------------------------------------


def refuse_reserved(cfg: Any, prefix: str = "session") -> None:
    """A tenant's override: plaintext credentials only (the marker and sealed values are the
    broker's own forms; a tenant never sees either)."""
    for slot in slots(cfg, prefix):
        if slot.value == REDACTED:
            raise _error(slot.path, f'is the redaction marker "{REDACTED}"; send the credential itself')
        if is_sealed(slot.value):
            raise _reserved(slot.path)


def keep_stored(new: dict[str, Any], stored: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Admin input ``new`` (validated) with every ``REDACTED`` replaced by the stored value it
    stands for (see the module docstring), or InvalidInput naming the field when there is none.
    Sealed-looking input is refused. Returns ``new`` itself when it holds no marker."""
    found = slots(new, prefix)
    for slot in found:
        if is_sealed(slot.value):
            raise _reserved(slot.path)
    if all(slot.value != REDACTED for slot in found):
        return new
    out = copy.deepcopy(new)
    stored_tools = stored.get("tools") if isinstance(stored.get("tools"), list) else []
    for slot in slots(out, prefix):
        if slot.value == REDACTED:
            slot.set(_stored_value(stored_tools, slot))
    return out


def _server(tool: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(tool.get(name) for name in _SERVER)


def _stored_value(stored_tools: list[Any], slot: Slot) -> str:
    """The stored credential a marker keeps: same field of the stored mcp tool with the same
    server (the one at the same position first, so duplicated labels still round-trip)."""
    server = _server(slot.tool)
    candidates = [t for t in stored_tools if isinstance(t, dict) and t.get("type") == "mcp" and _server(t) == server]
    if slot.index < len(stored_tools) and any(t is stored_tools[slot.index] for t in candidates):
        candidates.insert(0, stored_tools[slot.index])
    for tool in candidates:
        value = tool.get("authorization") if slot.header is None else (tool.get("headers") or {}).get(slot.header)
        if _credential(value):
            return str(value)
    label = msgspec.json.encode(slot.tool.get("server_label")).decode()
    raise _error(
        slot.path,
        f'is the redaction marker "{REDACTED}", which keeps a stored credential, but no stored mcp tool with '
        f"server_label {label} and the same server has one here; send the credential itself",
    )


# ---- at rest -------------------------------------------------------------------------------


def seal(cfg: dict[str, Any], cipher: CredentialCipher | None, prefix: str = "session") -> dict[str, Any]:
    """``cfg`` with every plaintext credential encrypted (sealed ones kept). ``cfg`` itself when
    nothing is to be encrypted: no cipher work for a config without MCP credentials."""
    if all(is_sealed(slot.value) for slot in slots(cfg, prefix)):
        return cfg
    out = copy.deepcopy(cfg)
    for slot in slots(out, prefix):
        if not is_sealed(slot.value):
            if cipher is None:
                raise _error(slot.path, "cannot be stored: BROKER_SECRET_KEY is not set, and MCP credentials are "
                                        "only stored encrypted", code="secret_key_missing")
            slot.set(SEALED_PREFIX + cipher.encrypt(slot.value))
    return out


def reseal(cfg: dict[str, Any], cipher: CredentialCipher) -> dict[str, Any] | None:
    """Key rotation: ``cfg`` with every sealed credential re-encrypted with the first key (and any
    plaintext one left by an older version sealed); None when it holds no credential.
    Raises CredentialError when no configured key opens one."""
    if not slots(cfg):
        return None
    out = copy.deepcopy(cfg)
    for slot in slots(out):
        value = slot.value
        token = cipher.rotate(value[len(SEALED_PREFIX):]) if is_sealed(value) else cipher.encrypt(value)
        slot.set(SEALED_PREFIX + token)
    return out


def unseal(cfg: dict[str, Any], cipher: CredentialCipher) -> list[str]:
    """Decrypt ``cfg``'s sealed credentials in place (the worker's freshly decoded copy, right
    before the mint); the plaintexts, so that no upstream message echoing one is passed on.
    Raises CredentialError when one cannot be decrypted."""
    plain: list[str] = []
    for slot in slots(cfg):
        if is_sealed(slot.value):
            slot.set(cipher.decrypt(slot.value[len(SEALED_PREFIX):]))
        plain.append(slot.value)
    return plain


def mentions(text: str, secrets: list[str], piece: int = 8) -> bool:
    """Whether ``text`` contains one of ``secrets`` or any ``piece``-character part of one."""
    for secret in secrets:
        if len(secret) <= piece:
            if len(secret) >= 4 and secret in text:
                return True
            continue
        if any(secret[i:i + piece] in text for i in range(len(secret) - piece + 1)):
            return True
    return False
