"""The SDK installs without the server's stack, and rejects bad arguments before any RPC."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenloom_client import AsyncClient, Client

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"
# Nothing listens on port 1, so reaching the network would fail with UNAVAILABLE
# instead of the TypeError these tests expect.
UNUSED_TARGET = "127.0.0.1:1"


def test_sdk_and_cli_import_without_torch_or_transformers(tmp_path):
    # A None entry in sys.modules makes any `import torch` raise ImportError.
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "import tokenloom_client, tokenloom_client.__main__")
    env = {**os.environ, "PYTHONPATH": str(CLIENT_DIR)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_client_rejects_unknown_parameter_by_name():
    with Client(UNUSED_TARGET) as client:
        with pytest.raises(TypeError, match="temprature"):
            client.generate("hi", temprature=0.5)
        with pytest.raises(TypeError, match="temprature"):
            client.stream("hi", temprature=0.5)


def test_async_client_rejects_unknown_parameter_by_name():
    async def scenario():
        async with AsyncClient(UNUSED_TARGET) as client:
            with pytest.raises(TypeError, match="beam_width"):
                await client.generate("hi", beam_width=4)
            with pytest.raises(TypeError, match="beam_width"):
                client.stream("hi", beam_width=4)

    asyncio.run(scenario())
