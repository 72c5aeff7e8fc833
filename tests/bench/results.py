"""What one request saw (times of its outputs, tokens received) and the summary of a run.

Every system reports `RequestResult`s measured where its user would see them: the gRPC client
for tokenloom, the `publish` callback for the engine alone, a streamer for HF `generate`,
the per-token timestamps of transformers' continuous batching. Generated tokens are the tokens
received (beam requests: the best hypothesis), never a server-side counter.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestResult:
    index: int  # the workload request it ran
    start: float  # perf_counter when it was sent
    output_times: list[float] = field(default_factory=list)  # one per output step (a token, or a beam step)
    tokens: int = 0  # generated tokens received
    end: float = 0.0
    error: str = ""

    @property
    def ttft(self) -> float | None:
        return self.output_times[0] - self.start if self.output_times else None

    @property
    def gaps(self) -> list[float]:
        t = self.output_times
        return [b - a for a, b in zip(t, t[1:])]


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _ms(values: list[float], q: float) -> float | None:
    p = percentile(values, q)
    return None if p is None else 1e3 * p


def summarize(results: list[RequestResult], t0: float, t1: float, concurrency: int | None = None) -> dict:
    """Throughput over [t0, t1] and latency percentiles (ms), errors counted apart.

    Closed loop only (`concurrency` given), steady state: `steady_tok_per_s` counts the tokens
    received until the last request was sent, over that time, i.e. while `concurrency` streams
    were always open; `ttft_steady_*` are the TTFTs of the requests sent after the first wave
    (which all arrive at once, a burst rather than `concurrency` streams). None without them.
    """
    ok = [r for r in results if not r.error]
    wall = max(t1 - t0, 1e-9)
    tokens = sum(r.tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    last_start = max((r.start for r in results), default=t0)
    steady = None
    if concurrency and last_start - t0 > 0.05 * wall:
        # One output step is one token (a beam request's steps each extend its best hypothesis).
        steady = sum(sum(1 for t in r.output_times if t <= last_start) for r in ok) / (last_start - t0)
    later = sorted(ok, key=lambda r: r.start)[concurrency:] if concurrency else []
    steady_ttfts = [r.ttft for r in later if r.ttft is not None]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "first_error": next((r.error for r in results if r.error), ""),
        "tokens": tokens,
        "seconds": wall,
        "tok_per_s": tokens / wall,
        "req_per_s": len(ok) / wall,
        "steady_tok_per_s": steady,
        **{f"ttft_p{q}_ms": _ms(ttfts, q) for q in (50, 90, 99)},
        **{f"itl_p{q}_ms": _ms(gaps, q) for q in (50, 90, 99)},
        "ttft_steady_requests": len(steady_ttfts),
        **{f"ttft_steady_p{q}_ms": _ms(steady_ttfts, q) for q in (50, 90, 99)},
    }


def latencies(results: list[RequestResult]) -> dict[str, list[float]]:
    """Raw TTFTs and inter-token gaps in ms, for the CDF plots."""
    ok = [r for r in results if not r.error]
    return {
        "ttft_ms": sorted(1e3 * r.ttft for r in ok if r.ttft is not None),
        "itl_ms": sorted(1e3 * g for r in ok for g in r.gaps),
    }
