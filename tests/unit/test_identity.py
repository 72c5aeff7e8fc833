"""Client identity, the tokens file, per-client limit overrides and throttled logging, on fabricated input."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from tokenloom.front.admission import Admission, AdmissionConfig, ClientLimits, Rejected
from tokenloom.front.clients import ClientTable, TokensFile
from tokenloom.front.identity import Identify
from tokenloom.front.throttled_log import ThrottledLog

PEER = "ipv4:10.0.0.7:5312"


def tokens_json(*clients: dict) -> str:
    return json.dumps({"clients": list(clients)})


def bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"), ("x-client-id", "someone-else"))


def test_the_tokens_file_maps_tokens_to_clients_and_their_limits():
    table = ClientTable.parse(tokens_json(
        {"token": "ta", "client_id": "alice", "max_streams": 4, "rate_limit": 10},
        {"token": "ta2", "client_id": "alice", "max_streams": 4, "rate_limit": 10},
        {"token": "tb", "client_id": "bob"},
    ))
    assert (table.client_of("ta"), table.client_of("ta2"), table.client_of("tb")) == ("alice", "alice", "bob")
    assert table.client_of("tc") is None and table.client_of("t") is None
    assert table.limits == {"alice": ClientLimits(10, 4), "bob": ClientLimits()}
    assert "ta" not in repr(table.clients), "tokens are kept as digests only"


@pytest.mark.parametrize("text, problem", [
    ("{", "not JSON"),
    ("[]", "one client or more"),
    ('{"clients": []}', "one client or more"),
    (tokens_json({"token": "t", "client_id": "a", "max_stream": 1}), "keys"),
    (tokens_json({"token": "", "client_id": "a"}), "'token'"),
    (tokens_json({"token": " t", "client_id": "a"}), "'token'"),
    (tokens_json({"token": "t"}), "'client_id'"),
    (tokens_json({"token": "t", "client_id": "a", "rate_limit": -1}), "rate_limit"),
    (tokens_json({"token": "t", "client_id": "a", "max_streams": "2"}), "max_streams"),
    (tokens_json({"token": "t", "client_id": "a"}, {"token": "t", "client_id": "b"}), "same token"),
    (tokens_json({"token": "t", "client_id": "a"}, {"token": "u", "client_id": "a", "max_streams": 1}),
     "other limits"),
])
def test_a_bad_tokens_file_says_what_is_wrong_without_quoting_a_token(text, problem):
    with pytest.raises(ValueError, match=problem) as err:
        ClientTable.parse(text)
    assert "'t'" not in str(err.value)


def test_a_reload_that_fails_keeps_the_table_in_use(tmp_path, caplog):
    path = tmp_path / "tokens.json"
    path.write_text(tokens_json({"token": "ta", "client_id": "alice"}))
    tokens = TokensFile(path)
    path.write_text("{not json")
    with caplog.at_level(logging.ERROR):
        assert not tokens.reload()
    assert tokens.table.client_of("ta") == "alice"
    assert "still using the 1 tokens loaded before" in caplog.text
    path.write_text(tokens_json({"token": "tb", "client_id": "bob"}))
    assert tokens.reload()
    assert (tokens.table.client_of("ta"), tokens.table.client_of("tb")) == (None, "bob")


def test_an_unreadable_tokens_file_is_a_configuration_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read the tokens file"):
        TokensFile(tmp_path / "missing.json")


def test_with_a_tokens_file_the_client_is_the_tokens_and_the_metadata_is_never_read(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(tokens_json({"token": "ta", "client_id": "alice"}, {"token": "tb", "client_id": "bob"}))
    identify = Identify("x-client-id", TokensFile(path))
    assert identify(bearer("ta"), PEER) == "alice"
    assert identify(bearer("tb"), "ipv6:[::1]:1") == "bob"
    assert identify(bearer("removed-by-a-reload"), PEER) == "10.0.0.7"


def test_the_metadata_key_counts_only_when_trusted():
    metadata = (("x-client-id", "team-a"),)
    assert Identify("")(metadata, PEER) == "10.0.0.7"
    assert Identify("x-client-id")(metadata, PEER) == "team-a"
    assert AdmissionConfig().trusted_metadata_key == ""
    assert AdmissionConfig(trust_client_id_metadata=True).trusted_metadata_key == "x-client-id"
    assert Identify("")(metadata, "ipv4:127.0.0.1:1") == Identify("")(metadata, "ipv6:[::1]:2") == "loopback"


def _config(**kw) -> AdmissionConfig:
    return AdmissionConfig(max_queued_requests=0, max_queued_prompt_tokens=0, **kw)


def test_a_clients_own_limits_override_the_server_wide_ones_and_a_reload_swaps_them():
    async def go():
        adm = Admission(_config(max_streams_per_client=1, rate_limit_per_client=100, rate_limit_period=60))
        adm.set_client_limits({"alice": ClientLimits(max_streams_per_client=3), "bob": ClientLimits(2, 0)})
        alice = [await adm.admit("alice", 1) for _ in range(3)]
        with pytest.raises(Rejected, match="client 'alice' has 3 requests open"):
            await adm.admit("alice", 1)
        carol = await adm.admit("carol", 1)  # the server-wide cap of 1
        with pytest.raises(Rejected, match="max-streams-per-client 1"):
            await adm.admit("carol", 1)
        bob = [await adm.admit("bob", 1) for _ in range(2)]  # no stream cap of his own: 0 = unlimited
        with pytest.raises(Rejected, match="client 'bob' started 2 requests"):
            await adm.admit("bob", 1)
        adm.set_client_limits({"bob": ClientLimits(rate_limit_per_client=5, max_streams_per_client=0)})
        bob.append(await adm.admit("bob", 1))  # a new limit, a new window
        adm.set_client_limits({})
        with pytest.raises(Rejected, match="max-streams-per-client 1"):  # back to the server-wide cap
            await adm.admit("bob", 1)
        adm.check_invariants()
        for ticket in alice + bob + [carol]:
            ticket.release()
        adm.check_invariants()

    asyncio.run(go())


def test_throttled_log_writes_one_line_per_period_and_counts_the_rest(caplog, monkeypatch):
    now = [100.0]
    monkeypatch.setattr("tokenloom.front.throttled_log.time.monotonic", lambda: now[0])
    throttled = ThrottledLog(logging.getLogger("test.throttled"), period=10.0)
    with caplog.at_level(logging.WARNING, logger="test.throttled"):
        assert throttled("refused %s", "a")
        assert not any(throttled("refused %s", "b") for _ in range(5))
        now[0] += 10.5
        assert throttled("refused %s", "c")
    assert [r.getMessage() for r in caplog.records] == [
        "refused a", "refused c (5 more like it in the 10 s before, not logged)"]


def test_the_token_file_flag_reads_and_strips_and_refuses_what_it_cannot_use(tmp_path):
    from tokenloom.__main__ import auth_token

    path = tmp_path / "token"
    path.write_text("  s3cret\n")
    assert auth_token(None, {"TOKENLOOM_AUTH_TOKEN": "env"}, path=str(path)) == "s3cret"
    with pytest.raises(ValueError, match="exclude each other"):
        auth_token("flag", {}, path=str(path))
    path.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        auth_token(None, {}, path=str(path))
    with pytest.raises(ValueError, match="cannot read the token file"):
        auth_token(None, {}, path=str(tmp_path / "missing"))
