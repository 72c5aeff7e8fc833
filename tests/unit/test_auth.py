"""The bearer-token check and which services stay open, on fabricated metadata."""

from __future__ import annotations

import pytest

from tokenloom.front.auth import MALFORMED, MISSING, REJECTED, BearerTokenInterceptor, check, is_open

TOKEN = b"s3cret-token"


@pytest.mark.parametrize("metadata", [
    [("authorization", "Bearer s3cret-token")],
    [("x-client-id", "a"), ("Authorization", "bearer s3cret-token")],
    [("authorization", b"Bearer s3cret-token")],
])
def test_the_right_token_passes(metadata):
    assert check(metadata, TOKEN) is None


@pytest.mark.parametrize("metadata, problem", [
    (None, MISSING),
    ([], MISSING),
    ([("x-client-id", "a")], MISSING),
    ([("authorization", "Bearer wrong")], REJECTED),
    ([("authorization", "Bearer s3cret-token-and-more")], REJECTED),
    ([("authorization", "Bearer s3cret-toke")], REJECTED),
    ([("authorization", "s3cret-token")], MALFORMED),
    ([("authorization", "Basic s3cret-token")], MALFORMED),
    ([("authorization", "Bearer ")], MALFORMED),
])
def test_a_missing_wrong_or_malformed_token_is_refused(metadata, problem):
    assert check(metadata, TOKEN) == problem


def test_two_authorization_entries_are_refused():
    metadata = [("authorization", "Bearer wrong"), ("authorization", "Bearer s3cret-token")]
    assert "not several" in check(metadata, TOKEN)


def test_the_missing_token_message_says_what_to_send():
    assert "authorization: Bearer <token>" in MISSING


@pytest.mark.parametrize("method, expected", [
    ("/grpc.health.v1.Health/Check", True),
    ("/grpc.health.v1.Health/Watch", True),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", True),
    ("/tokenloom.v1.Generation/Generate", False),
    ("/tokenloom.v1.Generation/ModelInfo", False),
    ("/grpc.health.v1.HealthX/Check", False),
])
def test_only_health_and_reflection_are_open(method, expected):
    assert is_open(method) is expected


def test_an_empty_token_is_refused_at_construction():
    with pytest.raises(ValueError, match="empty"):
        BearerTokenInterceptor("")


def test_the_flag_wins_over_the_environment_and_an_empty_variable_is_unset():
    from tokenloom.__main__ import auth_token

    assert auth_token("flag", {"TOKENLOOM_AUTH_TOKEN": "env"}) == "flag"
    assert auth_token(None, {"TOKENLOOM_AUTH_TOKEN": "env"}) == "env"
    assert auth_token(None, {"TOKENLOOM_AUTH_TOKEN": ""}) is None
    assert auth_token(None, {}) is None
