"""API key tokens, scopes, the key table and per-key token buckets (all on a fake clock)."""

from __future__ import annotations

import base64
import hashlib
import re

import msgspec
import pytest

from ember import auth
from ember.auth import Key, KeyTable, Principal, TokenBucket
from ember.errors import EmberError, Forbidden, RateLimited, Unauthorized, UserError

TOKEN_RE = re.compile(r"ember_[0-9a-f]{8}_[A-Za-z0-9_-]{43}")


def make_key(
    scopes: list[str], *, rate: float = 0.0, burst: int = 0, name: str = "k"
) -> tuple[Key, str]:
    """A key as the control plane would store it, and the token its holder sends."""
    key_id, token, stored = auth.new_token()
    return Key(id=key_id, digest=stored, name=name, scopes=scopes, rate=rate, burst=burst), token


def table_of(*keys: Key) -> KeyTable:
    table = KeyTable()
    table.replace(keys)
    return table


def principal(*scopes: str) -> Principal:
    return Principal(Key(id="0badc0de", digest=bytes(32), name="p", scopes=list(scopes)))


# ---- tokens ----


def test_new_token_format() -> None:
    key_id, token, stored = auth.new_token()
    assert TOKEN_RE.fullmatch(token), token
    assert isinstance(stored, bytes) and len(stored) == 32
    assert re.fullmatch(r"[0-9a-f]{8}", key_id)
    assert token.startswith(f"ember_{key_id}_")
    secret = token.removeprefix(f"ember_{key_id}_")
    assert len(secret) == 43
    # 43 base64url characters without padding carry the 32 random bytes.
    assert len(base64.urlsafe_b64decode(secret + "=")) == 32
    assert auth.parse_token(token) == (key_id, secret)


def test_new_token_stores_only_digest_of_secret_part() -> None:
    key_id, token, stored = auth.new_token()
    secret = token.removeprefix(f"ember_{key_id}_")
    assert stored == hashlib.sha256(secret.encode()).digest() == auth.digest(secret)
    assert len(stored) == 32
    assert stored != hashlib.sha256(token.encode()).digest()
    assert secret.encode() not in stored and token.encode() not in stored


def test_new_tokens_are_unique() -> None:
    tokens = [auth.new_token() for _ in range(50)]
    assert len({t[0] for t in tokens}) == 50
    assert len({t[1] for t in tokens}) == 50
    assert len({t[2] for t in tokens}) == 50


def test_table_verifies_with_only_id_and_digest() -> None:
    key_id, token, stored = auth.new_token()
    # Nothing but the id and the digest reaches the table: no secret, no token.
    key = Key(id=key_id, digest=stored, name="ci", scopes=["read:a"])
    table = table_of(key)
    got = table.verify(f"Bearer {token}")
    assert got.key is key


SECRET = "A" * 43

PARSE_CASES = [
    ("valid", f"ember_0123abcd_{SECRET}", ("0123abcd", SECRET)),
    ("secret with - and _", "ember_0123abcd_" + "-_" * 21 + "z", ("0123abcd", "-_" * 21 + "z")),
    ("wrong prefix", f"embr_0123abcd_{SECRET}", None),
    ("uppercase prefix", f"EMBER_0123abcd_{SECRET}", None),
    ("uppercase hex id", f"ember_0123ABCD_{SECRET}", None),
    ("7-digit id", f"ember_0123abc_{SECRET}", None),
    ("9-digit id", f"ember_0123abcde_{SECRET}", None),
    ("non-hex id", f"ember_0123abcg_{SECRET}", None),
    ("42-char secret", f"ember_0123abcd_{SECRET[:-1]}", None),
    ("44-char secret", f"ember_0123abcd_{SECRET}A", None),
    ("padded secret", f"ember_0123abcd_{SECRET}=", None),
    ("plus in secret", f"ember_0123abcd_{SECRET[:-1]}+", None),
    ("slash in secret", f"ember_0123abcd_{SECRET[:-1]}/", None),
    ("trailing newline", f"ember_0123abcd_{SECRET}\n", None),
    ("leading space", f" ember_0123abcd_{SECRET}", None),
    ("missing separator", f"ember_0123abcd{SECRET}", None),
    ("empty", "", None),
]


