"""A tokenloom server in a subprocess, started the way a user starts it (`python -m tokenloom`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports (held open together while they are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ServerProcess:
    def __init__(self, model: str | Path, *args: str, log_dir: Path, name: str = "server"):
        # Every test server gets metrics and HTTP ports of its own: the defaults 8000 and 8080 would clash.
        self.port, self.metrics_port, self.http_port = free_ports(3)
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = Path(log_dir) / f"{name}-{self.port}.log"
        self.cmd = [sys.executable, "-m", "tokenloom", "--model", str(model), "--host", "127.0.0.1",
                    "--port", str(self.port), "--metrics-host", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                    "--http-port", str(self.http_port), *args]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "server"), str(ROOT / "client"), env.get("PYTHONPATH", "")])
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        return self

    def wait_ready(self, timeout: float = 180.0, root_certificates: bytes | None = None) -> "ServerProcess":
        """Until the server's health says SERVING (its warm-up done: the port opens before);
        `root_certificates` for a server that speaks TLS."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            channel = (grpc.insecure_channel(self.address) if root_certificates is None else
                       grpc.secure_channel(self.address, grpc.ssl_channel_credentials(root_certificates)))
            with channel:
                try:
                    grpc.channel_ready_future(channel).result(timeout=1.0)
                    health = health_pb2_grpc.HealthStub(channel)
                    while time.monotonic() < deadline and self.proc.poll() is None:
                        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                        if status == health_pb2.HealthCheckResponse.SERVING:
                            return self
                        time.sleep(0.05)
                except (grpc.FutureTimeoutError, grpc.RpcError):
                    pass
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]
