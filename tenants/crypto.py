"""Tenant upstream credentials at rest: Fernet tokens under ``BROKER_SECRET_KEY``.

``BROKER_SECRET_KEY`` holds one or more urlsafe-base64 32-byte keys, comma-separated. The
first encrypts; all of them decrypt (``MultiFernet``), so a key can be rotated in by putting
the new one first, running ``rotate_secrets`` and then dropping the old one.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from broker.core.errors import BrokerError
from broker.core.settings import Settings, SettingsError


class CredentialError(BrokerError):
    """A stored credential cannot be decrypted with any configured key (never echoes it)."""

    default_code = "credential_decrypt_failed"


def generate_secret_key() -> str:
    """A new key for ``BROKER_SECRET_KEY`` (urlsafe base64 of 32 random bytes)."""
    return Fernet.generate_key().decode("ascii")


class CredentialCipher:
    __slots__ = ("_fernet", "_first", "key_count")

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise SettingsError("BROKER_SECRET_KEY is not set: generate one with `session-broker secrets generate`")
        fernets = []
        for key in keys:
            try:
                fernets.append(Fernet(key.encode("ascii") if isinstance(key, str) else key))
            except (ValueError, TypeError, UnicodeError):
                # never echo the key itself
                raise SettingsError(
                    "BROKER_SECRET_KEY must be urlsafe-base64 32-byte key(s), comma-separated"
                ) from None
        self._fernet = MultiFernet(fernets)
        self._first = fernets[0]
        self.key_count = len(fernets)

    @classmethod
    def from_settings(cls, settings: Settings) -> CredentialCipher:
        """Raises :class:`SettingsError` naming ``BROKER_SECRET_KEY`` when none is set."""
        settings.require_secret_key()
        return cls(settings.secret_keys)

    @classmethod
    def optional(cls, settings: Settings) -> CredentialCipher | None:
        return cls(settings.secret_keys) if settings.secret_keys else None

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError, ValueError, TypeError):
            raise CredentialError(
                "a stored tenant credential cannot be decrypted with any configured BROKER_SECRET_KEY "
                "(was the key that encrypted it removed?)"
            ) from None

    def is_current(self, token: str) -> bool:
        """Whether ``token`` is encrypted with the first key (a rotation would change nothing)."""
        try:
            self._first.decrypt(token.encode("ascii"))
        except (InvalidToken, UnicodeError, ValueError, TypeError):
            return False
        return True

    def rotate(self, token: str) -> str:
        """Re-encrypt ``token`` with the first key (it must decrypt with one of the keys)."""
        try:
            return self._fernet.rotate(token.encode("ascii")).decode("ascii")
        except (InvalidToken, UnicodeError, ValueError, TypeError):
            raise CredentialError(
                "a stored tenant credential cannot be re-encrypted: no configured BROKER_SECRET_KEY decrypts it"
            ) from None
