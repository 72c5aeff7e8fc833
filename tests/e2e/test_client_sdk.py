"""The Python SDK and CLI against servers started as a user starts them (`python -m tokenloom`)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tokenloom_client import AsyncClient, Client

ROOT = Path(__file__).resolve().parents[2]
PROMPT = list(range(1000, 1024))


def test_sync_generate_and_stream_agree(tiny_servers, tiny_dirs):
    with Client(tiny_servers["gpt2"].address) as client:
        whole = client.generate(input_ids=PROMPT, max_new_tokens=12, request_id="mine")
        chunks = list(client.stream(input_ids=PROMPT, max_new_tokens=12))
    assert whole.request_id == "mine"
    assert len(whole.token_ids) == whole.usage.generated_tokens == 12
    assert whole.usage.prompt_tokens == len(PROMPT)
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert "".join(c.text for c in chunks) == whole.text
    assert [lp for c in chunks for lp in c.logprobs] == pytest.approx(whole.logprobs)
    assert all(lp <= 0 for lp in whole.logprobs)
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])


def test_async_generate_and_stream_agree(tiny_servers):
    async def run():
        async with AsyncClient(tiny_servers["gpt2"].address) as client:
            whole = await client.generate(input_ids=PROMPT, max_new_tokens=9, do_sample=True, seed=5)
            chunks = [c async for c in client.stream(input_ids=PROMPT, max_new_tokens=9, do_sample=True, seed=5)]
            info = await client.model_info()
        return whole, chunks, info

    whole, chunks, info = asyncio.run(run())
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert info.model_type == "gpt2" and info.context_length == 512


def test_model_info_describes_the_served_model(tiny_servers, tiny_dirs, hf_models):
    model, tok = hf_models(tiny_dirs["llama"])
    with Client(tiny_servers["llama"].address) as client:
        info = client.model_info()
    assert info.model_type == "llama"
    assert info.vocab_size == model.config.vocab_size
    assert info.context_length == model.config.max_position_embeddings
    assert list(info.eos_token_ids) == [model.generation_config.eos_token_id]
    assert info.limits.max_input_tokens == info.context_length - 1
    assert info.limits.kv_cache_tokens == 8192


def test_unreachable_server_raises_unavailable():
    with Client("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate(prompt="hi")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "client"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "tokenloom_client", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.slow
def test_cli_streams_the_answer_from_the_default_model(default_server):
    done = _cli("--target", default_server.address, "--show-usage", "What is the capital of France?")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "eos" in done.stderr


def test_cli_reports_an_invalid_argument(tiny_servers):
    done = _cli("--target", tiny_servers["llama"].address, "--raw", "--do-sample", "--temperature", "-1", "hello")
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "temperature" in done.stderr
