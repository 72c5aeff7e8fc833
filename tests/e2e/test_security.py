"""TLS and bearer-token authentication over real gRPC on loopback, each against servers started here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from held_stream import SMALL_WINDOW
from metrics_scrape import Scrape
from server_process import ROOT, ServerProcess
from tokenloom_client import AsyncClient, Client

ARGS = ("--kv-cache-tokens", "4096", "--max-num-batched-tokens", "256", "--log-level", "WARNING")
TOKEN = "tok-3f9a1c"
PROMPT = list(range(500, 516))


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple:
    """A self-signed certificate for localhost / 127.0.0.1: (cert path, key path)."""
    if shutil.which("openssl") is None or subprocess.run(["openssl", "version"], capture_output=True).returncode:
        pytest.skip("the openssl CLI is needed to make a test certificate")
    root = tmp_path_factory.mktemp("tls")
    cert_path, key_path = root / "server.crt", root / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key_path),
         "-out", str(cert_path), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60)
    return cert_path, key_path


# The tokens file of the "tokens" server: two clients with limits of their own (the server-wide cap is 3).
CLIENTS = [
    {"token": "tok-alice", "client_id": "alice", "max_streams": 1},
    {"token": "tok-bob", "client_id": "bob", "max_streams": 2},
]


@pytest.fixture(scope="module")
def servers(tiny_dirs, cert, tmp_path_factory):
    """A TLS server, a token server (its token read from a file), a tokens-file server whose /metrics
    listens beyond loopback, and an open server with a per-client stream cap, started in parallel."""
    logs = tmp_path_factory.mktemp("logs-security")
    cert_path, key_path = cert
    token_file, tokens_file = logs / "token", logs / "tokens.json"
    token_file.write_text(TOKEN + "\n")
    tokens_file.write_text(json.dumps({"clients": CLIENTS}))
    procs = {
        "tls": ServerProcess(tiny_dirs["llama"], *ARGS, "--tls-cert", str(cert_path), "--tls-key", str(key_path),
                             log_dir=logs, name="tls"),
        "auth": ServerProcess(tiny_dirs["llama"], *ARGS, "--auth-token-file", str(token_file), log_dir=logs,
                              name="auth"),
        "tokens": ServerProcess(tiny_dirs["llama"], *ARGS, "--auth-tokens-file", str(tokens_file),
                                "--max-streams-per-client", "3", "--metrics-host", "0.0.0.0", log_dir=logs,
                                name="tokens"),
        "open": ServerProcess(tiny_dirs["llama"], *ARGS, "--max-streams-per-client", "1", log_dir=logs, name="open"),
    }
    procs["tokens"].tokens_file = tokens_file
    for proc in procs.values():
        proc.start()
    try:
        for name, proc in procs.items():
            proc.wait_ready(root_certificates=cert_path.read_bytes() if name == "tls" else None)
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def _failure(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_tls_server_answers_a_client_that_trusts_its_certificate(servers, cert):
    with Client(servers["tls"].address, root_certificates=cert[0].read_bytes(), timeout=60) as client:
        result = client.generate(input_ids=PROMPT, max_new_tokens=6)
    assert len(result.token_ids) == 6


def test_tls_server_refuses_plaintext_and_untrusting_clients(servers):
    with Client(servers["tls"].address, timeout=10) as client:
        assert _failure(client.model_info).code() == grpc.StatusCode.UNAVAILABLE
    with Client(servers["tls"].address, tls=True, timeout=10) as client:  # system roots: self-signed is unknown
        assert _failure(client.model_info).code() == grpc.StatusCode.UNAVAILABLE


def test_without_a_token_the_call_is_unauthenticated_and_says_what_to_send(servers):
    with Client(servers["auth"].address, timeout=30) as client:
        error = _failure(lambda: client.generate(input_ids=PROMPT, max_new_tokens=2))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer <token>" in error.details()
        stream_error = _failure(lambda: list(client.stream(input_ids=PROMPT, max_new_tokens=2)))
        assert stream_error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_wrong_token_is_unauthenticated(servers):
    with Client(servers["auth"].address, token=TOKEN + "x", timeout=30) as client:
        error = _failure(client.model_info)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not accepted" in error.details()


def test_the_right_token_generates_with_both_clients(servers):
    with Client(servers["auth"].address, token=TOKEN, metadata={"x-client-id": "me"}, timeout=60) as client:
        whole = client.generate(input_ids=PROMPT, max_new_tokens=6)
        streamed = [t for chunk in client.stream(input_ids=PROMPT, max_new_tokens=6) for t in chunk.token_ids]
    assert streamed == whole.token_ids and len(whole.token_ids) == 6

    async def run():
        async with AsyncClient(servers["auth"].address, token=TOKEN, timeout=60) as client:
            return await client.generate(input_ids=PROMPT, max_new_tokens=6)

    assert asyncio.run(run()).token_ids == whole.token_ids


def test_health_check_needs_no_token(servers):
    with grpc.insecure_channel(servers["auth"].address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert reply.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)


def test_a_certificate_without_its_key_exits_2(cert):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "server"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "tokenloom", "--tls-cert", str(cert[0])],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "--tls-cert and --tls-key go together" in done.stderr


def _cli(*args: str, token_env: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TOKENLOOM_AUTH_TOKEN"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "client"), os.environ.get("PYTHONPATH", "")])
    if token_env is not None:
        env["TOKENLOOM_AUTH_TOKEN"] = token_env
    return subprocess.run([sys.executable, "-m", "tokenloom_client", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_flags_reach_tls_and_token_servers(servers, cert):
    assert _cli("--target", servers["tls"].address, "--ca-cert", str(cert[0]), "--info").returncode == 0
    refused = _cli("--target", servers["auth"].address, "--info")
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr and "--token" in refused.stderr
    assert _cli("--target", servers["auth"].address, "--token", TOKEN, "--info").returncode == 0
    assert _cli("--target", servers["auth"].address, "--info", token_env=TOKEN).returncode == 0


# -- item 6: malformed bytes -------------------------------------------------------------------------------

GENERATE_UNARY = "/tokenloom.v1.Generation/GenerateUnary"
GENERATE = "/tokenloom.v1.Generation/Generate"
# Field 1 (prompt) as length-delimited, with a length far past the end: truncated protobuf.
CORRUPT = b"\x0a\xff\xff\xff\xff\x0f" + b"garbage"


def _raw_call(address: str, method: str, body: bytes, metadata=(), stream: bool = False) -> grpc.RpcError:
    """`body` sent as it is (identity serializers), as a client with a broken encoder would."""
    with grpc.insecure_channel(address) as channel:
        if stream:
            call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
            return _failure(lambda: list(call(body, metadata=metadata, timeout=30)))
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        return _failure(lambda: call(body, metadata=metadata, timeout=30))


def test_a_corrupt_body_is_invalid_argument_in_one_line_counted_once_and_logs_no_traceback(servers):
    server = servers["open"]
    before = Scrape(server.metrics_url).get("malformed_requests_total")
    errors = [_raw_call(server.address, GENERATE_UNARY, CORRUPT) for _ in range(20)]
    errors.append(_raw_call(server.address, GENERATE, CORRUPT, stream=True))
    for error in errors:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        assert "not a valid" in error.details() and "\n" not in error.details()
        assert "Error" not in error.details() and "<class" not in error.details()
    assert Scrape(server.metrics_url).get("malformed_requests_total") == before + len(errors)
    log = server.log_path.read_text()
    assert "Traceback" not in log and "DecodeError" not in log
    assert len([line for line in log.splitlines() if "malformed" in line]) <= 1, log[-2000:]
    # The server goes on serving well-formed calls.
    with Client(server.address, timeout=60) as client:
        assert len(client.generate(input_ids=PROMPT, max_new_tokens=2).token_ids) == 2


def test_authentication_comes_before_parsing_the_body(servers):
    server = servers["auth"]
    before = Scrape(server.metrics_url)
    unauthenticated = _raw_call(server.address, GENERATE_UNARY, CORRUPT)
    assert unauthenticated.code() == grpc.StatusCode.UNAUTHENTICATED, unauthenticated.details()
    assert "authorization: Bearer <token>" in unauthenticated.details()
    authenticated = _raw_call(server.address, GENERATE_UNARY, CORRUPT,
                              metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert authenticated.code() == grpc.StatusCode.INVALID_ARGUMENT, authenticated.details()
    after = Scrape(server.metrics_url)
    assert after.get("malformed_requests_total") == before.get("malformed_requests_total") + 1


# -- item 5: failed authentication is counted and logged, rate-limited -------------------------------------


def test_failed_authentication_is_counted_by_reason_and_logged_at_most_once_per_period(servers):
    server = servers["auth"]
    before = Scrape(server.metrics_url).by_label("auth_failures_total", "reason")
    with Client(server.address, timeout=30) as client:
        for _ in range(5):
            _failure(client.model_info)
    with Client(server.address, token=TOKEN + "x", timeout=30) as client:
        for _ in range(3):
            _failure(client.model_info)
    with grpc.insecure_channel(server.address) as channel:
        info = channel.unary_unary("/tokenloom.v1.Generation/ModelInfo", request_serializer=None,
                                   response_deserializer=None)
        _failure(lambda: info(b"", metadata=(("authorization", "Basic abc"),), timeout=30))
    after = Scrape(server.metrics_url).by_label("auth_failures_total", "reason")
    assert {k: after[k] - before.get(k, 0) for k in ("missing", "rejected", "malformed")} == \
        {"missing": 5, "rejected": 3, "malformed": 1}
    lines = [line for line in server.log_path.read_text().splitlines() if "authentication failed" in line]
    assert 1 <= len(lines) <= 2, lines  # one per 10 s, however many calls fail
    assert "WARNING" in lines[0] and "/tokenloom.v1.Generation/" in lines[0] and "127.0.0.1" in lines[0]


def test_metrics_open_beyond_loopback_next_to_a_protected_port_is_warned_about(servers):
    assert "--metrics-host 127.0.0.1" in servers["tokens"].log_tail(20_000)
    assert "--metrics-host 127.0.0.1" not in servers["auth"].log_tail(20_000)  # its /metrics is on loopback


def _serve(*args: str, env_token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TOKENLOOM_AUTH_TOKEN"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "server"), str(ROOT / "client"), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "tokenloom", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_token_files_that_cannot_be_used_exit_2_before_loading(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    done = _serve("--auth-token-file", str(empty))
    assert done.returncode == 2 and "is empty" in done.stderr, done.stderr
    done = _serve("--auth-token-file", str(tmp_path / "missing"))
    assert done.returncode == 2 and "cannot read the token file" in done.stderr, done.stderr
    done = _serve("--auth-token", "a", "--auth-token-file", str(empty))
    assert done.returncode == 2 and "exclude each other" in done.stderr, done.stderr
    bad = tmp_path / "tokens.json"
    bad.write_text('{"clients": [{"token": "t"}]}')
    done = _serve("--auth-tokens-file", str(bad))
    assert done.returncode == 2 and "'client_id' must be" in done.stderr, done.stderr


# -- item 4: two servers on one port -----------------------------------------------------------------------


def test_a_second_server_on_a_port_in_use_exits_with_a_message_naming_the_port(servers, tiny_dirs, tmp_path):
    taken = servers["open"].port
    second = ServerProcess(tiny_dirs["llama"], *ARGS, log_dir=tmp_path, name="second")
    second.cmd[second.cmd.index("--port") + 1] = str(taken)
    second.start()
    try:
        code = second.proc.wait(120)
    except subprocess.TimeoutExpired:
        second.stop()
        pytest.fail(f"a second server on port {taken} started:\n{second.log_tail()}")
    log = second.log_tail()
    assert code != 0
    assert f"cannot listen on 127.0.0.1:{taken}" in log and "in use" in log, log
    assert "Traceback" not in log, log


# -- item 3: client identity -------------------------------------------------------------------------------

LONG = dict(max_new_tokens=400, ignore_eos=True)  # long enough to hold a stream slot while others are tried


@contextlib.asynccontextmanager
async def _holding(address: str, n: int, **client_args):
    """`n` streams open on one client until the block ends (each has sent its first chunk)."""
    # A small window and a reader that stops after its first chunk: the streams stay open (their rows
    # pause) however fast the model, until the block ends and they are cancelled.
    clients = [AsyncClient(address, timeout=120, channel_options=SMALL_WINDOW, **client_args) for _ in range(n)]
    started = [asyncio.Event() for _ in range(n)]

    async def hold(c, event):
        async for _ in c.stream(input_ids=PROMPT, **LONG):
            event.set()
            await asyncio.Event().wait()

    tasks = [asyncio.create_task(hold(c, e)) for c, e in zip(clients, started)]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            await c.close()


async def _refused(address: str, **client_args) -> grpc.aio.AioRpcError:
    async with AsyncClient(address, timeout=60, **client_args) as c:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.generate(input_ids=PROMPT, max_new_tokens=2)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    return err.value


def test_a_rotated_client_id_gets_no_fresh_budget_when_the_metadata_is_not_trusted(servers):
    address = servers["open"].address

    async def go():
        async with _holding(address, 1, metadata={"x-client-id": "first"}):
            return await _refused(address, metadata={"x-client-id": "second"})

    assert "client 'loopback' has 1 requests open" in asyncio.run(go()).details()


def test_two_tokens_are_two_clients_each_with_its_own_limits(servers):
    address = servers["tokens"].address

    async def go():
        async with _holding(address, 1, token="tok-alice"):
            alice = await _refused(address, token="tok-alice", metadata={"x-client-id": "bob"})
            async with _holding(address, 2, token="tok-bob", metadata={"x-client-id": "alice"}):
                bob = await _refused(address, token="tok-bob")
        return alice, bob

    alice, bob = asyncio.run(go())
    assert "client 'alice' has 1 requests open" in alice.details()
    assert "client 'bob' has 2 requests open" in bob.details()


def test_sighup_reloads_the_tokens_file_and_a_bad_file_keeps_the_old_one(servers):
    server = servers["tokens"]

    def accepted(token: str) -> bool:
        with Client(server.address, token=token, timeout=30) as client:
            try:
                client.model_info()
                return True
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc.details()
                return False

    def reloaded(token: str, expected: bool) -> bool:
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while accepted(token) != expected:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    original = server.tokens_file.read_text()
    assert not accepted("tok-carol")
    try:
        server.tokens_file.write_text(json.dumps({"clients": CLIENTS + [{"token": "tok-carol", "client_id": "carol"}]}))
        assert reloaded("tok-carol", True)
        server.tokens_file.write_text("{ not json")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "still using the 3 tokens" not in server.log_tail(20_000):
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.2)
        assert accepted("tok-carol") and accepted("tok-alice")
        assert server.proc.poll() is None
    finally:
        server.tokens_file.write_text(original)
        server.proc.send_signal(signal.SIGHUP)
    assert reloaded("tok-carol", False)
