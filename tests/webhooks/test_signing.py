"""Signatures verified by a third-party Standard Webhooks implementation (the ``standardwebhooks``
package), not by our own code; and the address rule."""

from __future__ import annotations

import json
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from broker.webhooks.addresses import is_public
from broker.webhooks.signing import headers, new_secret


def test_a_signed_delivery_verifies_with_the_standardwebhooks_library() -> None:
    secret = new_secret()
    body = json.dumps({"id": "evt_1-0", "type": "test.ping", "data": {}}).encode()
    h = headers([secret], "evt_1-0", int(time.time()), body)
    assert Webhook(secret).verify(body, h) == {"id": "evt_1-0", "type": "test.ping", "data": {}}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, h)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", h)


def test_during_a_rotation_either_secret_verifies() -> None:
    old, new = new_secret(), new_secret()
    body = b'{"id":"evt_2-0"}'
    h = headers([new, old], "evt_2-0", int(time.time()), body)
    assert len(h["webhook-signature"].split(" ")) == 2
    for s in (old, new):
        Webhook(s).verify(body, h)


@pytest.mark.parametrize("addr,public", [
    ("93.184.216.34", True), ("2606:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("::1", False),
    ("fe80::1%eth0", False), ("fd00::1", False), ("::ffff:127.0.0.1", False), ("::ffff:93.184.216.34", True),
    ("224.0.0.1", False), ("not-an-ip", False),
])
def test_only_public_unicast_addresses_pass(addr: str, public: bool) -> None:
    assert is_public(addr) is public
