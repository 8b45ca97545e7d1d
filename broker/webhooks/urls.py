"""Webhook endpoint URLs (contract section 11): ``https`` only, and every address the host
resolves to must be public, unless ``BROKER_WEBHOOK_ALLOW_PRIVATE=true`` (development, tests),
which also allows ``http`` and private or loopback addresses.

:func:`validate_url` is called when an endpoint is created or its URL changed: it answers the
normalised URL, or raises 400 ``invalid_webhook_url`` (field ``url``) naming the reason. The
resolution here is a check for the tenant's benefit (a typo, a private name); the delivery checks
the addresses again when it connects (``addresses.is_public``), since DNS can change.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from urllib.parse import urlsplit

from broker.core.errors import InvalidInput

from .addresses import is_public

MAX_URL_LENGTH = 2048
DNS_TIMEOUT_SECONDS = 3.0
# a host the resolver (inet_aton) reads as an IPv4 address although it is not dotted decimal:
# 1 to 4 labels of decimal, octal (leading 0) or hex (0x) digits
_NUMERIC_HOST = re.compile(r"(?:(?:0x[0-9a-f]*|[0-9]+)\.){0,3}(?:0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x20\x7f-\x9f\\]")  # controls, space, DEL, C1; backslash (parsers disagree)


def invalid(reason: str) -> InvalidInput:
    return InvalidInput(f"url {reason}", code="invalid_webhook_url", field="url")


def _host_for_url(host: str) -> str:
    """The host as written in a URL: IPv6 literals in brackets, names IDNA-encoded, lower case."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    try:
        encoded = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise invalid("has a host name that is not valid") from None
    if not encoded or len(encoded) > 253 or not all(
        0 < len(label) <= 63 and re.fullmatch(r"[a-z0-9_-]+", label) for label in encoded.rstrip(".").split(".")
    ):
        raise invalid("has a host name that is not valid")
    return encoded


def _is_dotted_decimal(host: str) -> bool:
    try:
        return ipaddress.IPv4Address(host).compressed == host
    except ValueError:
        return False


def parse(url: str, allow_private: bool) -> tuple[str, str, int]:
    """(normalised URL, host to resolve, port), or 400 ``invalid_webhook_url``; no I/O."""
    if len(url) > MAX_URL_LENGTH:
        raise invalid(f"is longer than {MAX_URL_LENGTH} characters")
    if _FORBIDDEN_CHARS.search(url):
        raise invalid("must not contain spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise invalid("is not a valid URL (check the host and the port)") from None
    scheme = parts.scheme.lower()
    if not scheme or not parts.netloc:
        raise invalid("must be an absolute URL (https://host/path)")
    if scheme not in ("https", "http"):
        raise invalid("must use https")
    if scheme == "http" and not allow_private:
        raise invalid("must use https (http is allowed only with BROKER_WEBHOOK_ALLOW_PRIVATE=true)")
    if "@" in parts.netloc:
        raise invalid("must not contain a user name or password")
    if "#" in url:
        raise invalid("must not contain a fragment (#...)")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise invalid("has no host")
    if port == 0:
        raise invalid("has port 0")
    if _NUMERIC_HOST.fullmatch(host) and not _is_dotted_decimal(host):
        raise invalid("writes an IPv4 address in a form other than dotted decimal (a.b.c.d)")
    shown = _host_for_url(host)
    netloc = shown if port is None else f"{shown}:{port}"
    normalised = f"{scheme}://{netloc}{parts.path or '/'}" + (f"?{parts.query}" if parts.query else "")
    if len(normalised) > MAX_URL_LENGTH:
        raise invalid(f"is longer than {MAX_URL_LENGTH} characters")
    target = shown.strip("[]")
    return normalised, target, port if port is not None else (443 if scheme == "https" else 80)


async def resolve(host: str, port: int, timeout: float = DNS_TIMEOUT_SECONDS) -> list[str]:
    """The addresses ``host`` resolves to (the event loop's getaddrinfo, bounded by ``timeout``),
    or 400 naming the DNS failure."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    except TimeoutError:
        raise invalid(f"host {host!r} could not be resolved: the DNS lookup took more than {timeout:g} s") from None
    except (socket.gaierror, UnicodeError, OSError):
        raise invalid(f"host {host!r} does not resolve to any address (DNS)") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    if not addresses:
        raise invalid(f"host {host!r} does not resolve to any address (DNS)")
    return addresses


async def validate_url(url: str, allow_private: bool, *, dns_timeout: float = DNS_TIMEOUT_SECONDS) -> str:
    """The normalised URL (scheme and host in lower case, the path ``/`` when empty), or 400
    ``invalid_webhook_url`` naming the reason: not absolute, not https (http only with
    ``allow_private``), a user name or password, a fragment, longer than 2048 characters, a host
    that resolves to nothing, or (without ``allow_private``) to an address that is not public."""
    normalised, host, port = parse(url, allow_private)
    addresses = await resolve(host, port, dns_timeout)
    if not allow_private:
        private = [a for a in addresses if not is_public(a)]
        if private:
            # the address itself is not named: for a name it would tell the tenant what the
            # broker's own resolver answers for internal names (a map of the private network)
            raise invalid(
                f"host {host!r} is or resolves to an address that is not public: webhooks are delivered "
                "to public addresses only"
            )
    return normalised
