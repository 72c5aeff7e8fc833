"""What constrained decoding costs a batch: 32 streams, 8 of them constrained to a realistic JSON schema,
against the same 32 streams unconstrained (`make bench-constrained`); then 32 rows of which 8 are two
beam-4 requests, constrained to the schema or not (each beam has a matcher of its own, copied from its
parent's at every step).

In this process, on the server's own runtime and engine (engine_only.load): 32 requests are kept
running (a finished one is replaced at once). Only decode steps with all 32 rows are compared, so
that prompt chunks of newly joined requests do not blur the per-step cost. The modes alternate
(free, constrained, free, constrained) against drift on a shared machine. Reported: the step time
ratio, and the grammar thread's mask time per step with how much of it the sampler waited for
after the forward (the rest ran while the model did).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine_only  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "name": {"type": "string", "maxLength": 24},
        "email": {"type": "string", "maxLength": 32},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.5},
        "city": {"type": "string", "maxLength": 20},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "orders": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "additionalProperties": False, "required": ["sku", "qty"],
            "properties": {"sku": {"type": "string", "maxLength": 8}, "qty": {"type": "integer", "minimum": 1,
                                                                             "maximum": 50}}}},
    },
    "required": ["id", "name", "email", "age", "active", "role", "score", "city", "tags", "orders"],
    "additionalProperties": False,
}
STREAMS, CONSTRAINED = 32, 8  # rows; the beam runs hold CONSTRAINED rows as CONSTRAINED // BEAM_WIDTH requests
BEAM_WIDTH = 4


class Run:
    def __init__(self, runtime, thread, constrained: int, seed: int, beams: bool = False):
        from tokenloom.front.preprocessor import UserInput
        from tokenloom.front.validation import RawParams
        from tokenloom.request import Constraint

        self.runtime, self.thread = runtime, thread
        self.user, self.raw = UserInput, RawParams
        self.constraint = Constraint("json_schema", json.dumps(SCHEMA))
        self.rng = random.Random(seed)
        self.live: dict[str, bool] = {}
        self.engine = runtime.engine(self._publish)
        self.constrained = constrained
        self.beams = beams  # the special rows are two beam-4 requests (constrained when `constrained`)
        self.step_seconds: list[float] = []
        runner = self.engine.executor
        self._execute = runner.execute
        runner.execute = self._timed_execute
        self._decode_step = False

    def _timed_execute(self, batch):
        self._decode_step = len(batch.rows) == STREAMS and batch.num_tokens == STREAMS
        return self._execute(batch)

    def _publish(self, events):
        for e in events:
            if e.final:
                self.live.pop(e.request_id, None)

    def _submit(self, special: bool) -> None:
        ids = tuple(self.rng.randrange(200, 40000) for _ in range(self.rng.randint(24, 64)))
        constrained = special and bool(self.constrained)
        if special and self.beams:
            params = dict(max_new_tokens=200, num_beams=BEAM_WIDTH)
        else:
            params = dict(max_new_tokens=200 if constrained else 64, ignore_eos=not constrained, do_sample=True,
                          temperature=0.8, seed=self.rng.randrange(2**32))
        request = self.runtime.preprocessor(self.user(input_ids=ids),
                                            self.raw(constraint=self.constraint if constrained else None, **params))
        self.live[request.request_id] = special
        self.engine.submit(request)

    def run(self, decode_steps: int) -> None:
        special_rows = BEAM_WIDTH if self.beams else 1
        wanted = CONSTRAINED // special_rows if self.beams or self.constrained else 0
        while len(self.step_seconds) < decode_steps:
            kinds = list(self.live.values())
            for _ in range(wanted - sum(kinds)):
                self._submit(True)
            for _ in range(STREAMS - wanted * special_rows - (len(kinds) - sum(kinds))):
                self._submit(False)
            started = time.perf_counter()
            self.thread.call(self.engine.run_once)
            if self._decode_step:
                self.step_seconds.append(time.perf_counter() - started)


def _compare(runtime, thread, steps: int, beams: bool) -> dict:
    """Free and constrained runs, alternating, twice; the median decode steps and the mask costs."""
    grammars = runtime.grammars
    label = "beam-4" if beams else "sampled"
    results = {"free": [], "constrained": []}
    fill = wait = masks = 0.0
    for round_ in range(2):
        for mode in ("free", "constrained"):
            before = (grammars.stats.masks, grammars.stats.fill_seconds, grammars.stats.wait_seconds)
            run = Run(runtime, thread, CONSTRAINED if mode == "constrained" else 0, seed=round_, beams=beams)
            run.run(steps)
            results[mode] += run.step_seconds
            print(f"{label} {mode:>11} round {round_ + 1}: decode step of {STREAMS} rows, median "
                  f"{statistics.median(run.step_seconds) * 1000:.1f} ms over {len(run.step_seconds)} steps",
                  flush=True)
            if mode == "constrained":
                masks += grammars.stats.masks - before[0]
                fill += grammars.stats.fill_seconds - before[1]
                wait += grammars.stats.wait_seconds - before[2]
            while run.live:  # finish what is left before the next run takes the KV store
                thread.call(run.engine.run_once)
    free, constrained = statistics.median(results["free"]), statistics.median(results["constrained"])
    n = len(results["constrained"])
    summary = {
        "free_step_ms": free * 1000, "constrained_step_ms": constrained * 1000, "ratio": constrained / free,
        "masks": int(masks), "mask_fill_us": fill / max(masks, 1) * 1e6,
        "mask_fill_ms_per_step": fill / n * 1000, "mask_wait_ms_per_step": wait / n * 1000,
        "overlapped": 1 - wait / fill if fill else None,
    }
    print(f"{label}: constrained / free decode step: {summary['ratio']:.3f}× ({constrained * 1000:.1f} vs "
          f"{free * 1000:.1f} ms, target ≤ 1.10×); masks: {summary['mask_fill_us']:.0f} µs each, "
          f"{summary['mask_fill_ms_per_step']:.2f} ms per step, of which the sampler waited "
          f"{summary['mask_wait_ms_per_step']:.2f} ms ({summary['overlapped']:.0%} overlapped the forward)", flush=True)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, default=120, help="decode steps of 32 rows measured per run")
    p.add_argument("--server-args", default="--no-prefix-caching --max-num-seqs 32")
    p.add_argument("--out", type=Path, default=Path(".bench/constrained.json"))
    a = p.parse_args(argv)
    runtime, thread = engine_only.load(a.model, a.server_args.split())
    summary = {"streams": STREAMS, "constrained": CONSTRAINED}
    for beams in (False, True):
        summary["beams" if beams else "sampled"] = _compare(runtime, thread, a.steps, beams)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