@pytest.mark.parametrize(
    ("token", "expected"), [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES]
)
def test_parse_token(token: str, expected: tuple[str, str] | None) -> None:
    assert auth.parse_token(token) == expected


# ---- verify ----


def assert_unauthorized(table: KeyTable, header: str | None) -> Unauthorized:
    with pytest.raises(Unauthorized) as info:
        table.verify(header)
    err = info.value
    assert err.status == 401
    assert err.code == "unauthorized"
    assert err.headers["WWW-Authenticate"].startswith("Bearer")
    return err


def test_verify_accepts_bearer_token() -> None:
    key, token = make_key(["read:a"])
    other, _ = make_key(["admin"])
    table = table_of(key, other)
    assert table.verify(f"Bearer {token}").key == key
    assert table.verify(f"bearer {token}").key == key  # the scheme is case-insensitive


@pytest.mark.parametrize("header", [None, ""], ids=["missing", "empty"])
def test_verify_rejects_missing_header(header: str | None) -> None:
    key, _ = make_key(["admin"])
    err = assert_unauthorized(table_of(key), header)
    assert err.headers["WWW-Authenticate"] == "Bearer"


def test_verify_rejects_bad_tokens() -> None:
    key, token = make_key(["admin"])
    _, stranger_token, _ = auth.new_token()
    parsed = auth.parse_token(stranger_token)
    assert parsed is not None
    wrong_secret = f"ember_{key.id}_{parsed[1]}"
    off_by_one = token[:-1] + ("B" if token[-1] != "B" else "C")
    cases = {
        "wrong scheme": f"Basic {token}",
        "token scheme": f"Token {token}",
        "no scheme": token,
        "scheme only": "Bearer",
        "scheme and blank": "Bearer   ",
        "malformed": "Bearer ember_nothex_short",
        "truncated": f"Bearer {token[:-1]}",
        "extended": f"Bearer {token}x",
        "unknown id": f"Bearer {stranger_token}",
        "right id, wrong secret": f"Bearer {wrong_secret}",
        "right id, secret one character off": f"Bearer {off_by_one}",
    }
    table = table_of(key)
    for name, header in cases.items():
        try:
            assert_unauthorized(table, header)
        except BaseException as exc:  # name the failing case
            raise AssertionError(f"case {name!r}: {header!r}") from exc
        assert table.verify(f"Bearer {token}").key == key  # still fine after the failures


def test_verify_rejects_revoked_key() -> None:
    kept, kept_token = make_key(["read:a"], name="kept")
    revoked, revoked_token = make_key(["admin"], name="revoked")
    table = table_of(kept, revoked)
    assert table.verify(f"Bearer {revoked_token}").key == revoked
    table.replace([kept])
    assert len(table) == 1
    err = assert_unauthorized(table, f"Bearer {revoked_token}")
    assert err.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert table.verify(f"Bearer {kept_token}").key == kept
    table.replace([])
    assert len(table) == 0
    assert_unauthorized(table, f"Bearer {kept_token}")


def test_unauthorized_is_a_user_error() -> None:
    assert issubclass(Unauthorized, UserError)
    assert issubclass(Forbidden, UserError)


# ---- replace keeps buckets of unchanged keys ----


def drain(table: KeyTable, p: Principal, now: float) -> None:
    assert p.bucket is not None
    for _ in range(p.bucket.burst):
        table.throttle(p, now)
    with pytest.raises(RateLimited):
        table.throttle(p, now)


