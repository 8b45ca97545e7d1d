"""Webhook endpoint URLs (contract section 11, ``broker/webhooks/urls.py``): https only, public
addresses only, unless ``BROKER_WEBHOOK_ALLOW_PRIVATE=true``; each refusal is a 400
``invalid_webhook_url`` naming its reason. Literal IPs, ``localhost`` and the reserved
``.invalid`` domain only: no test here depends on outside DNS."""

from __future__ import annotations

import asyncio
import socket

import pytest

from broker.core.errors import InvalidInput
from broker.core.settings import Settings, SettingsError
from broker.webhooks import urls
from broker.webhooks.urls import MAX_URL_LENGTH, validate_url

PUBLIC = "https://93.184.216.34/hooks"


def refused(url: str, allow_private: bool = False) -> str:
    with pytest.raises(InvalidInput) as caught:
        asyncio.run(validate_url(url, allow_private))
    err = caught.value
    assert (err.status, err.code, err.field) == (400, "invalid_webhook_url", "url")
    return err.message


@pytest.mark.parametrize(("url", "normalised"), [
    (PUBLIC, PUBLIC),
    ("HTTPS://93.184.216.34", "https://93.184.216.34/"),
    ("https://93.184.216.34:8443/a/b?x=1&y=2", "https://93.184.216.34:8443/a/b?x=1&y=2"),
    ("https://[2606:4700:4700::1111]/h", "https://[2606:4700:4700::1111]/h"),
])
def test_public_https_urls_are_accepted_and_normalised(url: str, normalised: str) -> None:
    assert asyncio.run(validate_url(url, False)) == normalised


@pytest.mark.parametrize(("url", "reason"), [
    ("/hooks", "absolute"),
    ("93.184.216.34/hooks", "absolute"),
    ("ftp://93.184.216.34/", "https"),
    ("http://93.184.216.34/", "BROKER_WEBHOOK_ALLOW_PRIVATE"),
    ("https://user:pw@93.184.216.34/", "user name or password"),
    ("https://token@93.184.216.34/", "user name or password"),
    ("https://93.184.216.34/#frag", "fragment"),
    ("https://93.184.216.34/a b", "spaces"),
    ("https://93.184.216.34:99999/", "port"),
    ("https:///path", "host"),
    ("https://" + "a" * 64 + ".example/", "host name"),
    # IPv4 in a form the resolver reads but the delivery's URL parser refuses (every attempt
    # would fail): decimal, hex, octal, short forms of 93.184.216.34
    ("https://1572395042/", "dotted decimal"),
    ("https://0x5db8d822/", "dotted decimal"),
    ("https://0x5d.0xb8.0xd8.0x22/", "dotted decimal"),
    ("https://0135.0270.0330.042/", "dotted decimal"),
    ("https://93.12114978/", "dotted decimal"),
    ("https://093.184.216.34/", "dotted decimal"),
])
def test_malformed_urls_are_refused_naming_the_reason(url: str, reason: str) -> None:
    assert reason in refused(url)


def test_a_url_longer_than_2048_characters_is_refused() -> None:
    url = PUBLIC + "/" + "x" * (MAX_URL_LENGTH - len(PUBLIC))
    assert len(url) == MAX_URL_LENGTH + 1
    assert "2048" in refused(url)
    assert asyncio.run(validate_url(url[:-1], False)) == url[:-1]


@pytest.mark.parametrize("url", [
    "https://127.0.0.1/", "https://10.1.2.3/", "https://192.168.0.10/", "https://169.254.169.254/latest",
    "https://[::1]/", "https://[fd00::1]/", "https://[::ffff:10.0.0.1]/", "https://0.0.0.0/", "https://localhost/",
    "https://[64:ff9b::a00:1]/", "https://[2002:a00:1::]/", "https://[::ffff:0:a00:1]/", "https://[64:ff9b:1::5db8:d822]/",
])
def test_private_and_loopback_addresses_are_refused_unless_allowed(url: str) -> None:
    assert "not public" in refused(url)


def test_allow_private_admits_http_and_loopback() -> None:
    assert asyncio.run(validate_url("http://127.0.0.1:8080/hook", True)) == "http://127.0.0.1:8080/hook"
    assert asyncio.run(validate_url("https://localhost/hook", True)) == "https://localhost/hook"
    # the other rules still hold
    assert "user name" in refused("http://u:p@127.0.0.1/", allow_private=True)
    assert "https" in refused("ftp://127.0.0.1/", allow_private=True)


def test_a_host_that_resolves_to_nothing_is_refused() -> None:
    # .invalid never resolves (RFC 6761): the local resolver answers at once
    assert "does not resolve" in refused("https://no-such-host.invalid/hook", allow_private=True)


def test_a_slow_dns_lookup_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant: a resolver that never answers costs at most the timeout, then a 400 naming DNS."""
    async def hang(*_: object, **__: object) -> list[object]:
        await asyncio.sleep(3600)
        return []

    async def run() -> str:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "getaddrinfo", hang)
        with pytest.raises(InvalidInput) as caught:
            await validate_url("https://slow.example/hook", False, dns_timeout=0.2)
        return caught.value.message

    message = asyncio.run(run())
    assert "DNS" in message and "0.2 s" in message


def test_every_resolved_address_must_be_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name with one public and one private address is refused (a delivery could reach either)."""
    async def both(host: str, port: int, **_: object) -> list[tuple[object, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]

    async def run() -> None:
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", both)
        with pytest.raises(InvalidInput, match="not public") as caught:
            await urls.validate_url("https://mixed.example/hook", False)
        # the private address is not disclosed: it would map the broker's internal DNS for the tenant
        assert "10.0.0.7" not in caught.value.message and "93.184.216.34" not in caught.value.message

    asyncio.run(run())


def test_the_setting_parses_like_a_boolean() -> None:
    assert Settings.from_env({}).webhook_allow_private is False
    for raw, value in (("true", True), ("TRUE", True), ("1", True), ("false", False), ("0", False)):
        assert Settings.from_env({"BROKER_WEBHOOK_ALLOW_PRIVATE": raw}).webhook_allow_private is value
    with pytest.raises(SettingsError, match="BROKER_WEBHOOK_ALLOW_PRIVATE"):
        Settings.from_env({"BROKER_WEBHOOK_ALLOW_PRIVATE": "maybe"})
    assert "webhook_allow_private=True" in repr(Settings.from_env({"BROKER_WEBHOOK_ALLOW_PRIVATE": "true"}))
