"""The admission queue over real gRPC: caps derived from the engine's size when no flag sets them, a
request that waits too long for its first token ended with RESOURCE_EXHAUSTED and a retry hint (and
gone from the engine), and rejection messages that say how long the queue would take.

Each test starts its own server: the limits under test are server flags.
"""

from __future__ import annotations

import asyncio
import re
import time

import grpc

from conftest import own_server
from metrics_scrape import Scrape, poll
from stream_outcome import collect
from tokenloom_client import AsyncClient

ARGS = ("--log-level", "INFO")
LONG = dict(max_new_tokens=480, ignore_eos=True)  # ~1 s alone on a tiny model, one row at a time


def retry_after(err: grpc.aio.AioRpcError) -> float | None:
    values = [v for k, v in (err.trailing_metadata() or ()) if k == "retry-after-seconds"]
    return float(values[0]) if values else None


def request_log(server) -> list[dict[str, str]]:
    lines = [line.split("tokenloom.requests: ", 1)[1] for line in server.log_tail(10**7).splitlines()
             if "tokenloom.requests: " in line]
    return [dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)) for line in lines]


async def flood(address: str, prompts: list[list[int]], **params) -> list[list[int] | grpc.aio.AioRpcError]:
    async def one(c, prompt):
        try:
            return (await c.generate(input_ids=prompt, **params)).token_ids
        except grpc.aio.AioRpcError as exc:
            return exc

    async with AsyncClient(address) as c:
        return await asyncio.gather(*(one(c, p) for p in prompts))


def test_default_queue_caps_come_from_max_num_seqs_and_the_kv_store(tiny_dirs, tmp_path_factory):
    # No queue flag: 4 x --max-num-seqs 2 = 8 queued requests, and the KV store's 2048 prompt tokens.
    with own_server(tiny_dirs["llama"], "derived-caps", tmp_path_factory, *ARGS,
                    "--max-num-seqs", "2", "--kv-cache-tokens", "2048") as server:
        short = [list(range(300 + 3 * i, 320 + 3 * i)) for i in range(24)]  # 20 tokens: the count cap binds
        results = asyncio.run(flood(server.address, short, max_new_tokens=100, ignore_eos=True))
        admitted = [r for r in results if not isinstance(r, Exception)]
        rejected = [r for r in results if isinstance(r, Exception)]
        # 8 queued, plus up to 2 running (and a few more if some started while the flood came in).
        assert 8 <= len(admitted) <= 14 and rejected, [type(r).__name__ for r in results]
        for err in rejected:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            assert "--max-queued-requests 8" in err.details(), err.details()
            assert retry_after(err) > 0

        long = [list(range(1000 + i, 1400 + i)) for i in range(10)]  # 400 tokens: the token cap binds
        results = asyncio.run(flood(server.address, long, max_new_tokens=100, ignore_eos=True))
        rejected = [r for r in results if isinstance(r, Exception)]
        assert rejected and len(rejected) < len(long), [type(r).__name__ for r in results]
        for err in rejected:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-queued-prompt-tokens 2048" in err.details(), err.details()


def test_a_request_waiting_past_max_queue_wait_is_told_to_retry_and_leaves_the_engine(tiny_dirs, tmp_path_factory):
    with own_server(tiny_dirs["llama"], "queue-wait", tmp_path_factory, *ARGS,
                    "--max-num-seqs", "1", "--max-queue-wait", "0.3") as server:
        waiting = [list(range(500 + 7 * i, 520 + 7 * i)) for i in range(3)]

        async def go():
            async with AsyncClient(server.address) as c:
                alone = (await collect(c, dict(input_ids=list(range(40, 60)), **LONG))).ids
                started = asyncio.Event()
                blocker = asyncio.create_task(collect(c, dict(input_ids=list(range(40, 60)), **LONG), started))
                await started.wait()  # it holds the one row for ~1 s more

                async def queued(prompt):
                    sent = time.monotonic()
                    try:
                        await c.generate(input_ids=prompt, max_new_tokens=8)
                    except grpc.aio.AioRpcError as exc:
                        return exc, time.monotonic() - sent, blocker.done()
                    return None, time.monotonic() - sent, blocker.done()

                ends = await asyncio.gather(*(queued(p) for p in waiting))
                # Nothing of them is left in the engine: no waiting request while the blocker still runs.
                emptied = poll(server.metrics_url, lambda s: s.get("waiting_requests") == 0)
                return alone, ends, emptied, await blocker

        alone, ends, emptied, done = asyncio.run(go())
        assert not any(blocker_done for _, _, blocker_done in ends), \
            "the test needs the queued requests to end while the blocker holds the row"
        for err, waited, _ in ends:
            assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            assert "--max-queue-wait 0.3" in err.details() and "without starting" in err.details(), err.details()
            assert "retry in about" in err.details() and retry_after(err) > 0
            assert 0.29 <= waited < 1.5, waited
        assert emptied.get("waiting_requests") == 0
        assert done.error is None and done.ids == alone, "the running request must not notice"
        after = poll(server.metrics_url, lambda s: s.idle)
        assert after.idle, "a queue-wait rejection left sequences or KV blocks behind"
        assert after.get("requests_rejected_total", reason="max_queue_wait") == len(waiting)
        deadline = time.monotonic() + 5
        while len(lines := [r for r in request_log(server) if r.get("limit") == "max_queue_wait"]) < len(waiting):
            assert time.monotonic() < deadline, request_log(server)
            time.sleep(0.05)
        assert all(r["outcome"] == "RESOURCE_EXHAUSTED" and r["generated_tokens"] == "0" for r in lines)


def test_a_queue_full_rejection_estimates_the_wait_from_how_fast_requests_start(tiny_dirs, tmp_path_factory):
    with own_server(tiny_dirs["llama"], "queue-estimate", tmp_path_factory, *ARGS,
                    "--max-num-seqs", "1", "--max-queued-requests", "2") as server:
        prompts = [list(range(600 + 5 * i, 620 + 5 * i)) for i in range(3)]

        async def go():
            async with AsyncClient(server.address) as c:
                # A few requests start one after another, so the server has seen the queue move.
                for p in prompts:
                    await c.generate(input_ids=p, max_new_tokens=120, ignore_eos=True)
                results = await asyncio.gather(
                    *(collect(c, dict(input_ids=prompts[i % 3], max_new_tokens=200, ignore_eos=True))
                      for i in range(6)))
                return results

        results = asyncio.run(go())
        rejected = [o.error for o in results if o.error is not None]
        assert rejected, "6 requests against one row and a queue of 2 must overflow it"
        for err in rejected:
            details = err.details()
            assert "--max-queued-requests 2" in details, details
            match = re.search(r"one starts every ([0-9.]+) s, so a request behind them would wait about ([0-9.]+) s",
                              details)
            assert match, details
            per_start, wait = float(match.group(1)), float(match.group(2))
            assert 0 < per_start and wait >= per_start
            assert abs(retry_after(err) - per_start) < 0.0015, (retry_after(err), details)
        assert Scrape(server.metrics_url).get("requests_rejected_total", reason="max_queued_requests") == len(rejected)
