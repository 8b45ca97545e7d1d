"""Which addresses a webhook may be delivered to (contract section 11): public ones only, unless
``BROKER_WEBHOOK_ALLOW_PRIVATE=true``. Checked on the resolved addresses (at create/update, and
again when a delivery connects, so a name that later resolves to a private address is refused)."""

from __future__ import annotations

import ipaddress


# IPv6 ranges that carry an IPv4 address, judged as that IPv4 (``ipaddress`` calls them global):
# NAT64 (a DNS64/NAT64 network, e.g. an IPv6-only cloud subnet, connects 64:ff9b::a00:1 to
# 10.0.0.1), SIIT's IPv4-translated ::ffff:0:0/96, the deprecated IPv4-compatible ::/96 and
# 6to4 (2002::/16).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: local use, never public
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64 or ip in _TRANSLATED or ip in _COMPATIBLE:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIX_TO_FOUR:
        return ip.sixtofour
    return None


def is_public(address: str) -> bool:
    """True for a globally routable unicast address; an IPv6 address that carries an IPv4 one
    (IPv4-mapped, NAT64, IPv4-translated, IPv4-compatible, 6to4) is judged as that IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return False
        v4 = _embedded_v4(ip)
        if v4 is not None:
            ip = v4
    return ip.is_global and not ip.is_multicast
