"""TLS and bearer-token authentication over real gRPC on loopback, each against servers started here."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

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


@pytest.fixture(scope="module")
def servers(tiny_dirs, cert, tmp_path_factory):
    """A TLS server and a token server, started in parallel."""
    logs = tmp_path_factory.mktemp("logs-security")
    cert_path, key_path = cert
    tls = ServerProcess(tiny_dirs["llama"], *ARGS, "--tls-cert", str(cert_path), "--tls-key", str(key_path),
                        log_dir=logs, name="tls").start()
    auth = ServerProcess(tiny_dirs["llama"], *ARGS, "--auth-token", TOKEN, log_dir=logs, name="auth").start()
    try:
        tls.wait_ready(root_certificates=cert_path.read_bytes())
        auth.wait_ready()
        yield {"tls": tls, "auth": auth}
    finally:
        tls.stop()
        auth.stop()


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
