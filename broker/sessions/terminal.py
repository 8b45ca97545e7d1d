"""What a session record drops when it ends (``terminated`` or ``failed``).

A terminal record is retained for ``RETENTION_SECONDS`` (7 days) under ``noeviction`` so that
GET and the listing can still answer for it; it only needs what those serve: status,
timestamps, end user, metadata, error, termination reason, the upstream session id. Everything
else is dropped in the same atomic step as the terminal transition: the session config (up to
the whole create body, with its sealed MCP credentials), the frontend token, the minted client
secret, the Avaturn key of the create (``workers/jobs/session_key.py``).

The list is defined once, here, and composed into every script that records a terminal status
(:func:`with_terminal_drop`: ``transition.lua`` and ``broker/sessions/termination_finish.lua``), which read it
as the Lua table ``TERMINAL_DROP``; no caller has to remember it.
"""

from __future__ import annotations

from tenants.budgets import lua_functions as budget_lua
from tenants.outbox import lua_functions as outbox_lua

# A terminating session keeps its slot at most this long per attempt (the concurrency lease a
# claim or a stop sets; the API's stop and the workers' jobs and expiry loop share it).
TERMINATION_GRACE_MS = 120_000

TERMINAL_DROP: tuple[str, ...] = ("config", "avaturn_token", "secret_enc", "secret_expires_at", "avaturn_key_enc")

_LUA = "local TERMINAL_DROP = {" + ", ".join(f"'{name}'" for name in TERMINAL_DROP) + "}\n"


def with_terminal_drop(script: str) -> str:
    """``script`` with the Lua table ``TERMINAL_DROP`` defined before it, and the budget settle
    ``budget_settle(session_key, end_ms)`` (tenants/budget.lua) that the same scripts call where
    they record a terminal status (billable_seconds, budgets, usage windows: issue 21), and the
    outbox's ``append_event(session_key, type)`` (tenants/outbox.lua: issue 20). The outbox
    comes before the budget functions, which call its ``append_tenant_event`` (thresholds)."""
    return _LUA + outbox_lua() + budget_lua() + script
