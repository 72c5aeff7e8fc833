"""Prefix caching, measured: two workloads that resend prefixes, against the same server with the cache
on (the default) and off (--no-prefix-caching), one after the other, in one run.

- chat: 16 conversations of 4 turns at 8 concurrent clients; each turn sends a shared 400-token
  system prompt plus the conversation so far (earlier user messages and the server's own answers)
  plus a new user message, and streams a 32-token answer (ignore_eos). TTFT per turn, total time,
  generated tokens/s.
- multiple choice: 50 questions of ~300 tokens with 4 candidate answers each, scored with `Score`;
  8 workers each take a question and score its answers one after another. Total time, answers/s.

- unique prompts: 64 requests whose prompts share nothing (each starts with its own number), 48 new
  tokens each, 8 clients: what the cache costs where it cannot help.

Hit rates come from the server's own counters (tokenloom_prefix_cache_{hits,queries}_total).
Targets (issue 14): chat TTFT p50 >= 3x lower and throughput >= 1.5x higher with the cache on;
multiple choice >= 2.5x faster; unique prompts within noise of the cache off.

    make bench-prefix                       # the default model as `make serve` serves it
    make bench-prefix BENCH_ARGS="--quick"  # a smoke run: fewer conversations and questions
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent), str(ROOT / "server"), str(ROOT / "client")]

import workload  # noqa: E402
from metrics_scrape import Scrape  # noqa: E402
from results import percentile  # noqa: E402
from server_process import ServerProcess  # noqa: E402
from tokenloom_client import AsyncClient  # noqa: E402

SYSTEMS = {"cache on": (), "cache off": ("--no-prefix-caching",)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="a local HF model directory, or default")
    p.add_argument("--server-args", default="", help="extra server flags for both systems")
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--clients", type=int, default=8, help="concurrent chat clients and scoring workers")
    p.add_argument("--system-tokens", type=int, default=400)
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--questions", type=int, default=50)
    p.add_argument("--question-tokens", type=int, default=300)
    p.add_argument("--unique", type=int, default=64, help="requests of the unique-prompt workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="4 conversations of 3 turns, 8 questions")
    p.add_argument("--out", type=Path, default=ROOT / ".bench" / "prefix")
    args = p.parse_args(argv)
    if args.quick:
        args.conversations, args.turns, args.questions, args.unique = 4, 3, 8, 16
    return args


class Workloads:
    def __init__(self, args, tokenizer):
        rng = random.Random(args.seed)
        self.system = list(workload.prompt_ids(rng, tokenizer, args.system_tokens))
        # Each conversation's user messages (16-60 tokens); the answers come from the server.
        self.users = [[list(workload.prompt_ids(rng, tokenizer, rng.randint(16, 60))) for _ in range(args.turns)]
                      for _ in range(args.conversations)]
        self.questions = []
        for _ in range(args.questions):
            question = list(workload.prompt_ids(rng, tokenizer, args.question_tokens + rng.randint(-20, 20)))
            answers = [list(workload.prompt_ids(rng, tokenizer, rng.randint(4, 24))) for _ in range(4)]
            self.questions.append((question, answers))
        self.unique = [tokenizer.encode(f"Request {i}: ", add_special_tokens=False)
                       + list(workload.prompt_ids(rng, tokenizer, rng.randint(100, 300))) for i in range(args.unique)]


async def chat(address: str, w: Workloads, args) -> dict:
    ttfts: list[float] = []
    generated = 0
    pending = list(range(len(w.users)))

    async def client() -> None:
        nonlocal generated
        async with AsyncClient(address) as c:
            while pending:
                history = list(w.system)
                for user in w.users[pending.pop(0)]:
                    history += user
                    sent, answer = time.perf_counter(), []
                    async for chunk in c.stream(input_ids=history, max_new_tokens=args.answer_tokens, ignore_eos=True):
                        if chunk.token_ids and not answer:
                            ttfts.append(time.perf_counter() - sent)
                        answer += chunk.token_ids
                    generated += len(answer)
                    history += answer

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.clients)))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "turns": len(ttfts), "generated_tok_s": generated / seconds,
            "ttft_p50_ms": 1000 * percentile(ttfts, 50), "ttft_p90_ms": 1000 * percentile(ttfts, 90)}


async def multiple_choice(address: str, w: Workloads, args) -> dict:
    pending = list(w.questions)
    scored = 0

    async def worker() -> None:
        nonlocal scored
        async with AsyncClient(address) as c:
            while pending:
                question, answers = pending.pop(0)
                for answer in answers:
                    await c.score(prompt_ids=question, continuation_ids=answer)
                    scored += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.clients)))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "answers": scored, "answers_per_s": scored / seconds}


async def unique(address: str, w: Workloads, args) -> dict:
    pending = list(w.unique)
    generated = 0

    async def client() -> None:
        nonlocal generated
        async with AsyncClient(address) as c:
            while pending:
                result = await c.generate(input_ids=pending.pop(0), max_new_tokens=48, ignore_eos=True)
                generated += len(result.token_ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.clients)))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "requests": len(w.unique), "generated_tok_s": generated / seconds}


def hit_rate(before: Scrape, after: Scrape) -> float | None:
    queries = after.get("prefix_cache_queries_total") - before.get("prefix_cache_queries_total")
    hits = after.get("prefix_cache_hits_total") - before.get("prefix_cache_hits_total")
    return hits / queries if queries else None


def measure(args, w: Workloads, name: str, flags: tuple[str, ...]) -> dict:
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(args.model, *shlex.split(args.server_args), *flags, log_dir=logs,
                           name=name.replace(" ", "-")).start()
    try:
        server.wait_ready(timeout=600)
        out = {}
        for label, run in (("chat", chat), ("multiple_choice", multiple_choice), ("unique", unique)):
            before = Scrape(server.metrics_url)
            out[label] = asyncio.run(run(server.address, w, args))
            out[label]["hit_rate"] = hit_rate(before, Scrape(server.metrics_url))
            print(f"{name}, {label}: {out[label]}", flush=True)
        return out
    finally:
        server.stop()


def report(results: dict, header: str) -> str:
    on, off = results["cache on"], results["cache off"]

    def rate(r):
        return "-" if r is None else f"{100 * r:.0f} %"

    lines = [header, "", "| workload | cache | time s | TTFT p50 / p90 ms | throughput | hit rate |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        c, m = r["chat"], r["multiple_choice"]
        lines.append(f"| chat | {name} | {c['seconds']:.1f} | {c['ttft_p50_ms']:.0f} / {c['ttft_p90_ms']:.0f} | "
                     f"{c['generated_tok_s']:.1f} gen tok/s | {rate(c['hit_rate'])} |")
        lines.append(f"| multiple choice | {name} | {m['seconds']:.1f} | – | {m['answers_per_s']:.2f} answers/s | "
                     f"{rate(m['hit_rate'])} |")
        u = r["unique"]
        lines.append(f"| unique prompts | {name} | {u['seconds']:.1f} | – | {u['generated_tok_s']:.1f} gen tok/s | "
                     f"{rate(u['hit_rate'])} |")
    ttft = off["chat"]["ttft_p50_ms"] / on["chat"]["ttft_p50_ms"]
    tput = on["chat"]["generated_tok_s"] / off["chat"]["generated_tok_s"]
    mc = off["multiple_choice"]["seconds"] / on["multiple_choice"]["seconds"]
    same = on["unique"]["generated_tok_s"] / off["unique"]["generated_tok_s"]
    lines += ["", "Targets:",
              f"- {'PASS' if ttft >= 3 else 'MISS'}: chat TTFT p50 >= 3x lower with the cache: {ttft:.2f}x",
              f"- {'PASS' if tput >= 1.5 else 'MISS'}: chat throughput >= 1.5x higher with the cache: {tput:.2f}x",
              f"- {'PASS' if mc >= 2.5 else 'MISS'}: multiple choice >= 2.5x faster with the cache: {mc:.2f}x",
              f"- {'PASS' if same >= 0.95 else 'MISS'}: unique prompts within 5 % of the cache off: {same:.2f}x"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from tokenloom.executor.models import ensure_default_model
    from transformers import AutoTokenizer

    args = parse_args(argv)
    model_dir = ensure_default_model() if args.model == "default" else Path(args.model)
    w = Workloads(args, AutoTokenizer.from_pretrained(model_dir, local_files_only=True))
    load_before = os.getloadavg()
    results = {name: measure(args, w, name, flags) for name, flags in SYSTEMS.items()}
    header = (f"{datetime.datetime.now().isoformat(timespec='seconds')}, {os.cpu_count()} cores; chat: "
              f"{args.conversations} conversations x {args.turns} turns, {args.system_tokens}-token system prompt, "
              f"{args.answer_tokens}-token answers, {args.clients} clients; multiple choice: {args.questions} "
              f"questions of ~{args.question_tokens} tokens x 4 answers, {args.clients} workers; load average "
              f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    text = report(results, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"header": header, "results": results}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
