"""Cancellation and deadlines over real gRPC: a stream the client cancels, abandons by closing its
channel, or lets run past its deadline frees its rows and KV blocks, is counted as cancelled, and
leaves the streams around it token for token as they are alone.

The server is started here, so that the metric deltas count only this module's traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time

import grpc
import pytest

from conftest import own_server
from held_stream import SMALL_WINDOW
from metrics_scrape import Scrape, poll
from tokenloom_client import AsyncClient

BLOCK_SIZE = 16
KV_TOKENS = 16384  # 32 streams of <= 11 + 200 tokens need <= 32 * 14 blocks of the 1024
SERVER_ARGS = ("--kv-cache-tokens", str(KV_TOKENS), "--block-size", str(BLOCK_SIZE),
               "--max-num-batched-tokens", "256", "--log-level", "WARNING")
SAMPLED = dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.95)

NUM_STREAMS = 32
MAX_NEW = 200
# Cancels land in the first LAST_CANCEL tokens, so the survivors still run at the checkpoint after them.
LAST_CANCEL = 50


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    with own_server(tiny_dirs["llama"], "cancellation", tmp_path_factory, *SERVER_ARGS) as proc:
        yield proc


@pytest.fixture(scope="module")
def block_bytes(tiny_dirs) -> int:
    """Bytes of one KV block of the tiny llama: keys and values, every layer, fp32."""
    config = json.loads((tiny_dirs["llama"] / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * BLOCK_SIZE * 4


def idle(before: Scrape, cancelled: int):
    """Ready when `cancelled` more requests ended as cancelled than in `before` and no row holds KV."""
    return lambda s: (s.finished("cancelled") - before.finished("cancelled") >= cancelled
                      and s.running == 0 and s.kv_bytes == 0)


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


def make_requests() -> list[dict]:
    """Varied prompts (4 to 11 tokens); odd streams sample with a seed of their own, even ones are greedy.

    The prompts (240 tokens in all) fit one step's token budget, so every stream starts in the first step
    and makes one token per step: the KV bounds of the checkpoint below are then within a block per survivor."""
    return [dict(input_ids=[(37 * i + 11 * j) % 5000 + 10 for j in range(4 + i % 8)], max_new_tokens=MAX_NEW,
                 ignore_eos=True, **(dict(SAMPLED, seed=i) if i % 2 else {}))
            for i in range(NUM_STREAMS)]


async def _read(client: AsyncClient, request: dict, tokens: list[int], stop_at: int | None = None) -> None:
    """Append the stream's tokens to `tokens`; leave it (closing the call) once `stop_at` have come."""
    async with contextlib.aclosing(client.stream(**request)) as chunks:
        async for chunk in chunks:
            tokens.extend(chunk.token_ids)
            if stop_at is not None and len(tokens) >= stop_at:
                return


async def _cancel_at(task: asyncio.Task, tokens: list[int], point: int) -> None:
    """Cancel `task` from outside once its stream has `point` tokens."""
    while len(tokens) < point and not task.done():
        await asyncio.sleep(0.002)
    task.cancel()


async def _solo(address: str, request: dict) -> list[int]:
    tokens: list[int] = []
    async with AsyncClient(address) as client:
        await _read(client, request, tokens)
    return tokens


