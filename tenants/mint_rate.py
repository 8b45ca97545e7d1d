"""Pacing of OpenAI client-secret mints (``openai_requests_per_minute``).

One schedule per tenant in Redis (``TenantScope.mint_bucket()``), shared by every process: a
GCRA / virtual-scheduling "theoretical arrival time" updated by one Lua step
(``mint_rate.lua``). A session's slot is reserved once, at admission: ``tenants/admission.lua``
includes the script's functions (:func:`lua_library`), checks the slot against the session's
provisioning deadline and takes it in the same atomic step as the other quotas.
:func:`reserve_mint` is the standalone form: it always reserves a slot and says how long to wait
for it:

* the sustained rate is ``per_minute`` mints per minute (emission interval
  ``T = ceil(60000 / per_minute)`` ms);
* a burst of ``min(per_minute, 10)`` mints may go at once after an idle period
  (tolerance ``tau = (burst - 1) * T``): in any window of ``W`` ms at most
  ``burst + floor(W / T)`` slots are granted;
* reservations are FIFO: a later call never gets an earlier slot than an earlier call, so
  jobs over the rate wait in order instead of failing.

The returned delay IS the reservation: the caller mints after waiting that long (e.g.
``await asyncio.sleep(delay)`` in the job) and must not call :func:`reserve_mint` again for
the same mint, or it would take a second slot behind everyone queued meanwhile.
"""

from __future__ import annotations

import weakref
from importlib import resources

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from tenants.scope import TenantScope

MAX_BURST = 10

_SOURCE = resources.files(__package__).joinpath("mint_rate.lua").read_text()
_LIBRARY = _SOURCE[: _SOURCE.index("\n-- main\n") + 1]
_scripts: weakref.WeakKeyDictionary[aioredis.Redis, AsyncScript] = weakref.WeakKeyDictionary()


def schedule(per_minute: int) -> tuple[int, int]:
    """(emission interval T, tolerance tau) in ms for ``per_minute`` mints per minute."""
    if per_minute < 1:
        raise ValueError("per_minute must be at least 1")
    interval = max(1, -(-60_000 // per_minute))
    burst = min(per_minute, MAX_BURST)
    return interval, (burst - 1) * interval


def lua_library() -> str:
    """The functions of ``mint_rate.lua`` (``mint_peek(key, now, tau)`` -> grant, tat, last;
    ``mint_take(key, now, interval, grant, tat)`` -> new tat) without its main part, for a
    script that checks a slot before taking it in the same atomic step (``admission.lua``)."""
    return _LIBRARY


def lua_function(name: str) -> str:
    """``mint_rate.lua`` as a Lua function ``name(KEYS, ARGV)`` (same keys and arguments, returns
    the grant), for a script that reserves a slot in the same atomic step as its own work."""
    return f"local function {name}(KEYS, ARGV)\n{_SOURCE}\nend\n"


def _script(redis: aioredis.Redis) -> AsyncScript:
    script = _scripts.get(redis)
    if script is None:
        script = _scripts[redis] = redis.register_script(_SOURCE)
    return script


async def reserve_mint(redis: aioredis.Redis, tenant_id: str, per_minute: int, now_ms: int) -> float:
    """Reserve the tenant's next mint slot; 0.0 if it is now, else the seconds to wait for it."""
    interval, tau = schedule(per_minute)
    grant = int(
        await _script(redis)(keys=[TenantScope(tenant_id).mint_bucket()], args=[now_ms, interval, tau])
    )
    return max(0, grant - now_ms) / 1000.0
