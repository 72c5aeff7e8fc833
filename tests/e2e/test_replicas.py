"""Three replicas behind one SDK client: gRPC's round_robin spreads the calls, a replica killed with
SIGKILL mid-run costs no request (their streams resume elsewhere, token for token), and a draining
replica gets no new calls while its open streams finish."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import SERVER_ARGS
from metrics_scrape import Scrape
from server_process import ServerProcess
from tokenloom_client import AsyncClient, Client

N_REQUESTS = 60


def _requests() -> list[dict]:
    rng = random.Random(3)
    out = []
    for i in range(N_REQUESTS):
        kind = ("greedy", "sampled", "samples", "top_n")[i % 4]
        params = dict(input_ids=[rng.randrange(200, 40000) for _ in range(rng.randint(4, 40))],
                      max_new_tokens=rng.randint(24, 48), ignore_eos=True, request_id=f"r{i}")
        if kind in ("sampled", "samples"):
            # Not the whole vocabulary of a random model: over 49152 near-equal probabilities, a resumed
            # row's logits (recomputed by a prefill, not by decode steps) can round one draw across a
            # token boundary (docs/api.md#seeds); a top-k window keeps the draws far from that.
            params.update(do_sample=True, temperature=1.2, top_k=8, seed=1000 + i)
        if kind == "samples":
            params.update(num_return_sequences=2)
        if kind == "top_n":
            params.update(top_n=3, no_repeat_ngram_size=2)
        out.append(params)
    return out


def _key(result) -> list:
    """What a user compares: every returned sequence's tokens and text, and the finish reason."""
    return [(list(h.token_ids), h.text, h.finish_reason) for h in result["hypotheses"]] + [result["streamed"]]


async def _collect(client: AsyncClient, params: dict, progress: list[int]) -> dict:
    """Stream one request, keeping per index the tokens and text deltas as the caller sees them."""
    tokens: dict[int, list[int]] = {}
    text: dict[int, str] = {}
    last = None
    async for chunk in client.stream(**params):
        if not chunk.provisional:
            tokens.setdefault(chunk.index, []).extend(chunk.token_ids)
            text[chunk.index] = text.get(chunk.index, "") + chunk.text
            progress[0] += len(chunk.token_ids)
        last = chunk
    hypotheses = last.hypotheses
    streamed = [(tokens.get(i, []), text.get(i, "")) for i in range(len(hypotheses))]
    assert [t for t, _ in streamed] == [h.token_ids for h in hypotheses]  # the stream adds up to the result
    assert [s for _, s in streamed] == [h.text for h in hypotheses]
    return {"hypotheses": hypotheses, "streamed": streamed, "usage": last.usage}


