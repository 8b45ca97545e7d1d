"""Upstream clients of the worker: one module per upstream, errors translated at the boundary.

The rest of the code sees :class:`UpstreamRejected` / :class:`UpstreamUnavailable` (see
:mod:`workers.upstreams.errors`), never SDK exceptions or raw upstream bodies.
"""

from workers.upstreams.avaturn import AvaturnClient, AvaturnSession
from workers.upstreams.errors import UpstreamError, UpstreamRejected, UpstreamUnavailable
from workers.upstreams.openai import MintedSecret, OpenAIMinter

__all__ = [
    "AvaturnClient",
    "AvaturnSession",
    "MintedSecret",
    "OpenAIMinter",
    "UpstreamError",
    "UpstreamRejected",
    "UpstreamUnavailable",
]
