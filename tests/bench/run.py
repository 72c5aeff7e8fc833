"""`make bench`: tokenloom under load over real gRPC against HF baselines, on the same requests, in one run.

    python tests/bench/run.py [--quick] [--concurrency 1 8 32 64] [--rate 1.0] [--server-args "..."]

Phases, one after another (never two systems at once): a server started as a user starts it
(`python -m tokenloom`), a closed-loop sweep over the concurrency levels (the largest twice, for
memory), unloaded TTFT and chunked-prefill probes, concurrent beam-4 requests, Poisson open-loop
runs (--rate); then the engine alone in this process (no gRPC); then HF `generate` one request at a time, on static
batches, and transformers' continuous batching. Level C runs the workload's first
max(waves × C, --min-requests) requests, on every system. Writes OUT/results.json,
OUT/results.md, OUT/throughput.png, OUT/latency_cdf.png, OUT/workload.json and the server's log
in OUT/logs (OUT: --out, default .bench, or .bench/quick with --quick).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent), str(ROOT / "server"), str(ROOT / "client")]

from tqdm import tqdm  # noqa: E402

import loadgen  # noqa: E402
import probes  # noqa: E402
import report  # noqa: E402
import targets  # noqa: E402
import workload  # noqa: E402
from process_stats import CpuClock, RssSampler, kv_store_bytes, rss_bytes, rss_parts, weights_bytes  # noqa: E402
from results import latencies, summarize  # noqa: E402
from server_process import ServerProcess  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct fp32) or a local HF dir")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (~2 min): levels 1 8 32, one wave each, prompts ≤ 64 and outputs ≤ 32 tokens")
    p.add_argument("--workload", type=Path, help="workload JSON: loaded if it exists, else built with --seed and saved")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--concurrency", type=int, nargs="+", help="closed-loop levels (default 1 8 32 64; --quick 1 8 32)")
    p.add_argument("--waves", type=int, help="requests per level = waves × level (default 2; --quick 1)")
    p.add_argument("--min-requests", type=int, help="at least this many requests per level (default 8; --quick 2)")
    p.add_argument("--rate", type=float, nargs="*", default=None,
                   help="open-loop Poisson runs at these request rates per second (default 1.0; --quick none)")
    p.add_argument("--rate-requests", type=int, default=48, help="requests per Poisson run")
    p.add_argument("--server-args", default="", help="extra flags for `python -m tokenloom` (and the engine-only run)")
    p.add_argument("--skip", nargs="*", default=[], choices=["probes", "engine", "http", "sequential", "static", "continuous"],
                   help="phases to leave out")
    p.add_argument("--sequential-budget", type=float, help="seconds for HF one at a time (default 90; --quick 20)")
    p.add_argument("--static-budget", type=float, help="seconds per static-batch level (default 150; --quick 40)")
    p.add_argument("--continuous-budget", type=float, help="seconds per continuous-batching level (default 120; --quick 40)")
    p.add_argument("--beam-requests", type=int,
                   help="concurrent beam-4 requests over gRPC vs HF generate(num_beams=4) (default 8; --quick 4; 0 skips)")
    p.add_argument("--beam-baseline-requests", type=int, default=2, help="of those, how many HF runs one at a time")
    p.add_argument("--memory-runs", type=int, default=2,
                   help="closed-loop runs at the largest level (RSS after each; must not grow)")
    p.add_argument("--out", type=Path, help="output folder (default .bench; --quick .bench/quick)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"concurrency": ([1, 8, 32, 64], [1, 8, 32]), "waves": (2, 1), "min_requests": (8, 2),
                "rate": ([1.0], []), "sequential_budget": (90, 20), "static_budget": (150, 40),
                "continuous_budget": (120, 40), "beam_requests": (8, 4),
                "out": (ROOT / ".bench", ROOT / ".bench" / "quick")}
    for name, (full, short) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    return args


# Each system keeps both cores ~70-100 % busy on a quiet machine (HF runs ~100 %); far less means
# it shared them with another job.
STARVED_CPU_SHARE = 0.6


def level_size(args, c: int) -> int:
    return max(args.waves * c, args.min_requests)


def warm_up_requests(requests: list, n: int) -> list:
    """The first `n` requests cut to 4 new tokens: every system runs them untimed before a level."""
    return [replace(r, max_new_tokens=4) for r in requests[:n]]


def _noop(_: int) -> None:
    pass


class Bench:
    def __init__(self, args):
        from tokenloom.executor.models import ensure_default_model
        from transformers import AutoTokenizer

        self.args = args
        self.model_dir = ensure_default_model() if args.model == "default" else Path(args.model)
        # What the server is given: "default" serves the embedded model as `make serve` does (its GGUF
        # blocks); the converted directory would be served as a plain fp32 checkpoint.
        self.server_model = "default" if args.model == "default" else str(self.model_dir)
        self.server_args = shlex.split(args.server_args)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.requests = self._workload()
        self.runs: list[dict] = []
        self.probes: dict = {}
        self.memory: dict = {}
        self.engine_breakdown: dict = {}
        self.beam: dict = {}

    def _workload(self) -> list:
        a = self.args
        n = max([level_size(a, c) for c in a.concurrency] + [a.rate_requests if a.rate else 0])
        if a.workload and a.workload.exists():
            requests = workload.load(a.workload)
            if len(requests) < n:
                sys.exit(f"{a.workload} holds {len(requests)} requests; this run needs {n}")
            return requests
        spec = workload.WorkloadSpec(num_requests=n, seed=a.seed, prompt_tokens=(16, 64) if a.quick else (16, 512),
                                     new_tokens=(16, 32) if a.quick else (16, 256))
        requests = workload.build(spec, self.tokenizer)
        workload.save(a.workload or a.out / "workload.json", spec, requests)
        return requests

    def beam_requests(self) -> list:
        """The old bench's beam comparison: the first requests' prompts as beam-4 requests, 64 new tokens."""
        tokens = 16 if self.args.quick else 64
        return [replace(r, mode="beam", num_beams=4, max_new_tokens=tokens, index=-1000 - i)
                for i, r in enumerate(self.requests[:self.args.beam_requests])]

    def server_flag(self, name: str):
        from tokenloom.__main__ import parser

        return getattr(parser().parse_args(["--model", self.server_model, *self.server_args]), name)

    def record(self, system: str, concurrency: int | None, results, t0, t1, cpu_s: float, **extra) -> dict:
        summary = summarize(results, t0, t1, concurrency)
        # ignore_eos: every request that ended well must have brought exactly its max_new_tokens.
        by_index = {r.index: r for r in self.requests}
        summary["expected_tokens"] = sum(by_index[r.index].max_new_tokens for r in results
                                         if not r.error and r.index in by_index)
        if summary["expected_tokens"] != summary["tokens"]:
            tqdm.write(f"  WARNING: {report.NAMES[system]} @ {concurrency}: received {summary['tokens']} tokens, "
                       f"expected {summary['expected_tokens']}")
        summary["cpu_util"] = cpu_s / max(t1 - t0, 1e-9) / (os.cpu_count() or 1)
        summary["load_average"] = os.getloadavg()[0]
        run = {"system": system, "label": report.NAMES[system], "concurrency": concurrency,
               "summary": summary, "latencies": latencies(results), **extra}
        self.runs.append(run)
        s = summary
        tqdm.write(f"  {run['label']} @ {concurrency or str(extra.get('rate')) + '/s'}: {s['tok_per_s']:.1f} tok/s, "
                   f"TTFT p50 {report._f(s['ttft_p50_ms'])} ms, ITL p50 {report._f(s['itl_p50_ms'])} ms, "
                   f"CPU {s['cpu_util']:.0%} of {os.cpu_count()} cores, load {s['load_average']:.1f}"
                   + (f", {s['errors']} errors ({s['first_error']})" if s["errors"] else ""))
        return run

    @staticmethod
    def bar(desc: str, requests) -> tqdm:
        return tqdm(total=sum(r.max_new_tokens for r in requests), desc=desc, unit="tok", leave=False,
                    dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

    # -- over gRPC ---------------------------------------------------------------------------

    def served(self) -> None:
        a = self.args
        logs = a.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        server = ServerProcess(self.server_model, *self.server_args, log_dir=logs, name="bench").start()
        try:
            server.wait_ready()
            with RssSampler(server.proc.pid) as rss:
                self._served_phases(server, rss)
            self.memory["kv_store"] = kv_store_bytes(server.log_tail(10**7), self.model_dir,
                                                     self.server_flag("kv_cache_tokens"), self.server_flag("dtype"))
        finally:
            server.stop()

    def _served_phases(self, server: ServerProcess, rss: RssSampler) -> None:
        a, address, pid = self.args, server.address, server.proc.pid
        loadgen.closed_loop(address, warm_up_requests(self.requests, 8), 4, _noop)
        self.memory.update(weights=weights_bytes(self.model_dir), idle=rss_parts(pid), after_runs=[])
        self.memory["idle_rss"] = self.memory["idle"]["VmRSS"]
        largest = max(a.concurrency)
        for c in sorted(a.concurrency) + [largest] * (a.memory_runs - 1):
            repeat = any(r["system"] == "tokenloom" and r["concurrency"] == c for r in self.runs)
            reqs = self.requests[:level_size(a, c)]
            if not repeat:
                loadgen.closed_loop(address, warm_up_requests(reqs, c), c, _noop)
            rss.reset()
            with self.bar(f"tokenloom c={c}{' again' if repeat else ''}", reqs) as bar, CpuClock(pid) as cpu:
                results, t0, t1 = loadgen.closed_loop(address, reqs, c, bar.update)
            if c == largest:
                peak = rss.peak()
                time.sleep(1.0)
                self.memory.update(streams=c, peak_rss=max(peak, self.memory.get("peak_rss", 0)))
                self.memory["after_runs"].append(rss_bytes(pid))
            if repeat:
                self.memory.setdefault("repeats", []).append(summarize(results, t0, t1, c))
            else:
                self.record("tokenloom", c, results, t0, t1, cpu.seconds)
            if c == targets.TARGET_STREAMS and not repeat and "http" not in a.skip:
                loadgen.closed_loop_http(server.http_url, warm_up_requests(reqs, c), c, _noop)
                with self.bar(f"tokenloom HTTP c={c}", reqs) as bar, CpuClock(pid) as cpu:
                    results, t0, t1 = loadgen.closed_loop_http(server.http_url, reqs, c, bar.update)
                self.record("tokenloom_http", c, results, t0, t1, cpu.seconds)
        self.memory["after"] = rss_parts(pid)
        if "probes" not in a.skip:
            self._probes(address)
        if a.beam_requests:
            reqs = self.beam_requests()
            loadgen.closed_loop(address, warm_up_requests(reqs, len(reqs)), len(reqs), _noop)
            results, t0, t1 = loadgen.closed_loop(address, reqs, len(reqs), _noop)
            self.beam["tokenloom"] = summarize(results, t0, t1, len(reqs))
            tqdm.write(f"  tokenloom, {len(reqs)} concurrent beam-{reqs[0].num_beams} requests: "
                       f"{self.beam['tokenloom']['req_per_s']:.3f} req/s")
        for rate in a.rate:
            reqs = [self.requests[i % len(self.requests)] for i in range(a.rate_requests)]
            with self.bar(f"tokenloom Poisson {rate}/s", reqs) as bar, CpuClock(pid) as cpu:
                results, t0, t1 = loadgen.open_loop(address, reqs, rate, a.seed, bar.update)
            self.record("tokenloom_poisson", None, results, t0, t1, cpu.seconds, rate=rate)

    def _probes(self, address: str) -> None:
        a = self.args
        target = targets.TARGET_STREAMS if targets.TARGET_STREAMS in a.concurrency else max(a.concurrency)
        reqs = self.requests[:level_size(a, target)]
        tqdm.write(f"probe: unloaded TTFT of the {len(reqs)} requests of level {target}, one at a time")
        self.probes["unloaded_ttft"] = {"streams": target, **probes.unloaded_ttft(address, reqs)}
        rng = random.Random(a.seed + 1)
        decode_tokens = 64 if a.quick else 256
        decoders = [workload.Request(-1 - i, workload.prompt_ids(rng, self.tokenizer, rng.randint(16, 32)),
                                     decode_tokens, "greedy") for i in range(target - 1)]
        long = workload.Request(-100, workload.prompt_ids(rng, self.tokenizer, 512), 2, "greedy")
        chunk_tokens = self.server_flag("max_num_batched_tokens")
        chunk = workload.Request(-101, workload.prompt_ids(rng, self.tokenizer, chunk_tokens), 1, "greedy")
        tqdm.write(f"probe: a 512-token prompt joining {len(decoders)} decoding streams "
                   f"(--max-num-batched-tokens {chunk_tokens})")
        self.probes["chunked_prefill"] = probes.chunked_prefill(address, decoders, long, chunk,
                                                                repeats=1 if a.quick else 3)

    # -- in this process -----------------------------------------------------------------------

    def engine_only(self) -> None:
        import engine_only

        levels = [c for c in self.args.concurrency if c == targets.TARGET_STREAMS] or [max(self.args.concurrency)]
        tqdm.write("engine only: loading the runtime in this process")
        driver = engine_only.EngineDriver(*engine_only.load(self.server_model, self.server_args, self.torch_thread))
        try:
            for c in levels:
                reqs = self.requests[:level_size(self.args, c)]
                driver.closed_loop(warm_up_requests(reqs, c), c, _noop)
                with self.bar(f"engine only c={c}", reqs) as bar, CpuClock() as cpu:
                    results, t0, t1, breakdown = driver.closed_loop(reqs, c, bar.update)
                self.record("engine", c, results, t0, t1, cpu.seconds, breakdown=breakdown)
                self.engine_breakdown[c] = breakdown
        finally:
            driver.stop()
            del driver
            gc.collect()

    def hf(self) -> None:
        import baselines

        a = self.args
        model = baselines.load_model(self.model_dir, self.server_flag("device"), self.server_flag("dtype"))
        levels = [c for c in sorted(a.concurrency) if c > 1]
        baselines.warm_up(model, [1] + levels)
        if "sequential" not in a.skip:
            reqs = self.requests[:level_size(a, 1)]
            with self.bar("HF generate, one at a time", reqs) as bar, CpuClock() as cpu:
                results, t0, t1 = baselines.sequential(model, reqs, a.sequential_budget, bar.update)
            self.record("hf_sequential", 1, results, t0, t1, cpu.seconds)
        if a.beam_requests and a.beam_baseline_requests:
            reqs = self.beam_requests()[:a.beam_baseline_requests]
            results, t0, t1 = baselines.sequential(model, reqs, a.sequential_budget, _noop)
            self.beam["hf_sequential"] = summarize(results, t0, t1, 1)
            tqdm.write(f"  HF generate(num_beams={reqs[0].num_beams}), one at a time: "
                       f"{self.beam['hf_sequential']['req_per_s']:.3f} req/s")
        if "static" not in a.skip:
            for c in levels:
                reqs = self.requests[:level_size(a, c)]
                with self.bar(f"HF static batches of {c}", reqs) as bar, CpuClock() as cpu:
                    results, t0, t1 = baselines.static(model, reqs, c, a.static_budget, bar.update)
                self.record("hf_static", c, results, t0, t1, cpu.seconds)
        del model
        gc.collect()
        if "continuous" not in a.skip:
            budget_tokens = self.server_flag("max_num_batched_tokens")
            for c in levels:
                reqs = self.requests[:level_size(a, c)]
                with self.bar(f"transformers continuous batching c={c}", reqs) as bar:
                    results, t0, t1, cpu_s = baselines.continuous(
                        self.model_dir, reqs, c, budget_tokens, a.continuous_budget, bar.update,
                        self.server_flag("device"), self.server_flag("dtype"))
                self.record("hf_continuous", c, results, t0, t1, cpu_s)
                gc.collect()

    # -- output --------------------------------------------------------------------------------

    def finish(self, started: float, load_before: tuple) -> int:
        import torch
        import transformers

        a = self.args
        order = list(report.NAMES)
        self.runs.sort(key=lambda r: (order.index(r["system"]), r["concurrency"] or 0, r.get("rate") or 0))
        checks = targets.check(self.runs, self.probes, self.memory)
        machine = {
            "cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
        }
        body = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "seconds": time.time() - started,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
            "model": str(self.model_dir), "machine": machine, "workload": workload.describe(self.requests),
            "levels": {c: level_size(a, c) for c in a.concurrency},
            "runs": self.runs, "probes": self.probes, "memory": self.memory,
            "engine_breakdown": self.engine_breakdown, "beam": self.beam, "targets": checks,
        }
        report.write_json(a.out / "results.json", body)
        plots = report.plot(self.runs, a.out, targets.TARGET_STREAMS)
        text = report.table(self.runs)
        md = "\n\n".join([report.table(self.runs, markdown=True), report.targets_text(checks, markdown=True)])
        (a.out / "results.md").write_text(md + "\n")
        print(f"\n{text}\n\ntargets:\n{report.targets_text(checks)}")
        for c, b in self.engine_breakdown.items():
            print(f"\nengine only at {c} streams: {b['wall_s']:.1f} s, of which model forward {b['forward_s']:.1f} s, "
                  f"sampling {b['sample_s']:.1f} s, scheduling {b['schedule_s']:.2f} s")
        starved = [f"{r['label']} @ {r['concurrency'] or r.get('rate')}" for r in self.runs
                   if r["summary"]["cpu_util"] < STARVED_CPU_SHARE]
        if starved:
            print(f"\nWARNING: these runs used less than {STARVED_CPU_SHARE:.0%} of the cores, so another job was "
                  f"probably using the machine; their numbers are unreliable: {'; '.join(starved)}")
        if "tokenloom" in self.beam and "hf_sequential" in self.beam:
            ours, hf = self.beam["tokenloom"]["req_per_s"], self.beam["hf_sequential"]["req_per_s"]
            print(f"\nbeam search: {self.beam['tokenloom']['requests']} concurrent num_beams=4 requests at {ours:.3f} "
                  f"requests/s vs {hf:.3f} for HF generate(num_beams=4) one at a time: {ours / hf:.2f}×")
        print(f"\nload average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} "
              f"({machine['cores']} cores); {time.time() - started:.0f} s in all")
        print(f"wrote {a.out / 'results.json'}, {a.out / 'results.md'}, " + ", ".join(str(p) for p in plots))
        return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    args = parse_args(argv)
    started, load_before = time.time(), os.getloadavg()
    bench = Bench(args)
    info = workload.describe(bench.requests)
    print(f"workload: {info['requests']} requests {info['modes']}, mean prompt {info['mean_prompt_tokens']:.0f} "
          f"tokens, mean output {info['mean_new_tokens']:.0f} tokens; levels "
          + ", ".join(f"{c}: {level_size(args, c)} requests" for c in args.concurrency), flush=True)
    bench.served()
    # Every torch op of this process on one thread, as in the server (engine/engine_thread.py): a
    # second OpenMP team would slow whichever system runs second.
    from tokenloom.engine.engine_thread import EngineThread

    bench.torch_thread = EngineThread("bench-torch")
    if "engine" not in args.skip:
        bench.engine_only()
    bench.torch_thread.call(bench.hf)
    return bench.finish(started, load_before)


if __name__ == "__main__":
    sys.exit(main())