def test_bucket_survives_replace_for_unchanged_key() -> None:
    key, token = make_key(["read:a"], rate=1.0, burst=2)
    table = table_of(key)
    p = table.verify(f"Bearer {token}")
    assert p.bucket is not None
    now = p.bucket.stamp
    drain(table, p, now)
    # The control plane pushes a fresh, equal copy of the same key plus a new one.
    other, _ = make_key(["admin"])
    copy = msgspec.structs.replace(key, scopes=list(key.scopes))
    assert copy == key and copy is not key
    table.replace([copy, other])
    again = table.verify(f"Bearer {token}")
    assert again is p
    with pytest.raises(RateLimited):
        table.throttle(again, now)


@pytest.mark.parametrize(
    "change",
    [{"scopes": ["read:a", "read:b"]}, {"rate": 2.0}, {"burst": 3}, {"name": "renamed"}],
    ids=["scopes", "rate", "burst", "name"],
)
def test_bucket_resets_when_key_changes(change: dict[str, object]) -> None:
    key, token = make_key(["read:a"], rate=1.0, burst=2)
    table = table_of(key)
    p = table.verify(f"Bearer {token}")
    assert p.bucket is not None
    now = p.bucket.stamp
    drain(table, p, now)
    changed = msgspec.structs.replace(key, **change)
    table.replace([changed])
    fresh = table.verify(f"Bearer {token}")
    assert fresh is not p
    assert fresh.key == changed
    assert fresh.bucket is not None
    table.throttle(fresh, fresh.bucket.stamp)  # a full bucket again


def test_bucket_resets_when_key_is_revoked_and_readded() -> None:
    key, token = make_key(["read:a"], rate=1.0, burst=1)
    table = table_of(key)
    p = table.verify(f"Bearer {token}")
    assert p.bucket is not None
    drain(table, p, p.bucket.stamp)
    table.replace([])
    table.replace([key])
    assert table.verify(f"Bearer {token}") is not p


# ---- scopes ----

ACTIONS = ("deploy", "invoke", "read")
# scopes -> the (action, namespace) pairs allowed among actions x {a, b}
MATRIX: list[tuple[list[str], set[tuple[str, str]]]] = [
    (["admin"], {(act, ns) for act in ACTIONS for ns in "ab"}),
    (["deploy:a"], {("deploy", "a"), ("read", "a")}),
    (["invoke:a"], {("invoke", "a")}),
    (["read:a"], {("read", "a")}),
    (["read:*"], {("read", "a"), ("read", "b")}),
    (["deploy:*"], {("deploy", "a"), ("deploy", "b"), ("read", "a"), ("read", "b")}),
    (["invoke:*"], {("invoke", "a"), ("invoke", "b")}),
    (["invoke:a", "read:b"], {("invoke", "a"), ("read", "b")}),
    (["deploy:b", "invoke:a"], {("deploy", "b"), ("read", "b"), ("invoke", "a")}),
]
SCOPE_CASES = [
    (scopes, action, ns, (action, ns) in allowed)
    for scopes, allowed in MATRIX
    for action in ACTIONS
    for ns in "ab"
]


@pytest.mark.parametrize(
    ("scopes", "action", "ns", "allowed"),
    SCOPE_CASES,
    ids=[f"{'+'.join(s)}-{a}-{n}" for s, a, n, _ in SCOPE_CASES],
)
def test_scope_matrix(scopes: list[str], action: str, ns: str, allowed: bool) -> None:
    p = principal(*scopes)
    assert p.allows(action, ns) is allowed
    if allowed:
        KeyTable.require(p, action, ns)
    else:
        with pytest.raises(Forbidden) as info:
            KeyTable.require(p, action, ns)
        assert info.value.status == 403
        assert info.value.code == "forbidden"
        assert p.key.id in info.value.message


@pytest.mark.parametrize(
    ("scopes", "admin"),
    [(["admin"], True), (["read:*", "admin"], True), (["deploy:*"], False), (["read:a"], False)],
)
def test_admin_property(scopes: list[str], admin: bool) -> None:
    assert principal(*scopes).admin is admin


