"""Admission over real gRPC: over a limit a request gets RESOURCE_EXHAUSTED at once, naming the limit and
when to retry, while the admitted streams complete token for token as they do alone.

Each limit gets a server of its own (started here with the flags it needs), so other tests see none.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import grpc
import pytest

from held_stream import SMALL_WINDOW
from server_process import ServerProcess
from tokenloom_client import AsyncClient

# The tests name their clients with x-client-id, which the server reads only when told to trust it.
BASE_ARGS = ("--kv-cache-tokens", "8192", "--max-num-batched-tokens", "256", "--log-level", "INFO",
             "--trust-client-id-metadata")
SERVERS = {
    "rate": ("--rate-limit-per-client", "3", "--rate-limit-period", "60"),
    "streams": ("--max-streams-per-client", "2"),
    # One request runs at a time, so the others stay queued (admitted, no first token yet).
    "queue": ("--max-num-seqs", "1", "--max-queued-requests", "4", "--max-queued-prompt-tokens", "120"),
}
PROMPTS = [list(range(300 + 11 * i, 320 + 11 * i)) for i in range(3)]  # 20 tokens each
LONG = dict(max_new_tokens=200, ignore_eos=True)  # ~1 s on a tiny model: long enough to overlap


@pytest.fixture(scope="module")
def servers(tiny_dirs, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs-admission")
    procs = {name: ServerProcess(tiny_dirs["llama"], *BASE_ARGS, *args, log_dir=logs, name=name).start()
             for name, args in SERVERS.items()}
    try:
        for proc in procs.values():
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def client(address: str, client_id: str | None = None) -> AsyncClient:
    # A small window: a stream whose reader waits stays open (its rows pause) however fast the model.
    return AsyncClient(address, metadata={"x-client-id": client_id} if client_id else None,
                       channel_options=SMALL_WINDOW)


async def stream_ids(c: AsyncClient, started: asyncio.Event | None = None, release: asyncio.Event | None = None,
                     **request) -> list[int]:
    """The stream's tokens; after its first chunk it sets `started` and reads on only once `release` is set."""
    ids = []
    async with contextlib.aclosing(c.stream(**request)) as chunks:
        async for chunk in chunks:
            ids += chunk.token_ids
            if started is not None and not started.is_set():
                started.set()
                if release is not None:
                    await release.wait()
    return ids


async def references(address: str, prompts, **params) -> list[list[int]]:
    """Each prompt alone, one at a time, under a client id of its own."""
    async with client(address, "reference") as c:
        return [(await c.generate(input_ids=p, **params)).token_ids for p in prompts]


async def exhausted(coro, flag: str) -> grpc.aio.AioRpcError:
    """`coro` must fail at once with RESOURCE_EXHAUSTED naming `flag`."""
    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    err = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
    assert flag in err.details() and "retry" in err.details(), err.details()
    assert time.monotonic() - start < 1.0, "a rejection must come at once, not after a wait"
    return err


def retry_after(err: grpc.aio.AioRpcError) -> float | None:
    values = [v for k, v in (err.trailing_metadata() or ()) if k == "retry-after-seconds"]
    return float(values[0]) if values else None


def request_log(server: ServerProcess) -> list[dict[str, str]]:
    lines = [line.split("tokenloom.requests: ", 1)[1] for line in server.log_tail(10**7).splitlines()
             if "tokenloom.requests: " in line]
    return [dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)) for line in lines]


# -- per-client rate limit ----------------------------------------------------------------------------