@pytest.fixture(scope="module")
def replicas(tiny_dirs, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs-replicas")
    servers = [ServerProcess(tiny_dirs["llama"], *SERVER_ARGS, "--log-level", "INFO", "--grace-seconds", "60",
                             log_dir=logs, name=f"replica{i}").start() for i in range(3)]
    try:
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def reference(replicas) -> list[dict]:
    """Each request alone, on one replica: what an uninterrupted stream returns."""
    async def run():
        async with AsyncClient(replicas[0].address, timeout=120) as client:
            return [await _collect(client, p, [0]) for p in _requests()]
    return asyncio.run(run())


def _finished_by_replica(replicas) -> list[float]:
    return [Scrape(s.metrics_url).get("requests_finished_total", front="grpc") for s in replicas]


async def _run_all(targets: list[str], on_progress=None, concurrency: int = 12):
    requests = _requests()
    progress = [0]
    results: list[dict | None] = [None] * len(requests)
    async with AsyncClient(targets, timeout=300) as client:
        queue = iter(range(len(requests)))

        async def worker():
            for i in queue:
                results[i] = await _collect(client, requests[i], progress)

        watcher = asyncio.ensure_future(on_progress(progress)) if on_progress else None
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        if watcher:
            await watcher
        return results, client.failover


def test_round_robin_spreads_the_calls_and_outputs_equal_one_replica(replicas, reference):
    before = _finished_by_replica(replicas)
    results, stats = asyncio.run(_run_all([s.address for s in replicas]))
    per_replica = [a - b for a, b in zip(_finished_by_replica(replicas), before)]
    assert sum(per_replica) == N_REQUESTS and min(per_replica) >= 10, per_replica
    assert stats.resumed_streams == 0
    for got, want in zip(results, reference):
        assert _key(got) == _key(want)


def test_a_replica_killed_mid_run_costs_no_request_and_no_token(replicas, reference, capsys):
    alive = [s for s in replicas if s.proc.poll() is None]
    victim = random.Random(7).choice(alive)
    expected = sum(len(h.token_ids) for r in reference for h in r["hypotheses"])
    kill_at = int(expected * random.Random(8).uniform(0.25, 0.6))
    killed = {}

    async def killer(progress):
        while progress[0] < kill_at:
            await asyncio.sleep(0.005)
        victim.proc.send_signal(signal.SIGKILL)
        killed["at_tokens"] = progress[0]

    started = time.monotonic()
    results, stats = asyncio.run(_run_all([s.address for s in alive], on_progress=killer))
    elapsed = time.monotonic() - started
    assert victim.proc.wait(10) == -signal.SIGKILL and killed
    for got, want in zip(results, reference):
        assert _key(got) == _key(want)
    assert stats.resumed_streams >= 1  # the victim had streams open when it died
    resumes = sorted(stats.resume_seconds)
    with capsys.disabled():
        print(f"\nfailover: killed a replica after {killed['at_tokens']} of {expected} tokens; "
              f"{stats.resumed_streams} streams resumed ({stats.resumes} calls), {stats.resent_tokens} tokens re-sent, "
              f"resume latency "
              f"median {resumes[len(resumes) // 2] * 1000:.0f} ms, max {resumes[-1] * 1000:.0f} ms; "
              f"{N_REQUESTS} requests in {elapsed:.1f} s")


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="tokenloom.v1.Generation"), timeout=2).status
        except grpc.RpcError:
            return health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_draining_replica_gets_no_new_calls_and_finishes_its_streams(replicas):
    alive = [s for s in replicas if s.proc.poll() is None]
    assert len(alive) >= 2
    draining = alive[0]
    targets = [s.address for s in alive]

    async def run():
        async with AsyncClient(targets, timeout=120) as client:
            # Until every replica has taken a call: a new channel picks only the replicas it has connected to.
            served = _finished_by_replica(alive)
            while any(a <= b for a, b in zip(_finished_by_replica(alive), served)):
                await client.generate(input_ids=[1, 2, 3], max_new_tokens=1)
            params = dict(input_ids=list(range(500, 520)), max_new_tokens=400, ignore_eos=True)
            before = [asyncio.ensure_future(_collect(client, {**params, "request_id": f"before{i}"}, [0]))
                      for i in range(4 * len(alive))]
            while Scrape(draining.metrics_url).running < 1:  # the replica to drain has streams open
                for f in before:
                    assert not f.done() or f.result() is None, "the streams ended before the drain began"
                await asyncio.sleep(0.01)
            draining.proc.send_signal(signal.SIGTERM)
            while await asyncio.to_thread(_health, draining.address) == health_pb2.HealthCheckResponse.SERVING:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # the client's health watch hears of it
            after = [await _collect(client, {**params, "max_new_tokens": 4, "request_id": f"after{i}"}, [0])
                     for i in range(8)]
            return await asyncio.gather(*before), after, client.failover

    before, after, stats = asyncio.run(run())
    assert all(len(r["hypotheses"][0].token_ids) == 400 for r in before)
    assert all(len(r["hypotheses"][0].token_ids) == 4 for r in after)
    # The draining replica's streams finished there (a slow machine's 400 tokens fit the 60 s grace).
    assert stats.resumed_streams == 0, f"{stats}\n{draining.log_tail()}"
    assert draining.proc.wait(30) == 0
    log = draining.log_path.read_text()
    assert re.search(r"request_id=before\d+ .*outcome=length", log)  # it served streams to their end
    assert "request_id=after" not in log  # and took no new call


def test_a_long_lived_client_reconnects_after_the_connection_age_and_its_stream_runs_to_its_end(tiny_dirs, tmp_path):
    """--max-connection-age: the server asks an old connection to go (GOAWAY), the client reconnects
    (re-resolving its target: the way a long-lived client reaches replicas added since), and the
    stream open on the old connection is not cut."""
    server = ServerProcess(tiny_dirs["llama"], *SERVER_ARGS, "--max-connection-age", "1", log_dir=tmp_path,
                           name="aged").start()
    try:
        server.wait_ready()
        states: list[grpc.ChannelConnectivity] = []
        with Client(server.address, timeout=60) as client:
            client._channel.subscribe(states.append)
            client.generate(input_ids=[1, 2, 3], max_new_tokens=1)
            deadline = time.monotonic() + 5
            while states[-1:] != [grpc.ChannelConnectivity.READY]:  # callbacks come on gRPC's own thread
                assert time.monotonic() < deadline, states
                time.sleep(0.01)
            connected = len(states)
            tokens = []
            started = time.monotonic()
            for chunk in client.stream(input_ids=list(range(600, 620)), max_new_tokens=300, ignore_eos=True):
                tokens += chunk.token_ids
                time.sleep(0.01)  # a stream that outlives the connection's age (2 s and more)
            assert time.monotonic() - started > 2
            assert len(tokens) == 300 and chunk.finish_reason == "length"
            assert client.generate(input_ids=[1, 2, 3], max_new_tokens=1).token_ids
        later = states[connected:]
        assert any(s != grpc.ChannelConnectivity.READY for s in later), later  # it left the first connection
        assert grpc.ChannelConnectivity.READY in later  # and connected again
    finally:
        server.stop()
