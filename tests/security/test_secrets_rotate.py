"""``session-broker secrets rotate`` (issue 17, item 8): every record is checked before any is
written; nothing is written unless every one can be re-encrypted; one line per tenant and
outcome; the exit code says which. Real CLI processes, real Redis."""

from __future__ import annotations

import json

import redis as sync_redis
from cryptography.fernet import Fernet, InvalidToken

from broker.core.settings import Settings
from tenants.crypto import generate_secret_key
from tests.fixtures.stack import Admin, ApiServer

from .test_credentials_at_rest import _assert_not_in, _cli, _credentials, _stored


def _lines(out: str) -> dict[str, list[str]]:
    """``{tenant_id: [outcome, detail...]}`` from the per-tenant lines."""
    got: dict[str, list[str]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].startswith("ten_"):
            got[parts[1]] = [parts[0], " ".join(parts[2:])]
    return got


def test_rotate_writes_nothing_unless_every_record_can_be_rotated(settings: Settings, api: ApiServer,
                                                                 admin: Admin) -> None:
    """Invariant: with a key list that decrypts only some tenants' credentials, `secrets rotate`
    exits 1, rewrites no record (every stored byte unchanged) and prints one line per tenant: the
    undecryptable one naming the record at fault; with a complete key list it exits 0, rotates
    every tenant holding credentials, reports the others unchanged, and a second run changes
    nothing. No credential or key is ever printed."""
    old = settings.secret_keys[0]
    stranger, new = generate_secret_key(), generate_secret_key()
    creds = [_credentials() for _ in range(3)]
    ids = [admin.tenant(f"t{i}", openai={"api_key": o}, avaturn={"api_key": a})[0]["id"]
           for i, (o, a) in enumerate(creds)]
    bare = admin.tenant("platform-creds-only")[0]["id"]
    # the third tenant's avaturn key was written under a key the operator no longer lists
    r = sync_redis.Redis.from_url(settings.redis_url)
    record = _stored(settings.redis_url, ids[2])
    record["avaturn"]["api_key_enc"] = Fernet(stranger.encode()).encrypt(creds[2][1].encode()).decode()
    r.set(f"sb:tenant:{ids[2]}", json.dumps(record))
    before = {tid: r.get(f"sb:tenant:{tid}") for tid in [*ids, bare]}

    env = {"BROKER_REDIS_URL": settings.redis_url}
    refused = _cli({**env, "BROKER_SECRET_KEY": f"{new},{old}"}, "secrets", "rotate")
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    assert {tid: r.get(f"sb:tenant:{tid}") for tid in [*ids, bare]} == before  # nothing written
    lines = _lines(refused.stdout)
    assert lines[ids[2]] == ["cannot-decrypt", "avaturn.api_key"], refused.stdout
    assert lines[ids[0]][0] == lines[ids[1]][0] == "rotatable" and lines[bare][0] == "unchanged", refused.stdout
    assert "nothing was re-encrypted" in refused.stderr and "BROKER_SECRET_KEY" in refused.stderr

    done = _cli({**env, "BROKER_SECRET_KEY": f"{new},{old},{stranger}"}, "secrets", "rotate")
    assert done.returncode == 0, (done.stdout, done.stderr)
    lines = _lines(done.stdout)
    assert {tid: lines[tid][0] for tid in [*ids, bare]} == {**{t: "rotated" for t in ids}, bare: "unchanged"}
    assert lines[ids[0]][1] == "openai.api_key, avaturn.api_key", done.stdout
    assert "re-encrypted credentials of 3 tenant(s)" in done.stdout
    for tid, (openai_key, avaturn_key) in zip(ids, creds, strict=True):
        stored = _stored(settings.redis_url, tid)
        assert Fernet(new.encode()).decrypt(stored["openai"]["api_key_enc"].encode()).decode() == openai_key
        assert Fernet(new.encode()).decrypt(stored["avaturn"]["api_key_enc"].encode()).decode() == avaturn_key
        try:
            Fernet(old.encode()).decrypt(stored["openai"]["api_key_enc"].encode())
            raise AssertionError("still readable with the old key")
        except InvalidToken:
            pass

    again = _cli({**env, "BROKER_SECRET_KEY": f"{new},{old},{stranger}"}, "secrets", "rotate")
    assert again.returncode == 0 and {v[0] for v in _lines(again.stdout).values()} == {"unchanged"}, again.stdout
    assert "re-encrypted credentials of 0 tenant(s)" in again.stdout
    r.close()
    for out in (refused, done, again):
        _assert_not_in(out.stdout + out.stderr, new, old, stranger, *[c for pair in creds for c in pair])