def test_star_namespace_is_not_a_prefix_match() -> None:
    p = principal("read:a")
    assert not p.allows("read", "ab")
    assert not p.allows("read", "*")  # a literal "*" namespace is not granted by read:a


NAMESPACE_CASES: list[tuple[list[str], str, set[str] | None]] = [
    (["admin"], "deploy", None),
    (["admin"], "invoke", None),
    (["admin"], "read", None),
    (["deploy:a"], "deploy", {"a"}),
    (["deploy:a"], "read", {"a"}),
    (["deploy:a"], "invoke", set()),
    (["invoke:a"], "invoke", {"a"}),
    (["invoke:a"], "read", set()),
    (["invoke:a"], "deploy", set()),
    (["read:a"], "read", {"a"}),
    (["read:a"], "deploy", set()),
    (["read:a", "deploy:b"], "read", {"a", "b"}),
    (["read:a", "deploy:b"], "deploy", {"b"}),
    (["read:a", "read:a-b", "invoke:c"], "read", {"a", "a-b"}),
    (["read:*"], "read", None),
    (["read:*"], "deploy", set()),
    (["read:*"], "invoke", set()),
    (["deploy:*"], "read", None),
    (["deploy:*"], "deploy", None),
    (["deploy:*"], "invoke", set()),
    (["deploy:*", "invoke:a"], "invoke", {"a"}),
    (["read:a", "deploy:*"], "read", None),
]


@pytest.mark.parametrize(("scopes", "action", "expected"), NAMESPACE_CASES)
def test_namespaces(scopes: list[str], action: str, expected: set[str] | None) -> None:
    got = principal(*scopes).namespaces(action)
    assert got == expected
    if got is not None:  # consistent with allows()
        for ns in ("a", "b", "c", "a-b", "z"):
            assert principal(*scopes).allows(action, ns) is (ns in got)


BAD_SCOPES = [
    "deploy",
    "deploy:",
    "deploy:A",
    "write:a",
    "admin:x",
    "admin:*",
    "Admin",
    "",
    ":a",
    "read:a-",
    "read:-a",
    "read:1a",
    "read:a_b",
    "read: a",
    "read:a ",
    " read:a",
    "read:a\n",
    "read:**",
    "read:a*",
    "read:a/b",
    "read:a:b",
    "read:" + "a" * 64,
]


@pytest.mark.parametrize("scope", BAD_SCOPES)
def test_validate_scopes_rejects(scope: str) -> None:
    for scopes in ([scope], ["read:a", scope]):
        with pytest.raises(UserError) as info:
            auth.validate_scopes(scopes)
        assert info.value.code == "bad_scope"
        assert info.value.status == 400


def test_validate_scopes_rejects_empty() -> None:
    with pytest.raises(UserError) as info:
        auth.validate_scopes([])
    assert info.value.code == "bad_scope"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["read:a"], ["read:a"]),
        (["read:a", "admin", "read:a", "deploy:*"], ["admin", "deploy:*", "read:a"]),
        (["read:b", "read:a", "invoke:a", "read:b"], ["invoke:a", "read:a", "read:b"]),
        (["read:x", "read:x"], ["read:x"]),
        (["deploy:a1-b2", "invoke:*"], ["deploy:a1-b2", "invoke:*"]),
        (["read:" + "a" * 63], ["read:" + "a" * 63]),
    ],
)
def test_validate_scopes_dedups_and_sorts(given: list[str], expected: list[str]) -> None:
    assert auth.validate_scopes(given) == expected
    assert auth.validate_scopes(iter(given)) == expected  # any iterable


# ---- token bucket ----


