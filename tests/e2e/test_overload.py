"""Overload over real gRPC: a burst past the queue cap is refused at once with RESOURCE_EXHAUSTED,
and a KV store too small for what runs preempts and recomputes rather than failing. Every admitted
request completes with exactly the tokens it gets alone: nothing lost, nothing duplicated."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from conftest import own_server
from metrics_scrape import Scrape, poll
from stream_outcome import collect
from tokenloom_client import AsyncClient

MAX_SEQS = 4
QUEUE = 8
BLOCK = 16
KV_TOKENS = 1024  # 64 blocks: the 4 long streams grow to 4 x 30 blocks, so some must be preempted
ARGS = ("--max-num-seqs", str(MAX_SEQS), "--max-queued-requests", str(QUEUE), "--kv-cache-tokens", str(KV_TOKENS),
        "--block-size", str(BLOCK), "--max-num-batched-tokens", "128", "--log-level", "WARNING")

LONG = [dict(input_ids=list(range(30 + 16 * i, 46 + 16 * i)), max_new_tokens=450, ignore_eos=True)
        for i in range(MAX_SEQS)]
BURST = [dict(input_ids=list(range(700 + 5 * i, 712 + 5 * i)), max_new_tokens=40, ignore_eos=True,
              **(dict(do_sample=True, top_k=20, seed=i) if i % 2 else {}))
         for i in range(20)]


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    with own_server(tiny_dirs["llama"], "overload", tmp_path_factory, *ARGS) as proc:
        yield proc


def test_a_burst_past_the_queue_is_refused_at_once_and_every_admitted_request_completes(server):
    async def go():
        async with AsyncClient(server.address) as c:
            alone = [(await collect(c, r)).ids for r in LONG + BURST]
            before = Scrape(server.metrics_url)
            started = [asyncio.Event() for _ in LONG]
            longs = [asyncio.create_task(collect(c, r, s)) for r, s in zip(LONG, started)]
            await asyncio.gather(*(s.wait() for s in started))  # every row is taken
            results = await asyncio.gather(*(collect(c, r) for r in BURST))
            long_results = await asyncio.gather(*longs)
        return alone, before, results, long_results

    alone, before, results, long_results = asyncio.run(go())
    assert all(o.error is None for o in long_results)
    rejected = [i for i, o in enumerate(results) if o.error is not None]
    admitted = [i for i in range(len(BURST)) if i not in rejected]
    assert rejected, "20 requests against 4 busy rows and a queue of 8 must overflow it"
    assert len(admitted) >= QUEUE
    last_rejection = max(results[i].ended_at for i in rejected)
    first_long_end = min(o.ended_at for o in long_results)
    assert last_rejection < first_long_end, "a refusal must not wait for capacity to free up"
    for i in rejected:
        error = results[i].error
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-queued-requests 8" in error.details() and results[i].ids == []
    # Every admitted request, the long ones preempted and recomputed included, gets what it gets alone.
    assert [o.ids for o in long_results] == alone[:MAX_SEQS]
    assert [results[i].ids for i in admitted] == [alone[MAX_SEQS + i] for i in admitted]
    after = poll(server.metrics_url, lambda s: s.idle and s.finished("length") - before.finished("length")
                 >= MAX_SEQS + len(admitted))
    assert after.get("preemptions_total") > before.get("preemptions_total"), "the KV store never ran full"
    assert after.finished("length") - before.finished("length") == MAX_SEQS + len(admitted)
    assert after.finished("RESOURCE_EXHAUSTED") - before.finished("RESOURCE_EXHAUSTED") == len(rejected)
    assert after.get("requests_rejected_total", reason="max_queued_requests") - \
        before.get("requests_rejected_total", reason="max_queued_requests") == len(rejected)
    assert after.idle
