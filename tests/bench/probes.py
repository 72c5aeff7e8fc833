"""Targeted measurements over gRPC: unloaded TTFT, and what a long prompt costs streams already decoding."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time

from tokenloom_client import AsyncClient

from loadgen import stream_one
from results import RequestResult, percentile
from workload import Request


def _noop(_: int) -> None:
    pass


async def _unloaded_ttft(address: str, requests: list[Request]) -> list[float]:
    async with AsyncClient(address) as client:
        ttfts = []
        for req in requests:
            result = await stream_one(client, req, _noop, max_new_tokens=1)
            if not result.error and result.ttft is not None:
                ttfts.append(result.ttft)
        return ttfts


def unloaded_ttft(address: str, requests: list[Request]) -> dict:
    """The same requests one at a time on an idle server, one new token each: TTFT with no load."""
    ttfts = asyncio.run(_unloaded_ttft(address, requests))
    return {"requests": len(ttfts), **{f"ttft_p{q}_ms": 1e3 * percentile(ttfts, q) for q in (50, 90, 99)}}


async def _decoder(client: AsyncClient, req: Request, result: RequestResult, warmed: asyncio.Event,
                   stop: asyncio.Event, warm_steps: int) -> None:
    """Stream until `stop`, then cancel (aclosing makes the cancel reach the server at once)."""
    async with contextlib.aclosing(client.stream(input_ids=list(req.prompt_ids), **req.sdk_params())) as stream:
        async for chunk in stream:
            if chunk.token_ids:
                result.output_times.append(time.perf_counter())
                result.tokens += len(chunk.token_ids)
                if len(result.output_times) == warm_steps:
                    warmed.set()
            if stop.is_set():
                break


async def _chunked_prefill(address: str, decoders: list[Request], prompt: Request, chunk_prompt: Request,
                           warm_steps: int, repeats: int) -> dict:
    async with AsyncClient(address) as client:
        # One prefill chunk alone: a prompt of exactly --max-num-batched-tokens tokens on the idle server.
        lone = [await stream_one(client, chunk_prompt, _noop, max_new_tokens=1) for _ in range(3)]
        chunk_s = statistics.median(r.ttft for r in lone)

        stop = asyncio.Event()
        results = [RequestResult(r.index, time.perf_counter()) for r in decoders]
        warmed = [asyncio.Event() for _ in decoders]
        tasks = [asyncio.create_task(_decoder(client, r, res, w, stop, warm_steps))
                 for r, res, w in zip(decoders, results, warmed)]
        await asyncio.gather(*(w.wait() for w in warmed))
        windows = []  # (submitted, first token) of each arrival of the long prompt
        for _ in range(repeats):
            await asyncio.sleep(0.5)  # a few more steps of pure decoding, as the reference gap
            long = await stream_one(client, prompt, _noop, max_new_tokens=2)
            windows.append((long.start, long.output_times[0]))
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)

    arrivals = [_arrival(results, t_submit, t_first) for t_submit, t_first in windows]
    normal_s = statistics.median(a[0] for a in arrivals)
    worst_s = statistics.median(a[1] for a in arrivals)
    delays = [worst - normal for normal, worst, _ in arrivals]
    return {
        "decoders": len(decoders),
        "prompt_tokens": len(prompt.prompt_ids),
        "chunk_tokens": len(chunk_prompt.prompt_ids),
        "lone_chunk_ms": 1e3 * chunk_s,
        "normal_gap_ms": 1e3 * normal_s,
        "gap_during_prefill_ms": 1e3 * worst_s,
        "max_gap_during_prefill_ms": 1e3 * max(a[2] for a in arrivals),
        "delay_ms": 1e3 * statistics.median(delays),
        "delays_ms": [round(1e3 * d, 1) for d in delays],
        "long_prompt_ttft_ms": 1e3 * statistics.median(t_first - t_submit for t_submit, t_first in windows),
    }


def _arrival(results: list[RequestResult], t_submit: float, t_first: float) -> tuple[float, float, float]:
    """The decoders' usual gap before one arrival of the long prompt, their (median) largest gap while it
    was prefilled (from its submission to its first token), and the largest of all."""
    normal, worst = [], []
    for r in results:
        before = [b - a for a, b in zip(r.output_times, r.output_times[1:]) if b < t_submit]
        during = [b - a for a, b in zip(r.output_times, r.output_times[1:]) if b > t_submit and a < t_first]
        if before[-8:] and during:
            normal.append(statistics.median(before[-8:]))
            worst.append(max(during))
    return statistics.median(normal), statistics.median(worst), max(worst)


def chunked_prefill(address: str, decoders: list[Request], prompt: Request, chunk_prompt: Request,
                    warm_steps: int = 8, repeats: int = 3) -> dict:
    """`decoders` stream greedily; once each has `warm_steps` tokens, `prompt` arrives, `repeats` times
    one after another. Their largest gap while it is prefilled, minus their usual gap, is the delay it
    caused (the median over the arrivals: one step is a single sample on a noisy machine); compared
    with the time of one prefill chunk alone (`chunk_prompt`, as many tokens as a step computes, on
    the idle server)."""
    return asyncio.run(_chunked_prefill(address, decoders, prompt, chunk_prompt, warm_steps, repeats))
