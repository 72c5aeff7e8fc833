"""Soak: thousands of requests at high concurrency against one server over raw gRPC, with client
cancels, deadlines, bad input and queue overflow mixed in; then the accounting.

    python tests/soak.py [--requests 5000] [--concurrency 64] [--seed 0] [--model DIR]

(`make soak`; tests/e2e/test_soak.py runs a shorter one in CI.) Every request is classified by
what its client saw, and the server's own books must agree: each request counted exactly once
under one outcome, no sequence or KV block left behind (the metrics gauges, and the scheduler's
invariant check in the server's exit line), and resident memory that stops growing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "e2e"), str(HERE.parent / "server"), str(HERE.parent / "client")]

from metrics_scrape import Scrape, poll  # noqa: E402
from server_process import ServerProcess  # noqa: E402
from test_bad_input import BAD  # noqa: E402
from tokenloom_client.pb.tokenloom.v1 import generation_pb2 as pb  # noqa: E402
from tokenloom_client.pb.tokenloom.v1 import generation_pb2_grpc  # noqa: E402

SERVER_ARGS = ("--kv-cache-tokens", "16384", "--max-num-batched-tokens", "256", "--max-num-seqs", "64",
               "--max-queued-requests", "56", "--log-level", "INFO")
# (kind, weight): what a client does with its request.
MIX = [("greedy", 28), ("sampled", 23), ("samples_n2", 4), ("beam", 4), ("score", 4),
       ("constrained", 6), ("cancel", 11), ("deadline", 10), ("bad", 10)]
# A constrained request's constraint, and how it decodes: greedy, sampled (n 1 or 2) or beams.
CONSTRAINTS = [pb.Constraint(regex=r"[a-z]{2,6}( [a-z]{2,6}){0,4}\."), pb.Constraint(json_object=True),
               pb.Constraint(json_schema='{"type": "object", "properties": {"n": {"type": "integer"}, '
                                         '"s": {"type": "string", "maxLength": 6}}, "required": ["n", "s"]}'),
               pb.Constraint(choice=pb.Choice(options=["yes", "no", "maybe"]))]
VOCAB_LOW, VOCAB_HIGH = 10, 20000


@dataclass
class Report:
    requests: int = 0
    seconds: float = 0.0
    by_kind: dict = field(default_factory=dict)  # what the clients did
    by_code: dict = field(default_factory=dict)  # the status each call ended with
    server_outcomes: dict = field(default_factory=dict)  # tokenloom_requests_finished_total deltas
    wrong: list = field(default_factory=list)  # calls that ended in a way their kind does not allow
    calls: dict = field(default_factory=dict, repr=False)  # request index -> (kind, status code)
    # From the server's request log (one line per call): ids logged twice, and ids never logged
    # with what their client saw.
    logged_twice: list = field(default_factory=list)
    never_logged: list = field(default_factory=list)
    running_after: float = -1
    kv_bytes_after: float = -1
    waiting_after: float = -1
    rss_trace_mib: list = field(default_factory=list)  # the server's, after every tenth of the requests
    exit_line: str = ""
    exit_code: int | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "calls"}, indent=2)


def _prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(rng.randint(1, 96))]


def _params(rng: random.Random, **extra) -> pb.GenerationParameters:
    return pb.GenerationParameters(max_new_tokens=rng.randint(1, 24), ignore_eos=rng.random() < 0.7, **extra)


async def _stream(stub, request, timeout=60.0, cancel_after: int | None = None) -> tuple[str, int]:
    """(status code name, chunks read); CANCELLED when this client cancelled it."""
    call = stub.Generate(request, timeout=timeout)
    chunks = 0
    try:
        async for _ in call:
            chunks += 1
            if cancel_after is not None and chunks >= cancel_after:
                call.cancel()
                return "CANCELLED", chunks
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, chunks
    except asyncio.CancelledError:
        return "CANCELLED", chunks
    return "OK", chunks


async def _one(stub, rng: random.Random, kind: str, request_id: str) -> tuple[str, set[str]]:
    """Run one request of `kind`; (its status code name, the codes that kind may end with)."""
    busy = {"RESOURCE_EXHAUSTED"}  # the queue cap may refuse anything that gets past validation
    if kind in ("greedy", "sampled", "samples_n2", "beam"):
        extra = {"greedy": {}, "sampled": dict(do_sample=True, temperature=rng.uniform(0.3, 1.5), top_k=rng.choice(
            [0, 20, 200]), top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(2**31)),
                 "samples_n2": dict(do_sample=True, num_return_sequences=2, seed=rng.randrange(2**31)),
                 "beam": dict(num_beams=rng.choice([2, 3]), no_repeat_ngram_size=rng.choice([0, 2]))}[kind]
        code, _ = await _stream(stub, pb.GenerateRequest(request_id=request_id, input_ids=_prompt(rng),
                                                         parameters=_params(rng, **extra)))
        return code, {"OK"} | busy
    if kind == "constrained":  # some cancelled mid-stream, some cut by a deadline, with masks in flight
        extra = rng.choice([{}, dict(do_sample=True, seed=rng.randrange(2**31)),
                            dict(do_sample=True, num_return_sequences=2, seed=rng.randrange(2**31)),
                            dict(num_beams=rng.choice([2, 3]))])
        request = pb.GenerateRequest(request_id=request_id, input_ids=_prompt(rng), parameters=pb.GenerationParameters(
            max_new_tokens=rng.randint(4, 60), constraint=rng.choice(CONSTRAINTS), **extra))
        ending = rng.choice(["whole", "cancel", "deadline"])
        if ending == "cancel":
            code, _ = await _stream(stub, request, cancel_after=rng.randint(1, 6))
            return code, {"CANCELLED", "OK"} | busy  # a short one may end before the cancel
        code, _ = await _stream(stub, request, timeout=rng.uniform(0.05, 1.0) if ending == "deadline" else 60.0)
        return code, {"OK", "DEADLINE_EXCEEDED"} | busy if ending == "deadline" else {"OK"} | busy
    if kind == "score":
        request = pb.ScoreRequest(request_id=request_id, prompt_ids=_prompt(rng), continuation_ids=_prompt(rng)[:16])
        try:
            await stub.Score(request, timeout=60)
            return "OK", {"OK"} | busy
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, {"OK"} | busy
    if kind == "cancel":
        request = pb.GenerateRequest(request_id=request_id, input_ids=_prompt(rng), parameters=pb.GenerationParameters(
            max_new_tokens=200, ignore_eos=True))
        code, _ = await _stream(stub, request, cancel_after=rng.randint(1, 20))
        return code, {"CANCELLED"} | busy
    if kind == "deadline":
        request = pb.GenerateRequest(request_id=request_id, input_ids=_prompt(rng), parameters=pb.GenerationParameters(
            max_new_tokens=rng.randint(50, 300), ignore_eos=True))
        code, _ = await _stream(stub, request, timeout=rng.uniform(0.02, 1.0))
        return code, {"DEADLINE_EXCEEDED", "OK"} | busy  # a fast one may finish in time
    name, method, template, expected, _ = rng.choice(BAD)
    request = type(template)()
    request.CopyFrom(template)
    request.request_id = request_id
    try:
        if method == "Generate":
            code, _ = await _stream(stub, request)
        else:
            await getattr(stub, method)(request, timeout=60)
            code = "OK"
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    return code, {expected.name}


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


async def _drive(server: ServerProcess, requests: int, concurrency: int, seed: int, report: Report,
                 progress: bool) -> None:
    rng = random.Random(seed)
    kinds = [k for k, w in MIX for _ in range(w)]
    plan = [(i, rng.choice(kinds), random.Random(rng.randrange(2**63))) for i in range(requests)]
    queue = collections.deque(plan)
    done = 0

    async def worker(stub):
        nonlocal done
        while queue:
            i, kind, own = queue.popleft()
            code, allowed = await _one(stub, own, kind, f"soak-{i}")
            report.calls[i] = (kind, code)
            report.by_kind[kind] = report.by_kind.get(kind, 0) + 1
            report.by_code[code] = report.by_code.get(code, 0) + 1
            if code not in allowed:
                report.wrong.append((i, kind, code))
            done += 1
            if done % max(1, requests // 10) == 0:
                report.rss_trace_mib.append(round(_rss_mib(server.proc.pid), 1))
            if progress and done % 500 == 0:
                print(f"  {done}/{requests} requests", flush=True)

    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        await asyncio.gather(*(worker(stub) for _ in range(concurrency)))


def run_soak(model_dir: Path, requests: int = 5000, concurrency: int = 64, seed: int = 0,
             log_dir: Path | None = None, progress: bool = False, server_args: tuple[str, ...] = ()) -> Report:
    report = Report(requests=requests)
    server = ServerProcess(model_dir, *SERVER_ARGS, *server_args, log_dir=log_dir or Path(tempfile.mkdtemp()),
                           name="soak")
    try:
        server.start().wait_ready()
        before = Scrape(server.metrics_url)
        started = time.monotonic()
        asyncio.run(_drive(server, requests, concurrency, seed, report, progress))
        report.seconds = time.monotonic() - started
        # A cancel or a deadline reaches the server's books when it notices it, a moment later.
        after = poll(server.metrics_url, lambda s: s.idle and sum(s.outcomes().values())
                     - sum(before.outcomes().values()) >= requests, timeout=10)
        report.server_outcomes = {k: v - before.outcomes().get(k, 0) for k, v in after.outcomes().items()
                                  if v - before.outcomes().get(k, 0)}
        report.running_after, report.kv_bytes_after = after.running, after.kv_bytes
        report.waiting_after = after.get("waiting_requests")
    finally:
        report.exit_code = server.stop()
        log = server.log_tail(10**9)
        lines = [ln for ln in log.splitlines() if "engine stopped" in ln]
        report.exit_line = lines[-1] if lines else ""
        logged = collections.Counter(int(i) for i in re.findall(r"tokenloom\.requests: request_id=soak-(\d+) ", log))
        report.logged_twice = sorted(i for i, n in logged.items() if n > 1)
        report.never_logged = [(i, *report.calls.get(i, ("?", "?"))) for i in range(requests) if i not in logged]
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model directory (default: a tiny random Llama built here)")
    p.add_argument("--server-args", default="", help="extra flags for the server, e.g. '--linear-kernel torch'")
    p.add_argument("--out", default=".soak/report.json")
    args = p.parse_args()
    if args.model is None:
        from tiny_models import build_tiny_model, default_model_dir

        model_dir = build_tiny_model("llama", Path(tempfile.mkdtemp()) / "llama", tokenizer_dir=default_model_dir())
    else:
        model_dir = Path(args.model)
    print(f"soak: {args.requests} requests at concurrency {args.concurrency} against {model_dir}", flush=True)
    report = run_soak(model_dir, args.requests, args.concurrency, args.seed, progress=True,
                      server_args=tuple(shlex.split(args.server_args)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report.to_json())
    print(report.to_json())
    problems = check(report)
    for problem in problems:
        print("FAIL:", problem)
    return 1 if problems else 0


def check(report: Report, rss_growth_mib: float = 64.0) -> list[str]:
    """What a soak must show; empty when all is well."""
    problems = []
    if report.wrong:
        problems.append(f"{len(report.wrong)} calls ended with a status their kind does not allow: {report.wrong[:5]}")
    if sum(report.by_code.values()) != report.requests:
        problems.append(f"{sum(report.by_code.values())} calls ended, {report.requests} were made")
    if sum(report.server_outcomes.values()) != report.requests - len(report.never_logged):
        problems.append(f"the server counted {sum(report.server_outcomes.values())} requests of "
                        f"{report.requests - len(report.never_logged)} it logged: {report.server_outcomes}")
    client_ok = report.by_code.get("OK", 0)
    server_ok = sum(report.server_outcomes.get(k, 0) for k in ("eos", "length", "stop_string"))
    # A deadline can pass just as the last event leaves: the server finished it, the client saw the deadline.
    if not client_ok <= server_ok <= client_ok + report.by_code.get("DEADLINE_EXCEEDED", 0):
        problems.append(f"completed: clients saw {client_ok}, the server counted {server_ok}")
    for code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE"):
        if report.by_code.get(code, 0) != report.server_outcomes.get(code, 0):
            problems.append(f"{code}: clients saw {report.by_code.get(code, 0)}, "
                            f"the server counted {report.server_outcomes.get(code, 0)}")
    if (report.running_after, report.kv_bytes_after, report.waiting_after) != (0, 0, 0):
        problems.append(f"left behind: {report.running_after} sequences, {report.kv_bytes_after} KV bytes, "
                        f"{report.waiting_after} waiting")
    if not re.search(r"engine stopped after \d+ steps: invariants hold, 0 sequences, 0 of \d+ KV blocks in use",
                     report.exit_line):
        problems.append(f"the server's exit line does not show a clean store: {report.exit_line!r}")
    # Allocators and caches grow while warming up; a leak keeps growing. Peak of the second half
    # against the peak of the first.
    trace = report.rss_trace_mib
    half = len(trace) // 2
    growth = max(trace[half:], default=0) - max(trace[:half], default=0)
    if growth > rss_growth_mib:
        problems.append(f"resident memory still grew {growth:.0f} MiB in the second half: {trace} MiB")
    if report.logged_twice:
        problems.append(f"requests logged more than once: {report.logged_twice[:10]}")
    # A deadline that passes before the server picks the call up (the deadline and constrained kinds
    # set short ones): it never reached the server.
    unseen = [(i, kind, code) for i, kind, code in report.never_logged if code != "DEADLINE_EXCEEDED"]
    if unseen:
        problems.append(f"requests the server never logged: {unseen[:10]}")
    if report.exit_code != 0:
        problems.append(f"the server exited with {report.exit_code}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