def test_over_rate_client_is_rejected_while_its_admitted_streams_complete_unchanged(servers):
    address = servers["rate"].address

    async def go():
        ref = await references(address, PROMPTS, **LONG)
        async with client(address, "burst") as burst, client(address, "other") as other:
            started = [asyncio.Event() for _ in PROMPTS]
            streams = [asyncio.create_task(stream_ids(burst, s, input_ids=p, **LONG))
                       for s, p in zip(started, PROMPTS)]
            await asyncio.gather(*(s.wait() for s in started))
            errors = [await exhausted(burst.generate(input_ids=PROMPTS[0], max_new_tokens=4), "--rate-limit-per-client")
                      for _ in range(2)]
            errors.append(await exhausted(stream_ids(burst, input_ids=PROMPTS[1], max_new_tokens=4),
                                          "--rate-limit-per-client"))
            still_streaming = not any(s.done() for s in streams)
            other_ids = (await other.generate(input_ids=PROMPTS[2], **LONG)).token_ids
            got = await asyncio.gather(*streams)
        return ref, got, errors, still_streaming, other_ids

    ref, got, errors, still_streaming, other_ids = asyncio.run(go())
    assert still_streaming, "the rejections should have come while the admitted streams ran"
    assert got == ref, "admitted streams changed next to the rejected requests"
    assert other_ids == ref[2], "another client must have a rate window of its own"
    for err in errors:
        assert "client 'burst'" in err.details()
        assert 0 < retry_after(err) <= 60
        assert f"retry in {retry_after(err):.3f} s" in err.details()


def test_every_finished_request_logs_one_line_with_its_outcome(servers):
    # Runs after the rate test on the same server: 3 streams of "burst" ended at their length,
    # 3 were rejected; the log line names the limit.
    server = servers["rate"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        burst = [r for r in request_log(server) if r["client"] == "burst"]
        if len(burst) >= 6:
            break
        time.sleep(0.05)
    finished = [r for r in burst if r["outcome"] == "length"]
    rejected = [r for r in burst if r["outcome"] == "RESOURCE_EXHAUSTED"]
    assert len(burst) == 6 and len(finished) == 3 and len(rejected) == 3, burst
    for r in finished:
        assert r["method"] == "Generate" and r["prompt_tokens"] == "20" and r["generated_tokens"] == "200"
        assert 0 <= float(r["ttft_s"]) <= float(r["duration_s"])
        assert re.fullmatch(r"[0-9a-f]{32}", r["request_id"])
    for r in rejected:
        assert r["limit"] == "rate_limit_per_client" and r["ttft_s"] == "-" and r["generated_tokens"] == "0"
    assert {r["method"] for r in rejected} == {"Generate", "GenerateUnary"}


# -- concurrent streams per client ----------------------------------------------------------------------


def test_stream_cap_rejects_one_client_over_it_and_not_another(servers):
    address = servers["streams"].address

    async def go():
        ref = await references(address, PROMPTS[:2], **LONG)
        async with client(address, "a") as a, client(address, "b") as b:
            started, release = [asyncio.Event(), asyncio.Event()], asyncio.Event()
            a_streams = [asyncio.create_task(stream_ids(a, s, release, input_ids=p, **LONG))
                         for s, p in zip(started, PROMPTS)]
            await asyncio.gather(*(s.wait() for s in started))
            err = await exhausted(a.generate(input_ids=PROMPTS[2], max_new_tokens=4), "--max-streams-per-client 2")
            release.set()
            b_streams = [asyncio.create_task(stream_ids(b, input_ids=p, **LONG)) for p in PROMPTS[:2]]
            got_a, got_b = await asyncio.gather(*a_streams), await asyncio.gather(*b_streams)
            again = (await a.generate(input_ids=PROMPTS[0], max_new_tokens=4)).token_ids  # released on finish
        return ref, got_a, got_b, err, again

    ref, got_a, got_b, err, again = asyncio.run(go())
    assert got_a == ref and got_b == ref
    assert "client 'a'" in err.details() and retry_after(err) is None
    assert again == ref[0][:4]


def test_a_cancelled_stream_frees_its_place(servers):
    address = servers["streams"].address

    async def go():
        ref = await references(address, PROMPTS[:1], **LONG)
        async with client(address, "c") as c:
            started, release = [asyncio.Event(), asyncio.Event()], asyncio.Event()
            streams = [asyncio.create_task(stream_ids(c, s, release, input_ids=PROMPTS[0], **LONG)) for s in started]
            await asyncio.gather(*(s.wait() for s in started))
            await exhausted(c.generate(input_ids=PROMPTS[1], max_new_tokens=4), "--max-streams-per-client")
            streams[0].cancel()
            deadline = time.monotonic() + 3
            while True:  # the server learns of the cancel asynchronously
                try:
                    admitted = await c.generate(input_ids=PROMPTS[1], max_new_tokens=4)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.02)
            release.set()
            survivor = await streams[1]
        return ref, admitted, survivor

    ref, admitted, survivor = asyncio.run(go())
    assert len(admitted.token_ids) == 4
    assert survivor == ref[0]


def test_without_metadata_the_peer_host_is_the_client(servers):
    address = servers["streams"].address

    async def go():
        async with client(address) as c1, client(address) as c2, client(address) as c3:  # three channels
            started, release = [asyncio.Event(), asyncio.Event()], asyncio.Event()
            streams = [asyncio.create_task(stream_ids(c, s, release, input_ids=PROMPTS[0], **LONG))
                       for c, s in zip((c1, c2), started)]
            await asyncio.gather(*(s.wait() for s in started))
            err = await exhausted(c3.generate(input_ids=PROMPTS[0], max_new_tokens=4), "--max-streams-per-client")
            release.set()
            await asyncio.gather(*streams)
        return err

    assert "client 'loopback'" in asyncio.run(go()).details()  # 127.0.0.1 and ::1 alike


# -- global queue caps ----------------------------------------------------------------------------------


async def flood(address: str, prompts: list[list[int]], **params):
    """Send every request at once; return (ids or error, completion time) per request, in order."""

    async def one(c, i, prompt):
        try:
            result = (await c.generate(input_ids=prompt, request_id=f"flood-{i}", **params)).token_ids
        except grpc.aio.AioRpcError as exc:
            result = exc
        return result, time.monotonic()

    async with client(address, "flood") as c:
        return await asyncio.gather(*(one(c, i, p) for i, p in enumerate(prompts)))


def test_queued_requests_cap_rejects_the_excess_at_once_and_every_admitted_one_completes(servers):
    address = servers["queue"].address
    params = dict(max_new_tokens=120, ignore_eos=True)
    ref = asyncio.run(references(address, PROMPTS, **params))
    prompts = [PROMPTS[i % 3] for i in range(12)]
    results = asyncio.run(flood(address, prompts, **params))
    admitted = [(i, r, t) for i, (r, t) in enumerate(results) if not isinstance(r, Exception)]
    rejected = [(r, t) for r, t in results if isinstance(r, Exception)]
    # 4 queued at most; one more if the first had its first token before the flood was in.
    assert 4 <= len(admitted) <= 5, [type(r).__name__ for r, _ in results]
    for i, ids, _ in admitted:
        assert ids == ref[i % 3], f"admitted request {i} changed"
    for err, _ in rejected:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert "--max-queued-requests 4" in err.details() and "retry in about" in err.details()
        assert retry_after(err) > 0
    assert max(t for _, t in rejected) < min(t for _, _, t in admitted), "rejections must not wait in the queue"


def test_queued_prompt_tokens_cap(servers):
    address = servers["queue"].address
    params = dict(max_new_tokens=120, ignore_eos=True)
    prompts = [list(range(1000 + i, 1050 + i)) for i in range(8)]  # 50 tokens: the cap of 120 holds two
    results = asyncio.run(flood(address, prompts, **params))
    admitted = [r for r, _ in results if not isinstance(r, Exception)]
    rejected = [r for r, _ in results if isinstance(r, Exception)]
    assert 2 <= len(admitted) <= 3 and all(len(ids) == 120 for ids in admitted)
    for err in rejected:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-queued-prompt-tokens 120" in err.details(), err.details()