def test_cancelling_half_of_32_streams_frees_their_kv_and_leaves_the_rest_unchanged(server, block_bytes):
    url = server.metrics_url
    requests = make_requests()
    rng = random.Random(6)
    cancelled = sorted(rng.sample(range(NUM_STREAMS), NUM_STREAMS // 2))
    points = {i: rng.randint(1, LAST_CANCEL) for i in cancelled}
    survivors = [i for i in range(NUM_STREAMS) if i not in points]
    # Half of the cancelled streams are left by the reader (break + aclose), half cancelled from outside.
    by_reader = set(cancelled[::2])

    async def run() -> tuple[Scrape, Scrape, list[int], list[list[int]]]:
        before = await asyncio.to_thread(Scrape, url)
        tokens: list[list[int]] = [[] for _ in requests]
        async with AsyncClient(server.address) as client:
            tasks = [asyncio.create_task(_read(client, r, tokens[i], points[i] if i in by_reader else None))
                     for i, r in enumerate(requests)]
            killers = [_cancel_at(tasks[i], tokens[i], points[i]) for i in cancelled if i not in by_reader]
            await asyncio.gather(*killers)
            await asyncio.gather(*(tasks[i] for i in cancelled), return_exceptions=True)

            def checkpoint_ready(s: Scrape) -> bool:
                return s.finished("cancelled") - before.finished("cancelled") >= len(cancelled) and s.running == 16

            await asyncio.to_thread(poll, url, checkpoint_ready)
            # What the client holds is at most one step ahead of the gauges of the scrape after it.
            received = [len(tokens[i]) for i in survivors]
            checkpoint = await asyncio.to_thread(Scrape, url)
            assert all(len(tokens[i]) < MAX_NEW for i in survivors), "a survivor ended before the checkpoint"
            await asyncio.gather(*(tasks[i] for i in survivors))
        return before, checkpoint, received, [tokens[i] for i in survivors]

    before, checkpoint, received, together = asyncio.run(run())

    # At the checkpoint, only the 16 survivors hold rows, and the KV store holds their blocks alone: each
    # has computed prompt + generated - 1 tokens, where generated lies between what the client had read
    # before the scrape (minus the step whose gauges may not be set yet) and one token per engine step.
    assert checkpoint.finished("cancelled") - before.finished("cancelled") == len(cancelled)
    assert checkpoint.running == len(survivors)
    used_blocks, remainder = divmod(checkpoint.kv_bytes, block_bytes)
    assert remainder == 0
    steps = checkpoint.steps - before.steps
    prompts = [len(requests[i]["input_ids"]) for i in survivors]
    low = sum(blocks_for(p + max(r - 2, 0)) for p, r in zip(prompts, received))
    high = sum(blocks_for(p + min(steps, MAX_NEW) - 1) for p in prompts)
    assert low <= used_blocks <= high, (low, used_blocks, high)
    assert checkpoint.get("kv_cache_usage_ratio") == pytest.approx(used_blocks * BLOCK_SIZE / KV_TOKENS)

    after = poll(url, idle(before, len(cancelled)))
    assert after.running == 0 and after.kv_bytes == 0
    assert after.finished("cancelled") - before.finished("cancelled") == len(cancelled)
    assert after.finished("length") - before.finished("length") == len(survivors)

    async def solos() -> list[list[int]]:
        return [await _solo(server.address, requests[i]) for i in survivors]

    alone = asyncio.run(solos())
    assert [len(t) for t in together] == [MAX_NEW] * len(survivors)
    assert together == alone


def test_a_passed_deadline_ends_the_stream_with_deadline_exceeded_and_frees_its_rows(server):
    url = server.metrics_url
    before = Scrape(url)
    request = dict(input_ids=list(range(700, 720)), max_new_tokens=400, ignore_eos=True)

    async def run() -> tuple[list[int], float]:
        tokens: list[int] = []
        started = time.monotonic()
        async with AsyncClient(server.address, timeout=0.3) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _read(client, request, tokens)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        return tokens, time.monotonic() - started

    tokens, elapsed = asyncio.run(run())
    assert 0 < len(tokens) < request["max_new_tokens"] and elapsed < 5.0

    # The server sees a passed deadline as a cancelled RPC: it counts it as "cancelled", never as finished.
    after = poll(url, idle(before, 1))
    assert after.running == 0 and after.kv_bytes == 0
    assert after.finished("cancelled") - before.finished("cancelled") == 1
    assert after.get("request_duration_seconds_count") == before.get("request_duration_seconds_count")
    generated = after.get("generated_tokens_total") - before.get("generated_tokens_total")
    assert len(tokens) <= generated < request["max_new_tokens"]


def test_a_client_that_closes_its_channel_mid_stream_frees_its_rows(server):
    url = server.metrics_url
    before = Scrape(url)
    request = dict(input_ids=list(range(800, 815)), max_new_tokens=400, ignore_eos=True, **SAMPLED, seed=5)

    async def run() -> tuple[list[int], BaseException | None]:
        tokens: list[int] = []
        client = AsyncClient(server.address, channel_options=SMALL_WINDOW)  # cannot finish before it is closed
        task = asyncio.create_task(_read(client, request, tokens))
        while len(tokens) < 5:
            assert not task.done(), "the stream ended before the channel was closed"
            await asyncio.sleep(0.002)
        await client.close()
        (outcome,) = await asyncio.gather(task, return_exceptions=True)
        return tokens, outcome

    tokens, outcome = asyncio.run(run())
    # grpc.aio ends a call whose channel closes under it with CancelledError (or a CANCELLED status).
    assert (isinstance(outcome, asyncio.CancelledError)
            or isinstance(outcome, grpc.aio.AioRpcError) and outcome.code() == grpc.StatusCode.CANCELLED), outcome
    assert len(tokens) < request["max_new_tokens"]

    after = poll(url, idle(before, 1))
    assert after.running == 0 and after.kv_bytes == 0
    assert after.finished("cancelled") - before.finished("cancelled") == 1