def test_bucket_starts_full_then_reports_wait() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    t = bucket.stamp
    assert [bucket.take(t) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(t) == pytest.approx(0.5)
    assert bucket.take(t) == pytest.approx(0.5)  # a refused take costs nothing


def test_bucket_refills_at_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    t = bucket.stamp
    for _ in range(3):
        bucket.take(t)
    assert bucket.take(t + 0.25) == pytest.approx(0.25)  # half a token there
    assert bucket.take(t + 0.5) == 0.0  # one token after 1/rate s
    assert bucket.take(t + 0.5) == pytest.approx(0.5)
    assert bucket.take(t + 1.5) == 0.0  # two more tokens after another second
    assert bucket.take(t + 1.5) == 0.0
    assert bucket.take(t + 1.5) == pytest.approx(0.5)


def test_bucket_refill_is_capped_at_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=4)
    t = bucket.stamp
    bucket.take(t)
    t += 3600  # an hour idle refills to burst, not to 36000
    assert [bucket.take(t) for _ in range(4)] == [0.0] * 4
    assert bucket.take(t) == pytest.approx(0.1)


def test_bucket_wait_is_exact() -> None:
    bucket = TokenBucket(rate=0.5, burst=1)
    t = bucket.stamp
    assert bucket.take(t) == 0.0
    wait = bucket.take(t + 0.5)
    assert wait == pytest.approx(1.5)
    assert bucket.take(t + 0.5 + wait * 0.99) > 0
    assert bucket.take(t + 0.5 + wait) == 0.0


@pytest.mark.parametrize(("burst", "expected"), [(0, 1), (-5, 1), (1, 1), (7, 7)])
def test_bucket_burst_is_at_least_one(burst: int, expected: int) -> None:
    bucket = TokenBucket(rate=1.0, burst=burst)
    assert bucket.burst == expected
    t = bucket.stamp
    assert [bucket.take(t) for _ in range(expected)] == [0.0] * expected
    assert bucket.take(t) > 0


@pytest.mark.parametrize(
    ("rate", "burst", "expected_burst"),
    [(0.5, 0, 1), (1.0, 0, 1), (2.5, 0, 3), (10.0, 0, 10), (2.0, 5, 5)],
)
def test_principal_bucket_defaults_burst_to_rate(
    rate: float, burst: int, expected_burst: int
) -> None:
    p = Principal(
        Key(id="0badc0de", digest=bytes(32), name="p", scopes=["admin"], rate=rate, burst=burst)
    )
    assert p.bucket is not None
    assert p.bucket.rate == rate
    assert p.bucket.burst == expected_burst


def test_unlimited_key_is_never_throttled() -> None:
    key, token = make_key(["admin"], rate=0.0)
    table = table_of(key)
    p = table.verify(f"Bearer {token}")
    assert p.bucket is None
    for _ in range(10_000):
        table.throttle(p, 0.0)


@pytest.mark.parametrize(
    ("rate", "retry_after"),
    [(100.0, "1"), (2.0, "1"), (1.0, "1"), (0.3, "4"), (0.25, "4"), (0.1, "10")],
)
def test_throttle_sets_retry_after(rate: float, retry_after: str) -> None:
    key, token = make_key(["read:a"], rate=rate, burst=1)
    table = table_of(key)
    p = table.verify(f"Bearer {token}")
    assert p.bucket is not None
    now = p.bucket.stamp
    table.throttle(p, now)
    with pytest.raises(RateLimited) as info:
        table.throttle(p, now)
    err = info.value
    assert isinstance(err, EmberError)
    assert err.status == 429
    assert err.code == "rate_limited"
    value = err.headers["Retry-After"]
    assert value.isdigit() and int(value) >= 1
    assert value == retry_after
    assert key.id in err.message


def test_throttle_lets_through_after_retry_after() -> None:
    key, token = make_key(["read:a"], rate=0.5, burst=2)
    table = table_of(key)
    p = table.verify(f"Bearer {token}")
    assert p.bucket is not None
    now = p.bucket.stamp
    table.throttle(p, now)
    table.throttle(p, now)
    with pytest.raises(RateLimited) as info:
        table.throttle(p, now)
    now += int(info.value.headers["Retry-After"])
    table.throttle(p, now)
    with pytest.raises(RateLimited):
        table.throttle(p, now)
