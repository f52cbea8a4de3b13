"""Unit tests for flow_repository.adapters.auth: headers, claims, introspection, JWT and dev tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

from flow_repository.adapters.auth import (
    AuthError,
    IdentityUnavailable,
    IntrospectionAuthenticator,
    JwtAuthenticator,
    Principal,
    bearer_token,
    build_authenticator,
    dev_secret,
    mint_token,
    principal_from_claims,
)
from flow_repository.settings import Settings, SettingsError

BASIC_URL = "http://iam.test/api/v1/tokens/introspect"
OIDC_URL = "http://iam.test/op/token/introspection"
SECRET = "unit-test-hmac-secret-long-enough-even-for-hs512-0123456789abcdef"
USER_TOKEN = "user-token-abc123"


# ---------------------------------------------------------------- helpers


def make_response(
    status: int = 200, body: Any = None, raw: bytes | None = None
) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = raw if raw is not None else json.dumps(body).encode()
    response.headers["content-type"] = "application/json"
    response.encoding = "utf-8"
    return response


class FakeSession:
    """Stands in for requests.Session: records posts, replays queued results."""

    def __init__(self, *results: Any) -> None:
        self.results = list(results)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        self.calls.append((url, kwargs))
        result = self.results.pop(0) if len(self.results) > 1 else self.results[0]
        if isinstance(result, BaseException):
            raise result
        if callable(result):
            return result(url, kwargs)
        return result


class RecordingAdapter(requests.adapters.BaseAdapter):
    """A transport adapter that captures the prepared request instead of using the network."""

    def __init__(self, body: Any) -> None:
        super().__init__()
        self.body = body
        self.sent: list[tuple[requests.PreparedRequest, dict[str, Any]]] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.sent.append((request, kwargs))
        response = make_response(200, self.body)
        response.request = request
        response.url = request.url or ""
        return response

    def close(self) -> None:
        pass


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def basic_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "introspect_type": "basic",
        "introspect_endpoint_basic": BASIC_URL,
        "iam_token": "service-account-token",
        "iam_timeout_seconds": 2.5,
    }
    values.update(overrides)
    return Settings.from_env({}, **values)


def oidc_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "introspect_type": "oidc",
        "introspect_endpoint_oidc": OIDC_URL,
        "oidc_client_id": "flow-repository",
        "oidc_client_secret": "client-secret",
    }
    values.update(overrides)
    return Settings.from_env({}, **values)


def user_claims(**extra: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "sub": "user-1",
        "tenant": "tenant-1",
        "permissions": ["flows.read", "flows.write"],
    }
    claims.update(extra)
    return claims


def jwt_claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = user_claims(iat=now, exp=now + 600)
    claims.update(extra)
    return claims


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_jwt(header: dict[str, Any], claims: dict[str, Any], signer: Any = None) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = signer(signing_input.encode()) if signer else b""
    return f"{signing_input}.{b64url(signature)}"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(private_key: Any) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def assert_auth_error(excinfo: pytest.ExceptionInfo[Any], message: str) -> None:
    assert excinfo.value.message == message
    assert str(excinfo.value) == message


# ---------------------------------------------------------------- bearer_token


@pytest.mark.parametrize("value", [None, "", "   "])
def test_bearer_token_missing_header(value: str | None) -> None:
    with pytest.raises(AuthError) as excinfo:
        bearer_token(value)
    assert_auth_error(excinfo, "Missing authorization header.")


@pytest.mark.parametrize(
    "value", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer  ", "Bearer a b", "Token abc", "abc"]
)
def test_bearer_token_invalid_header(value: str) -> None:
    with pytest.raises(AuthError) as excinfo:
        bearer_token(value)
    assert_auth_error(excinfo, "Invalid authorization header.")


@pytest.mark.parametrize(
    "value", ["Bearer abc.def", "bearer abc.def", "BEARER abc.def", " Bearer  abc.def "]
)
def test_bearer_token_extracts_token(value: str) -> None:
    assert bearer_token(value) == "abc.def"


def test_error_types_carry_message() -> None:
    assert AuthError("x").message == "x"
    assert str(IdentityUnavailable("IAM is unavailable.")) == "IAM is unavailable."
    assert IdentityUnavailable().message == "IAM is unavailable."


# ---------------------------------------------------------------- principal_from_claims


def test_principal_from_full_claims() -> None:
    principal = principal_from_claims(user_claims())
    assert principal == Principal(
        sub="user-1",
        tenant="tenant-1",
        permissions=frozenset({"flows.read", "flows.write"}),
        is_admin=False,
    )
    assert principal.owner_ids == ("user-1", "tenant-1")
    assert principal.can("flows.read")
    assert not principal.can("flows.control")


def test_principal_without_tenant_owns_only_itself() -> None:
    principal = principal_from_claims({"sub": "user-2"})
    assert principal.tenant is None
    assert principal.permissions == frozenset()
    assert principal.owner_ids == ("user-2",)
    assert not principal.can("flows.read")


def test_principal_admin_via_all_permission() -> None:
    principal = principal_from_claims({"sub": "root", "permissions": ["all"]})
    assert principal.is_admin
    assert principal.can("flows.control")
    assert principal.can("anything.at.all")


def test_is_admin_flag_alone_does_not_make_an_administrator() -> None:
    # iam-utils recomputes isAdmin from the permissions (`all`) and ignores the flag sent;
    # OIH's IAM sets the flag from the same rule, so the two never disagree in OIH.
    for flag in (True, "true", 1):
        assert not principal_from_claims({"sub": "root", "isAdmin": flag}).is_admin


def test_principal_tenant_from_single_membership() -> None:
    claims = {"sub": "u", "memberships": [{"tenant": "t-9", "roles": []}]}
    assert principal_from_claims(claims).tenant == "t-9"


def test_principal_tenant_ambiguous_with_several_memberships() -> None:
    claims = {"sub": "u", "memberships": [{"tenant": "t-1"}, {"tenant": "t-2"}]}
    assert principal_from_claims(claims).tenant is None


def test_principal_explicit_tenant_beats_memberships() -> None:
    claims = {"sub": "u", "tenant": "t-0", "memberships": [{"tenant": "t-9"}]}
    assert principal_from_claims(claims).tenant == "t-0"


def test_principal_membership_without_tenant() -> None:
    assert principal_from_claims({"sub": "u", "memberships": [{"roles": ["x"]}]}).tenant is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("flows.read flows.write", {"flows.read", "flows.write"}),
        ("flows.read,flows.write", {"flows.read", "flows.write"}),
        ("flows.read, flows.write  all", {"flows.read", "flows.write", "all"}),
        (None, set()),
        ([], set()),
        (["a", " ", "b"], {"a", "b"}),
    ],
)
def test_principal_permission_shapes(raw: Any, expected: set[str]) -> None:
    assert principal_from_claims({"sub": "u", "permissions": raw}).permissions == frozenset(
        expected
    )


@pytest.mark.parametrize(
    "claims",
    [{}, {"sub": ""}, {"sub": None}, {"_id": ""}, {"sub": None, "_id": None},
     {"permissions": ["all"]}],
)
def test_principal_requires_subject(claims: dict[str, Any]) -> None:
    with pytest.raises(AuthError) as excinfo:
        principal_from_claims(claims)
    assert_auth_error(excinfo, "Token has no subject.")


@pytest.mark.parametrize("claims", [{"sub": "   "}, {"sub": 42}, {"_id": {"$oid": "x"}},
                                    {"_id": 7}])
def test_principal_refuses_a_malformed_subject(claims: dict[str, Any]) -> None:
    with pytest.raises(AuthError) as excinfo:
        principal_from_claims(claims)
    assert_auth_error(excinfo, "Token subject is malformed.")


# What OIH's IAM answers to basic introspection: the account document itself
# (services/iam/src/routes/tokens.js `res.send(accountData)`, with roles resolved into
# permissions by services/iam/src/util/tokens.js resolveUserPermissions). It has no `sub`.
IAM_ACCOUNT = {
    "_id": "5d9f1e2a3b4c5d6e7f809102",
    "username": "jane@example.com",
    "firstname": "Jane",
    "status": "ACTIVE",
    "tenant": "5d9f1e2a3b4c5d6e7f800001",
    "roles": ["5d9f1e2a3b4c5d6e7f80aaaa"],
    "permissions": ["flows.read", "flows.write"],
    "isAdmin": False,
    "confirmed": True,
}


def test_principal_from_an_iam_account_document() -> None:
    principal = principal_from_claims(IAM_ACCOUNT)
    # lib/iam-utils/src/index.js: `user.sub = user.sub || body._id`
    assert principal.sub == IAM_ACCOUNT["_id"]
    assert principal.tenant == IAM_ACCOUNT["tenant"]
    assert principal.permissions == frozenset({"flows.read", "flows.write"})
    assert not principal.is_admin


def test_sub_wins_over_the_account_id() -> None:
    assert principal_from_claims({**IAM_ACCOUNT, "sub": "oidc-subject"}).sub == "oidc-subject"


def test_populated_roles_add_their_permissions() -> None:
    claims = {**IAM_ACCOUNT, "permissions": ["flows.read"], "roles": [
        {"_id": "r1", "name": "operator", "permissions": ["flows.control"]},
        {"_id": "r2", "name": "empty"},
        "5d9f1e2a3b4c5d6e7f80aaaa",  # an unpopulated role id carries nothing
    ]}
    assert principal_from_claims(claims).permissions == frozenset(
        {"flows.read", "flows.control"})


def test_a_populated_role_holding_all_makes_an_administrator() -> None:
    claims = {**IAM_ACCOUNT, "roles": [{"name": "admin", "permissions": ["all"]}]}
    assert principal_from_claims(claims).is_admin


def test_nested_claims_override_the_top_level_as_in_iam_utils() -> None:
    claims = {**IAM_ACCOUNT, "claims": {"tenant": "t-from-claims", "permissions": ["all"]}}
    principal = principal_from_claims(claims)
    assert principal.tenant == "t-from-claims"
    assert principal.is_admin


def test_tenant_of_the_active_membership() -> None:
    claims = {"_id": "u", "memberships": [{"tenant": "t-1", "active": False},
                                          {"tenant": "t-2", "active": True}]}
    assert principal_from_claims(claims).tenant == "t-2"


@pytest.mark.parametrize("permissions", [["a", 1], {"a": True}, 7])
def test_principal_rejects_malformed_permissions(permissions: Any) -> None:
    with pytest.raises(AuthError) as excinfo:
        principal_from_claims({"sub": "u", "permissions": permissions})
    assert_auth_error(excinfo, "Token permissions are malformed.")


def test_principal_rejects_malformed_tenant() -> None:
    with pytest.raises(AuthError) as excinfo:
        principal_from_claims({"sub": "u", "tenant": {"id": "t"}})
    assert_auth_error(excinfo, "Token tenant is malformed.")


# ---------------------------------------------------------------- basic introspection


def test_basic_introspection_ok_sends_token_and_service_credentials() -> None:
    session = FakeSession(make_response(200, user_claims()))
    authenticator = build_authenticator(basic_settings(), session=session)

    principal = authenticator.authenticate(USER_TOKEN)

    assert principal.sub == "user-1"
    assert principal.tenant == "tenant-1"
    assert principal.permissions == frozenset({"flows.read", "flows.write"})
    assert len(session.calls) == 1
    url, kwargs = session.calls[0]
    assert url == BASIC_URL
    assert kwargs["json"] == {"token": USER_TOKEN}
    assert kwargs["headers"] == {
        "authorization": "Bearer service-account-token",
        "x-auth-type": "basic",
    }
    assert kwargs["timeout"] == 2.5


def test_basic_introspection_on_the_wire() -> None:
    session = requests.Session()
    adapter = RecordingAdapter(user_claims())
    session.mount("http://", adapter)
    authenticator = build_authenticator(basic_settings(), session=session)

    assert authenticator.authenticate(USER_TOKEN).sub == "user-1"

    request, kwargs = adapter.sent[0]
    assert request.method == "POST"
    assert request.url == BASIC_URL
    assert request.headers["authorization"] == "Bearer service-account-token"
    assert request.headers["x-auth-type"] == "basic"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.body) == {"token": USER_TOKEN}
    assert kwargs["timeout"] == 2.5


def test_basic_introspection_without_iam_token_sends_no_authorization() -> None:
    session = FakeSession(make_response(200, user_claims()))
    build_authenticator(basic_settings(iam_token=None), session=session).authenticate(USER_TOKEN)
    assert session.calls[0][1]["headers"] == {"x-auth-type": "basic"}


def test_basic_mode_chosen_by_endpoint_alone() -> None:
    settings = Settings.from_env({}, introspect_endpoint_basic=BASIC_URL)
    assert settings.auth_mode == "basic"
    session = FakeSession(make_response(200, user_claims()))
    build_authenticator(settings, session=session).authenticate(USER_TOKEN)
    assert session.calls[0][0] == BASIC_URL


def test_basic_mode_without_endpoint_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="INTROSPECT_ENDPOINT_BASIC"):
        build_authenticator(Settings.from_env({}, introspect_type="basic"))


def test_basic_introspection_active_false_rejected() -> None:
    session = FakeSession(make_response(200, user_claims(active=False)))
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(basic_settings(), session=session).authenticate(USER_TOKEN)
    assert_auth_error(excinfo, "Invalid token.")


def test_basic_introspection_active_true_accepted() -> None:
    session = FakeSession(make_response(200, user_claims(active=True)))
    assert (
        build_authenticator(basic_settings(), session=session).authenticate(USER_TOKEN).sub
        == "user-1"
    )


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_basic_introspection_rejection_statuses(status: int) -> None:
    session = FakeSession(make_response(status, {"message": "nope"}))
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(basic_settings(), session=session).authenticate(USER_TOKEN)
    assert_auth_error(excinfo, "Invalid token.")


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 302])
def test_basic_introspection_server_trouble_is_unavailable(status: int) -> None:
    session = FakeSession(make_response(status, {"message": "down"}))
    with pytest.raises(IdentityUnavailable) as excinfo:
        build_authenticator(basic_settings(), session=session).authenticate(USER_TOKEN)
    assert_auth_error(excinfo, "IAM is unavailable.")


@pytest.mark.parametrize(
    "error",
    [
        requests.ConnectionError("connection refused"),
        requests.Timeout("timed out"),
        requests.ReadTimeout("read timed out"),
        requests.exceptions.SSLError("bad certificate"),
    ],
)
def test_basic_introspection_transport_failure_is_unavailable(error: Exception) -> None:
    session = FakeSession(error)
    with pytest.raises(IdentityUnavailable) as excinfo:
        build_authenticator(basic_settings(), session=session).authenticate(USER_TOKEN)
    assert_auth_error(excinfo, "IAM is unavailable.")
    assert excinfo.value.__cause__ is None


@pytest.mark.parametrize("raw", [b"<html>Bad Gateway</html>", b"", b"[1, 2]", b'"text"', b"null"])
def test_basic_introspection_body_not_an_object_is_unavailable(raw: bytes) -> None:
    session = FakeSession(make_response(200, raw=raw))
    with pytest.raises(IdentityUnavailable) as excinfo:
        build_authenticator(basic_settings(), session=session).authenticate(USER_TOKEN)
    assert_auth_error(excinfo, "IAM is unavailable.")


def test_basic_introspection_expired_claims() -> None:
    session = FakeSession(make_response(200, user_claims(exp=int(time.time()) - 5)))
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(basic_settings(), session=session).authenticate(USER_TOKEN)
    assert_auth_error(excinfo, "Token expired.")


def test_basic_introspection_future_exp_accepted() -> None:
    session = FakeSession(make_response(200, user_claims(exp=int(time.time()) + 300)))
    assert (
        build_authenticator(basic_settings(), session=session).authenticate(USER_TOKEN).sub
        == "user-1"
    )


def test_basic_introspection_claims_without_subject() -> None:
    session = FakeSession(make_response(200, {"permissions": ["all"]}))
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(basic_settings(), session=session).authenticate(USER_TOKEN)
    assert_auth_error(excinfo, "Token has no subject.")


def test_empty_token_is_rejected_without_calling_iam() -> None:
    session = FakeSession(make_response(200, user_claims()))
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(basic_settings(), session=session).authenticate("")
    assert_auth_error(excinfo, "Invalid token.")
    assert session.calls == []


@pytest.mark.parametrize(
    "result",
    [
        make_response(401, {}),
        make_response(500, {}),
        make_response(200, raw=b"oops"),
        requests.ConnectionError(f"failed sending {USER_TOKEN}"),
    ],
)
def test_error_messages_never_contain_the_token(result: Any) -> None:
    session = FakeSession(result)
    with pytest.raises((AuthError, IdentityUnavailable)) as excinfo:
        build_authenticator(basic_settings(), session=session).authenticate(USER_TOKEN)
    assert USER_TOKEN not in str(excinfo.value)
    assert "service-account-token" not in str(excinfo.value)


# ---------------------------------------------------------------- oidc introspection


def test_oidc_introspection_ok_sends_form_and_client_credentials() -> None:
    session = FakeSession(make_response(200, user_claims(active=True)))
    authenticator = build_authenticator(oidc_settings(), session=session)

    principal = authenticator.authenticate(USER_TOKEN)

    assert principal.sub == "user-1"
    url, kwargs = session.calls[0]
    assert url == OIDC_URL
    assert kwargs["data"] == {"token": USER_TOKEN}
    assert "json" not in kwargs
    assert kwargs["auth"] == ("flow-repository", "client-secret")
    assert kwargs["timeout"] == 5.0


def test_oidc_introspection_on_the_wire() -> None:
    session = requests.Session()
    adapter = RecordingAdapter(user_claims(active=True))
    session.mount("http://", adapter)

    build_authenticator(oidc_settings(), session=session).authenticate(USER_TOKEN)

    request, _ = adapter.sent[0]
    expected = base64.b64encode(b"flow-repository:client-secret").decode()
    assert request.headers["authorization"] == f"Basic {expected}"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.body == f"token={USER_TOKEN}"


def test_oidc_mode_chosen_by_endpoint_alone() -> None:
    settings = Settings.from_env({}, introspect_endpoint_oidc=OIDC_URL)
    assert settings.auth_mode == "oidc"
    session = FakeSession(make_response(200, user_claims(active=True)))
    assert build_authenticator(settings, session=session).authenticate(USER_TOKEN).sub == "user-1"
    assert session.calls[0][1]["auth"] is None


@pytest.mark.parametrize("active", [False, None, "true", 1])
def test_oidc_introspection_requires_active_true(active: Any) -> None:
    claims = user_claims() if active is None else user_claims(active=active)
    session = FakeSession(make_response(200, claims))
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(oidc_settings(), session=session).authenticate(USER_TOKEN)
    assert_auth_error(excinfo, "Invalid token.")


def test_oidc_introspection_error_mapping() -> None:
    with pytest.raises(AuthError):
        build_authenticator(
            oidc_settings(), session=FakeSession(make_response(401, {}))
        ).authenticate("t")
    with pytest.raises(IdentityUnavailable):
        build_authenticator(
            oidc_settings(), session=FakeSession(make_response(500, {}))
        ).authenticate("t")
    with pytest.raises(IdentityUnavailable):
        build_authenticator(oidc_settings(), session=FakeSession(requests.Timeout())).authenticate(
            "t"
        )


def test_oidc_mode_without_endpoint_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="INTROSPECT_ENDPOINT_OIDC"):
        build_authenticator(Settings.from_env({}, introspect_type="oidc"))


# ---------------------------------------------------------------- introspection cache


def test_cache_hit_within_ttl() -> None:
    clock = Clock()
    session = FakeSession(make_response(200, user_claims()))
    authenticator = build_authenticator(basic_settings(iam_token_cache_ttl=60), session, clock)

    first = authenticator.authenticate(USER_TOKEN)
    clock.now += 59
    second = authenticator.authenticate(USER_TOKEN)

    assert first == second
    assert len(session.calls) == 1


def test_cache_is_per_token() -> None:
    session = FakeSession(make_response(200, user_claims()), make_response(200, {"sub": "user-2"}))
    authenticator = build_authenticator(basic_settings(), session, Clock())
    assert authenticator.authenticate("token-a").sub == "user-1"
    assert authenticator.authenticate("token-b").sub == "user-2"
    assert authenticator.authenticate("token-a").sub == "user-1"
    assert len(session.calls) == 2


def test_cache_entry_expires_after_ttl() -> None:
    clock = Clock()
    session = FakeSession(make_response(200, user_claims()), make_response(200, {"sub": "changed"}))
    authenticator = build_authenticator(basic_settings(iam_token_cache_ttl=60), session, clock)

    assert authenticator.authenticate(USER_TOKEN).sub == "user-1"
    clock.now += 60
    assert authenticator.authenticate(USER_TOKEN).sub == "changed"
    assert len(session.calls) == 2


def test_cache_disabled_by_a_zero_ttl() -> None:
    session = FakeSession(make_response(200, user_claims()))
    authenticator = build_authenticator(basic_settings(iam_token_cache_ttl=0), session, Clock())
    authenticator.authenticate(USER_TOKEN)
    authenticator.authenticate(USER_TOKEN)
    assert len(session.calls) == 2
    with pytest.raises(SettingsError, match="IAM_TOKEN_CACHE_TTL=-1"):
        basic_settings(iam_token_cache_ttl=-1)  # below its range (0 to 86400)


@pytest.mark.parametrize(
    "failure",
    [
        make_response(500, {}),
        make_response(401, {}),
        make_response(200, user_claims(active=False)),
        make_response(200, {"sub": ""}),
        requests.ConnectionError(),
    ],
)
def test_failures_are_not_cached(failure: Any) -> None:
    session = FakeSession(failure, make_response(200, user_claims()))
    authenticator = build_authenticator(basic_settings(), session, Clock())
    with pytest.raises((AuthError, IdentityUnavailable)):
        authenticator.authenticate(USER_TOKEN)
    assert authenticator.authenticate(USER_TOKEN).sub == "user-1"
    assert len(session.calls) == 2


def test_cached_entry_still_honours_token_expiry() -> None:
    wall = Clock(1_500.0)
    session = FakeSession(make_response(200, user_claims(exp=2_000)))
    authenticator = IntrospectionAuthenticator(
        basic_settings(iam_token_cache_ttl=3600), session, clock=Clock(), wall_clock=wall
    )
    assert authenticator.authenticate(USER_TOKEN).sub == "user-1"
    wall.now = 2_000.0
    with pytest.raises(AuthError) as excinfo:
        authenticator.authenticate(USER_TOKEN)
    assert_auth_error(excinfo, "Token expired.")
    assert len(session.calls) == 1


def test_cache_is_bounded_and_evicts_oldest() -> None:
    session = FakeSession(lambda url, kwargs: make_response(200, {"sub": kwargs["json"]["token"]}))
    authenticator = IntrospectionAuthenticator(
        basic_settings(), session, clock=Clock(), max_entries=2
    )

    for token in ("a", "b", "c"):
        authenticator.authenticate(token)
    assert len(session.calls) == 3
    authenticator.authenticate("c")
    authenticator.authenticate("b")
    assert len(session.calls) == 3  # b and c still cached
    assert authenticator.authenticate("a").sub == "a"
    assert len(session.calls) == 4  # a was evicted as the oldest


def test_cache_drops_expired_entries_before_live_ones() -> None:
    clock = Clock()
    session = FakeSession(lambda url, kwargs: make_response(200, {"sub": kwargs["json"]["token"]}))
    authenticator = IntrospectionAuthenticator(
        basic_settings(iam_token_cache_ttl=10), session, clock=clock, max_entries=2
    )
    authenticator.authenticate("old")
    clock.now += 11
    authenticator.authenticate("x")
    authenticator.authenticate("y")
    authenticator.authenticate("x")
    authenticator.authenticate("y")
    assert [call[1]["json"]["token"] for call in session.calls] == ["old", "x", "y"]


def test_cache_keys_are_digests_not_tokens() -> None:
    session = FakeSession(make_response(200, user_claims()))
    authenticator = IntrospectionAuthenticator(basic_settings(), session, clock=Clock())
    authenticator.authenticate(USER_TOKEN)
    keys = list(authenticator._cache._entries)
    assert keys == [hashlib.sha256(USER_TOKEN.encode()).hexdigest()]
    assert all(USER_TOKEN not in key for key in keys)


def test_cache_survives_concurrent_use() -> None:
    session = FakeSession(lambda url, kwargs: make_response(200, {"sub": kwargs["json"]["token"]}))
    authenticator = IntrospectionAuthenticator(
        basic_settings(), session, clock=Clock(), max_entries=16
    )
    start = threading.Barrier(8)

    def worker(index: int) -> list[str]:
        start.wait()
        wrong = []
        for round_ in range(200):
            token = f"t{(index * 7 + round_) % 40}"
            if authenticator.authenticate(token).sub != token:
                wrong.append(token)
        return wrong

    with ThreadPoolExecutor(max_workers=8) as pool:
        # result() re-raises anything a worker raised, e.g. a corrupted OrderedDict.
        outcomes = [future.result() for future in [pool.submit(worker, i) for i in range(8)]]
    assert outcomes == [[]] * 8
    assert len(authenticator._cache._entries) <= 16


# ---------------------------------------------------------------- jwt: HS256


def hs_settings(**overrides: Any) -> Settings:
    return Settings.from_env({}, jwt_secret=SECRET, **overrides)


def test_jwt_mode_selected_by_secret() -> None:
    assert hs_settings().auth_mode == "jwt"
    assert isinstance(build_authenticator(hs_settings()), JwtAuthenticator)


@pytest.mark.parametrize("algorithm", ["HS256", "HS512"])
def test_hs_token_ok(algorithm: str) -> None:
    token = jwt.encode(jwt_claims(), SECRET, algorithm=algorithm)
    principal = build_authenticator(hs_settings()).authenticate(token)
    assert principal == Principal(
        "user-1", "tenant-1", frozenset({"flows.read", "flows.write"}), False
    )


def test_hs_token_expired() -> None:
    token = jwt.encode(jwt_claims(exp=int(time.time()) - 1), SECRET, algorithm="HS256")
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(hs_settings()).authenticate(token)
    assert_auth_error(excinfo, "Token expired.")


def test_hs_token_without_exp_rejected() -> None:
    claims = jwt_claims()
    del claims["exp"]
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(hs_settings()).authenticate(token)
    assert_auth_error(excinfo, "Invalid token.")


def test_hs_token_forged_with_wrong_secret() -> None:
    token = jwt.encode(
        jwt_claims(), "another-secret-that-is-also-long-enough-xyz", algorithm="HS256"
    )
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(hs_settings()).authenticate(token)
    assert_auth_error(excinfo, "Invalid token.")


def test_hs_token_with_tampered_payload() -> None:
    token = jwt.encode(jwt_claims(), SECRET, algorithm="HS256")
    header, _, signature = token.split(".")
    payload = b64url(json.dumps(jwt_claims(permissions=["all"])).encode())
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(hs_settings()).authenticate(f"{header}.{payload}.{signature}")
    assert_auth_error(excinfo, "Invalid token.")


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_rejected(alg: str) -> None:
    token = raw_jwt({"alg": alg, "typ": "JWT"}, jwt_claims(permissions=["all"]))
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(hs_settings()).authenticate(token)
    assert_auth_error(excinfo, "Invalid token.")


@pytest.mark.parametrize("token", ["not-a-jwt", "a.b.c", "....", "Bearer x"])
def test_garbage_token_rejected(token: str) -> None:
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(hs_settings()).authenticate(token)
    assert_auth_error(excinfo, "Invalid token.")


def test_audience_checked_when_configured() -> None:
    authenticator = build_authenticator(hs_settings(jwt_audience="flow-repository"))
    good = jwt.encode(jwt_claims(aud="flow-repository"), SECRET, algorithm="HS256")
    assert authenticator.authenticate(good).sub == "user-1"
    for claims in (jwt_claims(aud="other-service"), jwt_claims()):
        token = jwt.encode(claims, SECRET, algorithm="HS256")
        with pytest.raises(AuthError) as excinfo:
            authenticator.authenticate(token)
        assert_auth_error(excinfo, "Invalid token.")


def test_audience_ignored_when_not_configured() -> None:
    token = jwt.encode(jwt_claims(aud="some-api"), SECRET, algorithm="HS256")
    assert build_authenticator(hs_settings()).authenticate(token).sub == "user-1"


def test_issuer_checked_when_configured() -> None:
    authenticator = build_authenticator(hs_settings(jwt_issuer="https://idp.test"))
    good = jwt.encode(jwt_claims(iss="https://idp.test"), SECRET, algorithm="HS256")
    assert authenticator.authenticate(good).sub == "user-1"
    for claims in (jwt_claims(iss="https://evil.test"), jwt_claims()):
        token = jwt.encode(claims, SECRET, algorithm="HS256")
        with pytest.raises(AuthError) as excinfo:
            authenticator.authenticate(token)
        assert_auth_error(excinfo, "Invalid token.")


def test_not_before_tolerates_small_skew_only() -> None:
    authenticator = build_authenticator(hs_settings())
    now = int(time.time())
    slightly_early = jwt.encode(jwt_claims(nbf=now + 10, iat=now + 10), SECRET, algorithm="HS256")
    assert authenticator.authenticate(slightly_early).sub == "user-1"
    far_future = jwt.encode(jwt_claims(nbf=now + 3600), SECRET, algorithm="HS256")
    with pytest.raises(AuthError) as excinfo:
        authenticator.authenticate(far_future)
    assert_auth_error(excinfo, "Invalid token.")


def test_jwt_claims_without_subject() -> None:
    claims = jwt_claims()
    del claims["sub"]
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(hs_settings()).authenticate(token)
    assert_auth_error(excinfo, "Token has no subject.")


def test_rs_token_rejected_when_only_a_secret_is_configured(rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(jwt_claims(), rsa_key, algorithm="RS256")
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(hs_settings()).authenticate(token)
    assert_auth_error(excinfo, "Invalid token.")


# ---------------------------------------------------------------- jwt: public key


def test_rs256_ok(rsa_key: rsa.RSAPrivateKey) -> None:
    settings = Settings.from_env({}, jwt_public_key=public_pem(rsa_key))
    token = jwt.encode(jwt_claims(permissions=["all"]), rsa_key, algorithm="RS256")
    principal = build_authenticator(settings).authenticate(token)
    assert principal.sub == "user-1"
    assert principal.is_admin


def test_rs256_public_key_with_escaped_newlines(rsa_key: rsa.RSAPrivateKey) -> None:
    escaped = public_pem(rsa_key).strip().replace("\n", "\\n")
    settings = Settings.from_env({"JWT_PUBLIC_KEY": escaped})
    token = jwt.encode(jwt_claims(), rsa_key, algorithm="RS256")
    assert build_authenticator(settings).authenticate(token).sub == "user-1"


def test_rs256_signed_by_another_key_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    settings = Settings.from_env({}, jwt_public_key=public_pem(rsa_key), jwt_secret=SECRET)
    token = jwt.encode(jwt_claims(), other, algorithm="RS256")
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(settings).authenticate(token)
    assert_auth_error(excinfo, "Invalid token.")


def test_hs_rs_confusion_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    pem = public_pem(rsa_key)
    settings = Settings.from_env({}, jwt_public_key=pem)
    # The classic attack: HMAC-sign with the (public) verification key as the secret.
    token = raw_jwt(
        {"alg": "HS256", "typ": "JWT"},
        jwt_claims(permissions=["all"]),
        lambda data: hmac.new(pem.encode(), data, hashlib.sha256).digest(),
    )
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(settings).authenticate(token)
    assert_auth_error(excinfo, "Invalid token.")


def test_rs256_expired(rsa_key: rsa.RSAPrivateKey) -> None:
    settings = Settings.from_env({}, jwt_public_key=public_pem(rsa_key))
    token = jwt.encode(jwt_claims(exp=int(time.time()) - 30), rsa_key, algorithm="RS256")
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(settings).authenticate(token)
    assert_auth_error(excinfo, "Token expired.")


def test_ec_public_key_allows_only_its_curve_algorithm() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    settings = Settings.from_env({}, jwt_public_key=public_pem(key))
    authenticator = build_authenticator(settings)
    assert (
        authenticator.authenticate(jwt.encode(jwt_claims(), key, algorithm="ES256")).sub == "user-1"
    )
    other_curve = ec.generate_private_key(ec.SECP384R1())
    rsa_signed = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for token in (
        jwt.encode(jwt_claims(), other_curve, algorithm="ES384"),
        jwt.encode(jwt_claims(), rsa_signed, algorithm="RS256"),
    ):
        with pytest.raises(AuthError) as excinfo:
            authenticator.authenticate(token)
        assert_auth_error(excinfo, "Invalid token.")


@pytest.mark.parametrize(
    "pem", ["not a key", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"]
)
def test_unusable_public_key_is_a_settings_error(pem: str) -> None:
    with pytest.raises(SettingsError, match="JWT_PUBLIC_KEY"):
        build_authenticator(Settings.from_env({}, jwt_public_key=pem))


def test_private_key_in_public_key_setting_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    private_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    with pytest.raises(SettingsError) as excinfo:
        build_authenticator(Settings.from_env({}, jwt_public_key=private_pem))
    assert "PRIVATE" not in str(excinfo.value)


# ---------------------------------------------------------------- jwt: JWKS


JWKS_URL = "https://idp.test/.well-known/jwks.json"


@pytest.fixture
def jwks(monkeypatch: pytest.MonkeyPatch, rsa_key: rsa.RSAPrivateKey) -> dict[str, Any]:
    """Serve a JWKS document from memory instead of the network."""
    jwk = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
    served: dict[str, Any] = {
        "document": {"keys": [dict(jwk, kid="key-1", use="sig")]},
        "fetches": 0,
    }

    def fetch_data(self: jwt.PyJWKClient) -> Any:
        served["fetches"] += 1
        document = served["document"]
        if isinstance(document, BaseException):
            raise document
        return document

    monkeypatch.setattr(jwt.PyJWKClient, "fetch_data", fetch_data)
    return served


def jwks_settings(**overrides: Any) -> Settings:
    return Settings.from_env({}, **{"jwt_jwks_url": JWKS_URL, **overrides})


def test_jwks_ok(jwks: dict[str, Any], rsa_key: rsa.RSAPrivateKey) -> None:
    authenticator = build_authenticator(jwks_settings())
    token = jwt.encode(jwt_claims(), rsa_key, algorithm="RS256", headers={"kid": "key-1"})
    assert authenticator.authenticate(token).sub == "user-1"
    assert authenticator.authenticate(token).tenant == "tenant-1"
    assert jwks["fetches"] == 1  # the key set is cached inside the client


def test_jwks_unknown_kid_rejected(jwks: dict[str, Any], rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(jwt_claims(), rsa_key, algorithm="RS256", headers={"kid": "unknown"})
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(jwks_settings()).authenticate(token)
    assert_auth_error(excinfo, "Invalid token.")


def test_jwks_token_without_kid_rejected(jwks: dict[str, Any], rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(jwt_claims(), rsa_key, algorithm="RS256")
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(jwks_settings()).authenticate(token)
    assert_auth_error(excinfo, "Invalid token.")
    assert jwks["fetches"] == 0


def test_jwks_wrong_signature_rejected(jwks: dict[str, Any]) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(jwt_claims(), other, algorithm="RS256", headers={"kid": "key-1"})
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(jwks_settings()).authenticate(token)
    assert_auth_error(excinfo, "Invalid token.")


@pytest.mark.parametrize(
    "document",
    [
        jwt.PyJWKClientConnectionError("Fail to fetch data from the url"),
        ["not", "an", "object"],
        {"keys": []},
        {"keys": [{"kty": "RSA", "n": "xx"}]},
    ],
)
def test_jwks_fetch_failure_is_unavailable(
    jwks: dict[str, Any], rsa_key: rsa.RSAPrivateKey, document: Any
) -> None:
    jwks["document"] = document
    token = jwt.encode(jwt_claims(), rsa_key, algorithm="RS256", headers={"kid": "key-1"})
    with pytest.raises(IdentityUnavailable) as excinfo:
        build_authenticator(jwks_settings()).authenticate(token)
    assert_auth_error(excinfo, "IAM is unavailable.")


def test_jwks_symmetric_key_never_used(jwks: dict[str, Any]) -> None:
    shared = b"published-symmetric-key-material-0123456789"
    jwks["document"] = {"keys": [{"kty": "oct", "kid": "sym", "k": b64url(shared)}]}
    authenticator = build_authenticator(jwks_settings())
    hs_token = jwt.encode(jwt_claims(), shared, algorithm="HS256", headers={"kid": "sym"})
    with pytest.raises(AuthError):
        authenticator.authenticate(hs_token)
    forged_rs = raw_jwt(
        {"alg": "RS256", "kid": "sym"},
        jwt_claims(),
        lambda data: hmac.new(shared, data, hashlib.sha256).digest(),
    )
    with pytest.raises(AuthError) as excinfo:
        authenticator.authenticate(forged_rs)
    assert_auth_error(excinfo, "Invalid token.")


def test_jwks_url_must_be_http() -> None:
    with pytest.raises(SettingsError, match="JWT_JWKS_URL"):
        build_authenticator(jwks_settings(jwt_jwks_url="file:///etc/passwd"))


def test_jwt_authenticator_needs_some_key() -> None:
    with pytest.raises(SettingsError):
        JwtAuthenticator()


# ---------------------------------------------------------------- dev mode and minting


@pytest.fixture
def dev_settings(tmp_path: Any) -> Settings:
    return Settings.from_env({}, dev_token_secret_file=str(tmp_path / "state" / "dev-secret"))


def test_default_settings_use_dev_mode(dev_settings: Settings) -> None:
    assert dev_settings.auth_mode == "dev"
    assert isinstance(build_authenticator(dev_settings), JwtAuthenticator)


def test_mint_token_round_trip_through_dev_mode(dev_settings: Settings) -> None:
    token = mint_token(dev_settings, "dev-user", "dev-tenant", ["flows.read", "flows.control"])
    principal = build_authenticator(dev_settings).authenticate(token)
    assert principal == Principal(
        sub="dev-user",
        tenant="dev-tenant",
        permissions=frozenset({"flows.read", "flows.control"}),
        is_admin=False,
    )
    claims = jwt.decode(token, dev_secret(dev_settings), algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 3600
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_mint_token_without_tenant(dev_settings: Settings) -> None:
    token = mint_token(dev_settings, "solo", None, [], ttl_seconds=60)
    claims = jwt.decode(token, dev_secret(dev_settings), algorithms=["HS256"])
    assert "tenant" not in claims
    assert claims["permissions"] == []
    assert claims["exp"] - claims["iat"] == 60
    assert build_authenticator(dev_settings).authenticate(token).owner_ids == ("solo",)


def test_mint_token_carries_audience_and_issuer(dev_settings: Settings) -> None:
    settings = dev_settings.replace(jwt_audience="flow-repository", jwt_issuer="local")
    token = mint_token(settings, "u", None, ["all"])
    claims = jwt.decode(
        token, dev_secret(settings), algorithms=["HS256"], audience="flow-repository"
    )
    assert claims["iss"] == "local"
    assert build_authenticator(settings).authenticate(token).is_admin
    # A verifier expecting another audience refuses it.
    with pytest.raises(AuthError):
        build_authenticator(settings.replace(jwt_audience="elsewhere")).authenticate(token)


def test_dev_mode_rejects_expired_minted_token(dev_settings: Settings) -> None:
    token = mint_token(dev_settings, "u", None, [], ttl_seconds=-5)
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(dev_settings).authenticate(token)
    assert_auth_error(excinfo, "Token expired.")


def test_dev_mode_rejects_token_from_another_secret(dev_settings: Settings, tmp_path: Any) -> None:
    other = dev_settings.replace(dev_token_secret_file=str(tmp_path / "other-secret"))
    token = mint_token(other, "u", None, ["all"])
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(dev_settings).authenticate(token)
    assert_auth_error(excinfo, "Invalid token.")


def test_dev_mode_rejects_tokens_without_exp(dev_settings: Settings) -> None:
    token = jwt.encode({"sub": "u"}, dev_secret(dev_settings), algorithm="HS256")
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(dev_settings).authenticate(token)
    assert_auth_error(excinfo, "Invalid token.")


def test_dev_mode_accepts_only_hs256(tmp_path: Any) -> None:
    path = tmp_path / "long-secret"
    path.write_text(SECRET)
    settings = Settings.from_env({}, dev_token_secret_file=str(path))
    authenticator = build_authenticator(settings)
    assert (
        authenticator.authenticate(jwt.encode(jwt_claims(), SECRET, algorithm="HS256")).sub
        == "user-1"
    )
    with pytest.raises(AuthError) as excinfo:
        authenticator.authenticate(jwt.encode(jwt_claims(), SECRET, algorithm="HS512"))
    assert_auth_error(excinfo, "Invalid token.")


def test_dev_mode_rejects_alg_none(dev_settings: Settings) -> None:
    with pytest.raises(AuthError) as excinfo:
        build_authenticator(dev_settings).authenticate(raw_jwt({"alg": "none"}, jwt_claims()))
    assert_auth_error(excinfo, "Invalid token.")


def test_mint_token_with_jwt_secret_is_accepted_in_jwt_mode() -> None:
    token = mint_token(hs_settings(), "u", "t", ["flows.read"])
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["sub"] == "u"
    assert build_authenticator(hs_settings()).authenticate(token).tenant == "t"


def test_mint_token_refuses_public_key_or_jwks_only(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="private key"):
        mint_token(Settings.from_env({}, jwt_public_key=public_pem(rsa_key)), "u", None, [])
    with pytest.raises(ValueError, match="private key"):
        mint_token(jwks_settings(), "u", None, [])


def test_mint_token_refuses_introspection_modes() -> None:
    with pytest.raises(ValueError, match="IAM"):
        mint_token(basic_settings(), "u", None, [])
    with pytest.raises(ValueError, match="IAM"):
        mint_token(oidc_settings(), "u", None, [])


def test_mint_token_argument_checks(dev_settings: Settings) -> None:
    with pytest.raises(ValueError):
        mint_token(dev_settings, "", None, [])
    with pytest.raises(TypeError):
        mint_token(dev_settings, "u", None, "flows.read")


# ---------------------------------------------------------------- dev secret file


def test_dev_secret_created_private_and_reused(dev_settings: Settings) -> None:
    path = dev_settings.dev_token_secret_file
    assert path is not None and not os.path.exists(path)

    first = dev_secret(dev_settings)

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(first) >= 43
    assert set(first) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    with open(path, encoding="utf-8") as handle:
        assert handle.read().strip() == first
    assert dev_secret(dev_settings) == first
    assert os.listdir(os.path.dirname(path)) == ["dev-secret"]  # no temp files left


def test_dev_secret_reads_existing_file(tmp_path: Any) -> None:
    path = tmp_path / "given-secret"
    path.write_text("  operator-chosen-secret-value-0123456789abcdef\n")
    settings = Settings.from_env({}, dev_token_secret_file=str(path))
    assert dev_secret(settings) == "operator-chosen-secret-value-0123456789abcdef"


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_dev_secret_file_others_can_write_is_refused(tmp_path: Any, mode: int) -> None:
    path = tmp_path / "given-secret"
    path.write_text("operator-chosen-secret-value-0123456789abcdef\n")
    path.chmod(mode)
    settings = Settings.from_env({}, dev_token_secret_file=str(path))
    with pytest.raises(SettingsError, match="writable by group or others"):
        dev_secret(settings)
    with pytest.raises(SettingsError, match="writable by group or others"):
        build_authenticator(settings)


def test_dev_secret_file_of_another_user_is_refused(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "given-secret"
    path.write_text("operator-chosen-secret-value-0123456789abcdef\n")
    path.chmod(0o600)
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)  # as if another user owned it
    with pytest.raises(SettingsError, match=f"owned by user id {real_uid}"):
        dev_secret(Settings.from_env({}, dev_token_secret_file=str(path)))


def test_identity_mode_is_logged_and_dev_mode_warns(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="flow_repository.adapters.auth")
    build_authenticator(Settings.from_env({}, dev_token_secret_file=str(tmp_path / "s")))
    build_authenticator(Settings.from_env({}, jwt_secret="s" * 32))
    build_authenticator(Settings.from_env({}, introspect_type="oidc",
                                          introspect_endpoint_oidc="http://iam/oidc"))
    build_authenticator(Settings.from_env({}, introspect_endpoint_basic="http://iam/basic"))
    records = [record for record in caplog.records if hasattr(record, "identityMode")]
    assert [record.identityMode for record in records] == [
        "dev", "jwt", "introspection-oidc", "introspection-basic"]
    assert records[0].levelname == "WARNING" and "NOT FOR PRODUCTION" in records[0].message
    assert records[1].algorithms == ["HS256", "HS384", "HS512"]
    assert all(record.levelname == "INFO" for record in records[1:])


def test_dev_secret_default_location_under_xdg_state_home(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    secret = dev_secret(Settings.from_env({}))
    path = tmp_path / "xdg" / "flow-repository" / "dev-token-secret"
    assert path.read_text().strip() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("xdg", ["", "relative/state"])
def test_dev_secret_ignores_unset_or_relative_xdg(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, xdg: str
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    secret = dev_secret(Settings.from_env({}))
    path = tmp_path / ".local" / "state" / "flow-repository" / "dev-token-secret"
    assert path.read_text().strip() == secret
    assert not (tmp_path / "relative").exists()


def test_dev_secret_falls_back_to_temp_dir(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    monkeypatch.setenv("XDG_STATE_HOME", str(blocker / "state"))
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_dir))

    secret = dev_secret(Settings.from_env({}))

    fallback = temp_dir / f"flow-repository-dev-token-secret-{os.getuid()}"
    assert fallback.read_text().strip() == secret
    assert stat.S_IMODE(fallback.stat().st_mode) == 0o600
    assert dev_secret(Settings.from_env({})) == secret


def test_dev_secret_fallback_refuses_shared_file(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_STATE_HOME", str(blocker / "state"))
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_dir))
    planted = temp_dir / f"flow-repository-dev-token-secret-{os.getuid()}"
    planted.write_text("attacker-known-secret")
    planted.chmod(0o644)

    with pytest.raises(PermissionError, match="not private"):
        dev_secret(Settings.from_env({}))


def test_dev_secret_configured_file_does_not_fall_back(tmp_path: Any) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    settings = Settings.from_env({}, dev_token_secret_file=str(blocker / "secret"))
    with pytest.raises(OSError):
        dev_secret(settings)


def test_dev_secret_concurrent_creation_agrees(tmp_path: Any) -> None:
    settings = Settings.from_env({}, dev_token_secret_file=str(tmp_path / "race" / "secret"))
    results: list[str] = []
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        results.append(dev_secret(settings))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert len(set(results)) == 1
    assert os.listdir(tmp_path / "race") == ["secret"]


def test_a_verified_token_is_not_decoded_again_while_it_is_valid(monkeypatch) -> None:
    authenticator = JwtAuthenticator(secret=SECRET)
    token = jwt.encode({"sub": "u-1", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    decodes = []
    real_decode = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: decodes.append(1) or real_decode(*a, **k))
    first = authenticator.authenticate(token)
    second = authenticator.authenticate(token)
    assert first == second and first.sub == "u-1"
    assert len(decodes) == 1


def test_a_cached_token_is_refused_once_it_expires() -> None:
    authenticator = JwtAuthenticator(secret=SECRET)
    expiry = int(time.time()) + 1
    token = jwt.encode({"sub": "u-1", "exp": expiry}, SECRET, algorithm="HS256")
    assert authenticator.authenticate(token).sub == "u-1"
    while time.time() <= expiry + 0.01:  # PyJWT reads the real clock: let the token lapse
        time.sleep(0.05)
    with pytest.raises(AuthError, match="expired"):
        authenticator.authenticate(token)
