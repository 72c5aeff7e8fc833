"""Faults inside the engine, injected with the test-only `--inject-fault` flag and aimed at one
request by its seed: a request whose own sampling raises fails alone with INTERNAL while the
streams beside it go on token for token; an engine thread that dies ends every open stream with
an error (none hangs), turns health NOT_SERVING and refuses new requests with UNAVAILABLE."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import own_server
from held_stream import SMALL_WINDOW
from metrics_scrape import Scrape, poll
from stream_outcome import collect
from tokenloom_client import AsyncClient

SAMPLE_ERROR_SEED = 666
ENGINE_DEATH_SEED = 13
SERVICE = "tokenloom.v1.Generation"

# Greedy and seeded sampled neighbours: their tokens do not depend on who shares the batch.
NEIGHBOURS = [dict(input_ids=list(range(100 + 7 * i, 109 + 7 * i)), max_new_tokens=60, ignore_eos=True,
                   **(dict(do_sample=True, temperature=0.8, top_k=50, seed=i) if i % 2 else {}))
              for i in range(8)]
VICTIM = dict(input_ids=[5, 6, 7, 8, 9], max_new_tokens=60, ignore_eos=True, do_sample=True, seed=SAMPLE_ERROR_SEED)


@pytest.fixture(scope="module")
def sample_fault_server(tiny_dirs, tmp_path_factory):
    args = ("--inject-fault", f"sample-error={SAMPLE_ERROR_SEED}", "--log-level", "WARNING")
    with own_server(tiny_dirs["llama"], "fault-sample", tmp_path_factory, *args) as proc:
        yield proc


def test_a_fault_in_one_requests_sampling_fails_only_that_request(sample_fault_server):
    server = sample_fault_server

    async def go():
        async with AsyncClient(server.address) as c:
            alone = [(await collect(c, r)).ids for r in NEIGHBOURS]
            together = await asyncio.gather(*(collect(c, r) for r in [*NEIGHBOURS[:4], VICTIM, *NEIGHBOURS[4:]]))
            after = await collect(c, NEIGHBOURS[0])
        return alone, list(together), after

    before = Scrape(server.metrics_url)
    alone, together, after = asyncio.run(go())
    victim = together.pop(4)
    assert victim.error is not None and victim.error.code() == grpc.StatusCode.INTERNAL
    assert "injected fault in the sampling" in victim.error.details(), victim.error.details()
    assert len(victim.ids) == 2, "the fault is injected once two tokens were streamed"
    assert all(o.error is None for o in [*together, after])
    assert [o.ids for o in together] == alone, "neighbours must not notice the fault"
    assert after.ids == alone[0], "the engine keeps serving afterwards"
    scrape = poll(server.metrics_url, lambda s: s.idle and s.finished("INTERNAL") > before.finished("INTERNAL"))
    assert scrape.finished("INTERNAL") - before.finished("INTERNAL") == 1
    assert scrape.idle, "the failed request's rows and blocks are freed"
    assert server.proc.poll() is None


def test_engine_death_ends_open_streams_with_an_error_and_turns_health_not_serving(tiny_dirs, tmp_path_factory):
    args = ("--inject-fault", f"engine-death={ENGINE_DEATH_SEED}", "--log-level", "WARNING")
    long = [dict(input_ids=list(range(50 + 9 * i, 60 + 9 * i)), max_new_tokens=400, ignore_eos=True)
            for i in range(4)]

    async def go(address):
        # The long streams stop reading after their first token until the engine has died, on a small
        # window: they are still open then, however fast the model.
        async with AsyncClient(address, channel_options=SMALL_WINDOW) as c, \
                grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            started, release = [asyncio.Event() for _ in long], asyncio.Event()
            streams = [asyncio.create_task(collect(c, r, s, release)) for r, s in zip(long, started)]
            await asyncio.gather(*(s.wait() for s in started))
            killer = await collect(c, dict(input_ids=[1, 2, 3], do_sample=True, seed=ENGINE_DEATH_SEED))
            release.set()
            # Every open stream ends (a hang would trip the timeout) and with an error.
            ended = await asyncio.wait_for(asyncio.gather(*streams), timeout=60)
            assert (await asyncio.wait_for(watch.read(), timeout=30)).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            check = await health.Check(health_pb2.HealthCheckRequest(service=""))
            refused = await collect(c, long[0])
        return killer, ended, check.status, refused

    with own_server(tiny_dirs["qwen2"], "fault-death", tmp_path_factory, *args) as server:
        killer, ended, status, refused = asyncio.run(go(server.address))
        log = server.log_tail(10**6)
        assert server.proc.poll() is None, "the process stays up so that its health can be read"
    assert killer.error is not None and killer.error.code() == grpc.StatusCode.INTERNAL
    assert "engine failed" in killer.error.details() and "injected engine death" in killer.error.details()
    for stream in ended:
        assert stream.error is not None and stream.error.code() == grpc.StatusCode.INTERNAL, stream.error
        assert "engine failed" in stream.error.details()
        assert 0 < len(stream.ids) < 400
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert refused.error is not None and refused.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "engine is not running" in refused.error.details()
    assert "the engine thread died" in log
