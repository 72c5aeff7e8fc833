"""Load over real gRPC with the SDK's AsyncClient: closed loop at a concurrency, open loop at a Poisson rate.

Times are taken in the client when a message arrives, so they include everything a user waits
for: serialisation, the network stack, the server's event loop and the engine.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Callable

import grpc
from tokenloom_client import AsyncClient

from results import RequestResult
from workload import Request

Progress = Callable[[int], None]


async def stream_one(client: AsyncClient, req: Request, progress: Progress, start: float | None = None,
                     **overrides) -> RequestResult:
    """Stream one request; `start` (default: now) is when it counts as arrived."""
    result = RequestResult(req.index, time.perf_counter() if start is None else start)
    params = {**req.sdk_params(), **overrides}
    try:
        async for chunk in client.stream(input_ids=list(req.prompt_ids), **params):
            if chunk.token_ids or chunk.provisional:
                result.output_times.append(time.perf_counter())
                result.tokens += len(chunk.token_ids)
                progress(1)
            if chunk.finish_reason == "error":
                result.error = chunk.error_message or "error"
    except grpc.RpcError as exc:
        result.error = f"{exc.code().name}: {exc.details()}"
    result.end = time.perf_counter()
    return result


async def _closed_loop(address: str, requests: list[Request], concurrency: int, progress: Progress,
                       budget_s: float | None = None):
    pending = iter(requests)
    results: list[RequestResult] = []

    async def worker(client: AsyncClient) -> None:
        for req in pending:  # one shared iterator: each request is taken once
            results.append(await stream_one(client, req, progress))
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                return

    async with AsyncClient(address) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(min(concurrency, len(requests)))))
        t1 = time.perf_counter()
    return sorted(results, key=lambda r: r.index), t0, t1


async def stream_one_http(client, model: str, req: Request, progress: Progress) -> RequestResult:
    """The same request over the HTTP front, streamed with the `openai` package's AsyncOpenAI."""
    import openai

    result = RequestResult(req.index, time.perf_counter())
    try:
        stream = await client.completions.create(model=model, prompt=list(req.prompt_ids), stream=True,
                                                 **req.openai_params())
        async for chunk in stream:
            progressed = bool((chunk.model_extra or {}).get("best_so_far"))
            for choice in chunk.choices:
                n = len(choice.token_ids or ())
                result.tokens += n
                progressed = progressed or n > 0
            if progressed:
                result.output_times.append(time.perf_counter())
                progress(1)
    except openai.APIError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.end = time.perf_counter()
    return result


async def _closed_loop_http(base_url: str, requests: list[Request], concurrency: int, progress: Progress):
    import httpx
    import openai

    pending = iter(requests)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0, timeout=600,
                                  http_client=httpx.AsyncClient(limits=limits, timeout=600)) as client:
        model = (await client.models.list()).data[0].id

        async def worker() -> None:
            for req in pending:
                results.append(await stream_one_http(client, model, req, progress))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
        t1 = time.perf_counter()
    return sorted(results, key=lambda r: r.index), t0, t1


def closed_loop_http(base_url: str, requests: list[Request], concurrency: int, progress: Progress):
    """`closed_loop` over the OpenAI-compatible HTTP front (server-sent events)."""
    return asyncio.run(_closed_loop_http(base_url, requests, concurrency, progress))


def closed_loop(address: str, requests: list[Request], concurrency: int, progress: Progress,
                budget_s: float | None = None):
    """`concurrency` streams, each sending its next request as soon as its last one ends.

    With `budget_s`, a stream sends no new request once that many seconds have passed (the ones
    under way finish), so a starved system cannot hold a run for hours.
    """
    return asyncio.run(_closed_loop(address, requests, concurrency, progress, budget_s))


async def _open_loop(address: str, requests: list[Request], rate: float, seed: int, progress: Progress):
    rng = random.Random(seed)
    tasks = []
    async with AsyncClient(address) as client:
        t0 = time.perf_counter()
        arrival = t0
        for req in requests:
            arrival += rng.expovariate(rate)
            delay = arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            # Timed from the scheduled arrival: a late send counts against the system, not for it.
            tasks.append(asyncio.create_task(stream_one(client, req, progress, start=arrival)))
        results = await asyncio.gather(*tasks)
        t1 = time.perf_counter()
    return list(results), t0, t1


def open_loop(address: str, requests: list[Request], rate: float, seed: int, progress: Progress):
    """Requests arrive as a Poisson process of `rate` per second, whatever is still running."""
    return asyncio.run(_open_loop(address, requests, rate, seed, progress))
