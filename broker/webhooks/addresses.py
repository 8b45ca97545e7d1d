"""Which addresses a webhook may be delivered to (contract section 11): public ones only, unless
``BROKER_WEBHOOK_ALLOW_PRIVATE=true``. Checked on the resolved addresses (at create/update, and
again when a delivery connects, so a name that later resolves to a private address is refused)."""

from __future__ import annotations

import ipaddress


def is_public(address: str) -> bool:
    """True for a globally routable unicast address (IPv4-mapped IPv6 judged as the IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast
