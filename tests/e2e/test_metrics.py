"""Prometheus metrics read over HTTP match the traffic a client sent, request for request and token for token."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from held_stream import SMALL_WINDOW
from metrics_scrape import PREFIX, Scrape
from tokenloom_client import AsyncClient


# (request, new tokens per sequence, sequences): ignore_eos makes every length exact.
COMPLETE = [
    (dict(input_ids=list(range(100, 105)), max_new_tokens=6, ignore_eos=True), 6, 1),
    (dict(input_ids=list(range(200, 212)), max_new_tokens=9, ignore_eos=True), 9, 1),
    (dict(input_ids=list(range(300, 320)), max_new_tokens=4, ignore_eos=True, do_sample=True, seed=1), 4, 1),
    (dict(input_ids=list(range(400, 407)), max_new_tokens=5, ignore_eos=True, do_sample=True, seed=2,
          num_return_sequences=2), 5, 2),
]
UNARY = (dict(input_ids=list(range(500, 508)), max_new_tokens=7, ignore_eos=True), 7, 1)
INVALID = [
    dict(input_ids=[1, 2, 3], top_p=0.0),
    dict(input_ids=[1, 2, 3], do_sample=True, temperature=-1.0),
    dict(input_ids=[10] * 600),  # the tiny models' context is 512
]
CANCELLED = [dict(input_ids=list(range(600 + 10 * i, 610 + 10 * i)), max_new_tokens=400, ignore_eos=True)
             for i in range(3)]
CHUNKS_BEFORE_CANCEL = 3


def delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


def settled(url: str, before: Scrape, finished: int, timeout: float = 15.0) -> Scrape:
    """The first scrape that counts `finished` more requests than `before` and shows an idle engine.

    Outcomes of cancelled streams reach the counter when the server notices the cancel, which
    may come after the client has moved on."""
    deadline = time.monotonic() + timeout
    while True:
        after = Scrape(url)
        done = sum(after.outcomes().values()) - sum(before.outcomes().values())
        idle = after.get("running_sequences") == 0 and after.get("kv_cache_used_bytes") == 0
        if (done >= finished and idle) or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


async def _stream(client: AsyncClient, request: dict) -> tuple[int, int]:
    """(tokens received, usage.generated_tokens) of one whole stream."""
    received, usage = 0, None
    async for chunk in client.stream(**request):
        received += len(chunk.token_ids)
        usage = chunk.usage or usage
    return received, usage.generated_tokens


async def _unary(client: AsyncClient, request: dict) -> tuple[int, int]:
    result = await client.generate(**request)
    return len(result.token_ids), result.usage.generated_tokens


async def _invalid(client: AsyncClient, request: dict) -> grpc.StatusCode:
    try:
        await client.generate(**request)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _cancelled(client: AsyncClient, request: dict) -> int:
    """Read a few chunks, then leave: the server sees a cancelled RPC."""
    received = 0
    async with contextlib.aclosing(client.stream(**request)) as chunks:
        async for chunk in chunks:
            received += len(chunk.token_ids)
            if received >= CHUNKS_BEFORE_CANCEL:
                break
    return received


async def complete_and_invalid(address: str):
    async with AsyncClient(address) as client:
        return await asyncio.gather(
            *(_stream(client, r) for r, _, _ in COMPLETE), _unary(client, UNARY[0]),
            *(_invalid(client, r) for r in INVALID),
        )


async def cancelled(address: str) -> list[int]:
    # A small window: the server cannot finish a stream before the client has read its first chunks.
    async with AsyncClient(address, channel_options=SMALL_WINDOW) as client:
        return await asyncio.gather(*(_cancelled(client, r) for r in CANCELLED))


def test_counters_and_histograms_match_completed_and_invalid_requests(metrics_server):
    url = metrics_server.metrics_url
    before = Scrape(url)
    results = asyncio.run(complete_and_invalid(metrics_server.address))
    finished = [*COMPLETE, UNARY]
    answers, codes = results[: len(finished)], results[len(finished):]
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * len(INVALID)
    after = settled(url, before, len(finished) + len(INVALID))

    outcomes = {k: v - before.outcomes().get(k, 0.0) for k, v in after.outcomes().items()}
    assert {k: v for k, v in outcomes.items() if v} == {"length": len(finished), "INVALID_ARGUMENT": len(INVALID)}

    # The unary answer holds sample 0 only; usage counts every sample.
    received = sum(r for r, _ in answers[:-1]) + answers[-1][1]
    assert received == sum(u for _, u in answers) == sum(n * seqs for _, n, seqs in finished)
    assert delta(after, before, "generated_tokens_total") == received
    prompt_tokens = sum(len(r["input_ids"]) for r, _, _ in finished)
    assert delta(after, before, "prompt_tokens_total") == prompt_tokens

    for name in ("time_to_first_token_seconds", "request_duration_seconds", "queue_wait_seconds"):
        assert delta(after, before, f"{name}_count") == len(finished), name
    # One gap per engine step after the first that gave output; a request's samples share a step.
    assert delta(after, before, "inter_token_latency_seconds_count") == sum(n - 1 for _, n, _ in finished)
    ttft = delta(after, before, "time_to_first_token_seconds_sum")
    assert 0 < ttft < delta(after, before, "request_duration_seconds_sum")

    # Every prompt is prefilled once (one chunk: prompts are shorter than the token budget) and every
    # generated token but each sequence's last is fed back once, one row per sequence per step.
    fed_back = sum(seqs * (n - 1) for _, n, seqs in finished)
    assert delta(after, before, "step_tokens_sum") == prompt_tokens + fed_back
    assert delta(after, before, "step_rows_sum") == len(finished) + fed_back
    steps = delta(after, before, "step_duration_seconds_count")
    assert steps == delta(after, before, "step_rows_count") == delta(after, before, "step_tokens_count")
    assert max(n for _, n, _ in finished) <= steps <= delta(after, before, "step_rows_sum")

    assert after.get("waiting_requests") == 0
    assert after.get("kv_cache_usage_ratio") == 0
    assert delta(after, before, "preemptions_total") == 0


def test_cancelled_streams_count_as_cancelled_and_free_their_kv(metrics_server):
    url = metrics_server.metrics_url
    before = Scrape(url)
    received = asyncio.run(cancelled(metrics_server.address))
    after = settled(url, before, len(CANCELLED))

    outcomes = {k: v - before.outcomes().get(k, 0.0) for k, v in after.outcomes().items()}
    assert {k: v for k, v in outcomes.items() if v} == {"cancelled": len(CANCELLED)}
    assert after.get("running_sequences") == 0 and after.get("kv_cache_used_bytes") == 0
    assert delta(after, before, "prompt_tokens_total") == sum(len(r["input_ids"]) for r in CANCELLED)
    # The server may have made a few tokens the client never read before it saw the cancel.
    generated = delta(after, before, "generated_tokens_total")
    assert sum(received) <= generated < sum(r["max_new_tokens"] for r in CANCELLED)
    assert delta(after, before, "time_to_first_token_seconds_count") == len(CANCELLED)
    assert delta(after, before, "request_duration_seconds_count") == 0  # the engine never ended them


def test_metric_names_follow_prometheus_conventions(metrics_server):
    text = urllib.request.urlopen(metrics_server.metrics_url, timeout=5).read().decode()
    families = list(text_string_to_metric_families(text))
    ours = {f.name: f for f in families if f.name.startswith(PREFIX)}
    assert {"tokenloom_requests_finished", "tokenloom_generated_tokens", "tokenloom_kv_cache_usage_ratio",
            "tokenloom_time_to_first_token_seconds"} <= set(ours)
    for family in ours.values():
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        assert labels <= {"outcome", "reason", "front"}, (family.name, labels)  # never a request id or a client
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
