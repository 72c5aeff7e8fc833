"""The bench's output: a table on stdout (and in Markdown), results.json, and PNG plots.

CPU is the share of all cores the system's processes used while it ran (server and client
for gRPC runs): well under 100 % for a batched system means another job took the machine.

`runs` are dicts: {"system", "label", "concurrency", "summary" (results.summarize), "latencies"}.
"""

from __future__ import annotations

import json
from pathlib import Path

SEQUENTIAL = "hf_sequential"
NAMES = {
    "tokenloom": "tokenloom (gRPC)",
    "tokenloom_poisson": "tokenloom (gRPC, Poisson)",
    "tokenloom_http": "tokenloom (HTTP, openai client)",
    "engine": "tokenloom engine only",
    SEQUENTIAL: "HF generate, one at a time",
    "hf_static": "HF generate, static batches",
    "hf_continuous": "transformers continuous batching",
}
COLUMNS = ("system", "streams", "reqs", "gen tok/s", "steady tok/s", "req/s", "TTFT p50/p90/p99 ms",
           "ITL p50/p90/p99 ms", "× seq", "CPU")


def _f(value, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _row(run: dict, base: float | None) -> tuple[str, ...]:
    s = run["summary"]
    ratio = s["tok_per_s"] / base if base else None
    return (
        run["label"],
        str(run["concurrency"]) if run["concurrency"] else f"{run.get('rate', '?')}/s",
        f"{s['requests'] - s['errors']}" + (f" ({s['errors']} err)" if s["errors"] else ""),
        _f(s["tok_per_s"], 1),
        _f(s["steady_tok_per_s"], 1),
        _f(s["req_per_s"], 2),
        "/".join(_f(s[f"ttft_p{q}_ms"]) for q in (50, 90, 99)),
        "/".join(_f(s[f"itl_p{q}_ms"]) for q in (50, 90, 99)),
        _f(ratio, 2) + "×" if ratio else "–",
        f"{s['cpu_util']:.0%}" if s.get("cpu_util") is not None else "–",
    )


def sequential_rate(runs: list[dict]) -> float | None:
    return next((r["summary"]["tok_per_s"] for r in runs if r["system"] == SEQUENTIAL), None)


def table(runs: list[dict], markdown: bool = False) -> str:
    base = sequential_rate(runs)
    rows = [COLUMNS] + [_row(r, base) for r in runs]
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(rows[0]), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows[1:]])


def targets_text(targets: list[dict], markdown: bool = False) -> str:
    lines = []
    for t in targets:
        verdict = "n/a" if t["ok"] is None else ("PASS" if t["ok"] else "MISS")
        lines.append(f"{'- ' if markdown else ''}{verdict:4}  {t['name']}: {t['measured']}")
    return "\n".join(lines)


def write_json(path: Path, body: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2, default=str))


def plot(runs: list[dict], out_dir: Path, cdf_concurrency: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "throughput.png", out_dir / "latency_cdf.png"]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in [s for s in NAMES if s not in (SEQUENTIAL, "tokenloom_poisson")]:
        points = sorted((r["concurrency"], r["summary"]["tok_per_s"]) for r in runs
                        if r["system"] == system and r["concurrency"])
        if points:
            ax.plot(*zip(*points), marker="o", label=NAMES[system])
    base = sequential_rate(runs)
    if base:
        ax.axhline(base, color="grey", linestyle="--", label=NAMES[SEQUENTIAL])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Throughput vs concurrency (mixed workload)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    chosen = [r for r in runs if r["concurrency"] == cdf_concurrency or r["system"] == "tokenloom_poisson"
              or (r["system"] in ("tokenloom", SEQUENTIAL) and r["concurrency"] == 1)]
    for ax, key, title in zip(axes, ("ttft_ms", "itl_ms"), ("time to first token", "inter-token latency")):
        for r in chosen:
            values = r["latencies"][key]
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                label = f"{r['label']} ({r['concurrency'] or str(r.get('rate')) + '/s'})"
                ax.step(values, ys, where="post", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
