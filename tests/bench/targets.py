"""The issue's performance targets, checked against one run's results. Pure: dicts in, verdicts out."""

from __future__ import annotations

MiB = 2**20
TARGET_STREAMS = 32
MAX_STREAMS = 64
MIN_TOK_PER_S_AT_64 = 345.0
VS_STATIC = 1.3
VS_CONTINUOUS = 1.5
MAX_OVERHEAD = 0.10
MAX_TTFT_RATIO = 2.0
RSS_ALLOWANCE = 512 * MiB  # "a few hundred MB" over weights + KV store: Python, torch, gRPC, buffers
RSS_GROWTH_ALLOWANCE = 32 * MiB  # allocator noise between two identical runs


def _find(runs: list[dict], system: str, concurrency: int) -> dict | None:
    return next((r["summary"] for r in runs if r["system"] == system and r["concurrency"] == concurrency), None)


def _target(name: str, ok: bool | None, measured: str) -> dict:
    return {"name": name, "ok": ok, "measured": measured}


def _ratio(runs, other: str, need: float, label: str) -> dict:
    ours, theirs = _find(runs, "tokenloom", TARGET_STREAMS), _find(runs, other, TARGET_STREAMS)
    name = f"{TARGET_STREAMS} streams ≥ {need}× {label}"
    if not ours or not theirs:
        return _target(name, None, "not measured")
    ratio = ours["tok_per_s"] / theirs["tok_per_s"]
    return _target(name, ratio >= need, f"{ratio:.2f}× ({ours['tok_per_s']:.1f} vs {theirs['tok_per_s']:.1f} tok/s"
                   f"{'' if theirs['requests'] == ours['requests'] else ', ' + str(theirs['requests']) + ' of the requests'})")


def check(runs: list[dict], probes: dict, memory: dict) -> list[dict]:
    out = [_ratio(runs, "hf_static", VS_STATIC, "static batching"),
           _ratio(runs, "hf_continuous", VS_CONTINUOUS, "transformers continuous batching")]

    s64 = _find(runs, "tokenloom", MAX_STREAMS)
    name = f"{MAX_STREAMS} streams ≥ {MIN_TOK_PER_S_AT_64:.0f} generated tok/s"
    out.append(_target(name, None, "not measured") if not s64 else _target(
        name, s64["tok_per_s"] >= MIN_TOK_PER_S_AT_64,
        f"{s64['tok_per_s']:.1f} tok/s over the whole run"
        + (f", {s64['steady_tok_per_s']:.1f} while all {MAX_STREAMS} streams were open" if s64["steady_tok_per_s"] else "")))

    grpc, engine = _find(runs, "tokenloom", TARGET_STREAMS), _find(runs, "engine", TARGET_STREAMS)
    name = f"gRPC + serving overhead ≤ {MAX_OVERHEAD:.0%} of engine-only time at {TARGET_STREAMS} streams"
    if grpc and engine:
        overhead = grpc["seconds"] / engine["seconds"] - 1
        out.append(_target(name, overhead <= MAX_OVERHEAD,
                           f"{overhead:+.1%} ({grpc['seconds']:.1f} s vs {engine['seconds']:.1f} s)"))
    else:
        out.append(_target(name, None, "not measured"))

    http = _find(runs, "tokenloom_http", TARGET_STREAMS)
    name = f"HTTP front overhead ≤ {MAX_OVERHEAD:.0%} over gRPC at {TARGET_STREAMS} streams"
    if grpc and http:
        overhead = http["seconds"] / grpc["seconds"] - 1
        out.append(_target(name, overhead <= MAX_OVERHEAD, f"{overhead:+.1%} ({http['seconds']:.1f} s vs "
                           f"{grpc['seconds']:.1f} s; {http['tok_per_s']:.1f} vs {grpc['tok_per_s']:.1f} tok/s)"))
    else:
        out.append(_target(name, None, "not measured"))

    chunk = probes.get("chunked_prefill")
    name = "a 512-token prompt delays decoding streams by ≤ one prefill chunk"
    out.append(_target(name, None, "not measured") if not chunk else _target(
        name, chunk["delay_ms"] <= chunk["lone_chunk_ms"],
        f"+{chunk['delay_ms']:.0f} ms over a {chunk['normal_gap_ms']:.0f} ms gap ({chunk['decoders']} streams; "
        f"median of {len(chunk.get('delays_ms', [0]))} arrivals: {chunk.get('delays_ms', '')}); "
        f"one {chunk['chunk_tokens']}-token chunk alone {chunk['lone_chunk_ms']:.0f} ms"))

    loaded, unloaded = _find(runs, "tokenloom", TARGET_STREAMS), probes.get("unloaded_ttft")
    name = f"TTFT p50 at {TARGET_STREAMS} streams ≤ {MAX_TTFT_RATIO:.0f}× unloaded (steady state)"
    if loaded and unloaded and loaded["ttft_steady_p50_ms"] is not None:
        ratio = loaded["ttft_steady_p50_ms"] / unloaded["ttft_p50_ms"]
        out.append(_target(name, ratio <= MAX_TTFT_RATIO, (
            f"{ratio:.2f}× ({loaded['ttft_steady_p50_ms']:.0f} ms over the {loaded['ttft_steady_requests']} requests "
            f"sent after the first wave vs {unloaded['ttft_p50_ms']:.0f} ms unloaded; all requests, first-wave "
            f"burst included: {loaded['ttft_p50_ms']:.0f} ms, {loaded['ttft_p50_ms'] / unloaded['ttft_p50_ms']:.2f}×)")))
    else:
        out.append(_target(name, None, "not measured (needs more than one wave at this level)"))

    streams = memory.get("streams")
    name = f"RSS at {streams} streams ≤ weights + KV store + {RSS_ALLOWANCE // MiB} MiB"
    if memory.get("peak_rss"):
        budget = memory["weights"] + memory["kv_store"] + RSS_ALLOWANCE
        after = memory.get("after", {})
        out.append(_target(name, memory["peak_rss"] <= budget, (
            f"peak {memory['peak_rss'] / MiB:.0f} MiB vs budget {budget / MiB:.0f} (weights "
            f"{memory['weights'] / MiB:.0f} + KV {memory['kv_store'] / MiB:.0f} + {RSS_ALLOWANCE // MiB}); idle "
            f"{memory['idle_rss'] / MiB:.0f} MiB; after the runs anon {after.get('RssAnon', 0) / MiB:.0f} + "
            f"mapped files {after.get('RssFile', 0) / MiB:.0f} MiB")))
    else:
        out.append(_target(name, None, "not measured"))
    name = f"RSS does not grow across repeated {streams}-stream runs (≤ {RSS_GROWTH_ALLOWANCE // MiB} MiB)"
    runs_after = memory.get("after_runs") or []
    if len(runs_after) >= 2:
        growth = runs_after[-1] - runs_after[0]
        out.append(_target(name, growth <= RSS_GROWTH_ALLOWANCE, f"{growth / MiB:+.0f} MiB ("
                           + " → ".join(f"{b / MiB:.0f}" for b in runs_after) + " MiB after each run)"))
    else:
        out.append(_target(name, None, "not measured (--memory-runs 1)"))
    return out
