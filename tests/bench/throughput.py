"""Throughput of tokenloom over real gRPC against HF `generate` one request at a time, in one run.

    python tests/bench/throughput.py [--model default] [--new-tokens 64] [--concurrency 1 32]

Greedy requests, so every system generates the same tokens (tokenloom's greedy output equals
HF's). Systems run one after another on the same machine, never at the same time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[1] / "server"), str(HERE.parents[1] / "client")]

from server_process import ServerProcess  # noqa: E402
from tokenloom_client import AsyncClient  # noqa: E402

TOPICS = ["the sea", "a city at night", "mountains", "a robot", "coffee", "the history of maps", "winter",
          "a library", "trains", "the moon", "gardens", "a thunderstorm", "bees", "old computers", "rivers", "jazz"]


def workload(n: int) -> list[str]:
    """Plain-text prompts of varied length (a few to ~60 tokens)."""
    prompts = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        prompts.append(f"Here is a short story about {topic}." + " It begins on an ordinary day." * (i % 6))
    return prompts


async def run_closed_loop(address: str, prompts: list[str], concurrency: int, new_tokens: int) -> dict:
    queue = list(enumerate(prompts))
    ttft, itl, generated = [], [], 0

    async def worker(client):
        nonlocal generated
        while queue:
            _, prompt = queue.pop(0)
            start = last = time.perf_counter()
            first = True
            async for chunk in client.stream(prompt=prompt, max_new_tokens=new_tokens):
                now = time.perf_counter()
                if chunk.token_ids:
                    (ttft if first else itl).append(now - last if not first else now - start)
                    first, last = False, now
                generated += len(chunk.token_ids)

    async with AsyncClient(address) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"tokens": generated, "seconds": wall, "tok_per_s": generated / wall,
            "ttft_p50_ms": 1e3 * statistics.median(ttft), "itl_p50_ms": 1e3 * statistics.median(itl) if itl else None}


def hf_sequential(model_dir: Path, prompts: list[str], new_tokens: int, num_beams: int = 1) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    generated = 0
    t0 = time.perf_counter()
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, do_sample=False, max_new_tokens=new_tokens, num_beams=num_beams,
                                 pad_token_id=tok.eos_token_id)
        generated += out.shape[1] - ids["input_ids"].shape[1]
    wall = time.perf_counter() - t0
    return {"tokens": generated, "seconds": wall, "tok_per_s": generated / wall, "req_per_s": len(prompts) / wall}


async def run_beams(address: str, prompts: list[str], new_tokens: int, num_beams: int) -> dict:
    """Every beam request at once; generated tokens counted on the best hypothesis."""
    async with AsyncClient(address) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(client.generate(prompt=p, max_new_tokens=new_tokens, num_beams=num_beams)
                                         for p in prompts))
        wall = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in results)
    return {"tokens": tokens, "seconds": wall, "tok_per_s": tokens / wall, "req_per_s": len(prompts) / wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 32])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level (at least the level)")
    p.add_argument("--baseline-requests", type=int, default=6, help="requests for the slow sequential baseline")
    p.add_argument("--beam-requests", type=int, default=8, help="concurrent beam-4 requests (0 skips)")
    p.add_argument("--beam-baseline-requests", type=int, default=2)
    p.add_argument("--out", default=".bench/throughput.json")
    args = p.parse_args()

    from tokenloom.models import ensure_default_model

    model_dir = ensure_default_model() if args.model == "default" else Path(args.model)
    results = {"model": str(model_dir), "new_tokens": args.new_tokens, "systems": {}}
    print(f"HF generate, one request at a time ({args.baseline_requests} requests)...", flush=True)
    results["systems"]["hf_sequential"] = hf_sequential(model_dir, workload(args.baseline_requests), args.new_tokens)
    server = ServerProcess(model_dir, "--log-level", "WARNING", log_dir=Path(tempfile.mkdtemp()), name="bench").start()
    try:
        server.wait_ready()
        asyncio.run(run_closed_loop(server.address, workload(2), 2, 8))  # warm-up
        for c in args.concurrency:
            n = max(args.requests, c)
            print(f"tokenloom, {c} concurrent streams ({n} requests)...", flush=True)
            results["systems"][f"tokenloom_c{c}"] = asyncio.run(
                run_closed_loop(server.address, workload(n), c, args.new_tokens))
        if args.beam_requests:
            n = args.beam_requests
            print(f"tokenloom, {n} concurrent beam-4 requests...", flush=True)
            results["beams"] = {"tokenloom": asyncio.run(run_beams(server.address, workload(n), args.new_tokens, 4))}
    finally:
        server.stop()
    if args.beam_requests:
        print(f"HF generate(num_beams=4), one request at a time ({args.beam_baseline_requests} requests)...", flush=True)
        results["beams"]["hf_sequential"] = hf_sequential(
            model_dir, workload(args.beam_baseline_requests), args.new_tokens, num_beams=4)
    base = results["systems"]["hf_sequential"]["tok_per_s"]
    print(f"\n{'system':<20}{'tok/s':>10}{'x HF seq':>10}{'TTFT p50':>12}{'ITL p50':>10}")
    for name, r in results["systems"].items():
        ttft = f"{r['ttft_p50_ms']:.0f} ms" if "ttft_p50_ms" in r else "-"
        itl = f"{r['itl_p50_ms']:.0f} ms" if r.get("itl_p50_ms") else "-"
        print(f"{name:<20}{r['tok_per_s']:>10.1f}{r['tok_per_s'] / base:>10.2f}{ttft:>12}{itl:>10}")
    if args.beam_requests:
        b = results["beams"]
        ratio = b["tokenloom"]["req_per_s"] / b["hf_sequential"]["req_per_s"]
        print(f"\nbeam-4: tokenloom {b['tokenloom']['req_per_s']:.3f} req/s ({args.beam_requests} concurrent), "
              f"HF sequential {b['hf_sequential']['req_per_s']:.3f} req/s: {ratio:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
