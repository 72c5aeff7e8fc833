"""Where one decode step's time goes: `make profile` (or `python tests/bench/step_profile.py`).

Fills the engine with ROWS requests whose prompts are CONTEXT tokens long, lets every prefill finish,
then times STEPS decode steps (every row one new token) and splits them with timers around the
model's linear layers, its attention function (the KV write plus the decode kernel or gather + SDPA)
and the sampler; the rest is norms, rotary embeddings, batch building and bookkeeping. Run it alone on a quiet machine: on a 2-core box another busy
process doubles the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF dir")
    p.add_argument("--rows", type=int, default=64, help="decode rows in every step (default 64)")
    p.add_argument("--context", type=int, default=300, help="prompt tokens per row (default 300)")
    p.add_argument("--steps", type=int, default=20, help="decode steps to time (default 20)")
    p.add_argument("--server-args", default="", help="extra `python -m tokenloom` flags, e.g. '--attention-kernel torch'")
    return p.parse_args(argv)


def _time_linears(model):
    """One timer around every nn.Linear's forward (packed oneDNN or plain)."""
    import torch

    timer = _Total()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = _Counted(timer, module.forward)
    return timer


def _time_attention():
    """Re-registers tokenloom's attention function under its name with a timer around it (HF looks the
    function up by name at every layer call)."""
    import transformers

    from tokenloom.executor import attention

    timer = _Total()
    transformers.AttentionInterface.register(attention.ATTENTION_NAME, _Counted(timer, attention.paged_attention))
    return timer


class _Total:
    seconds = 0.0


class _Counted:
    """Calls `inner` and adds its time to a total shared by many wrapped callables."""

    def __init__(self, timer, inner):
        self.timer, self.inner = timer, inner

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.timer.seconds += time.perf_counter() - started


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    import engine_only
    from tokenloom.executor.models import ensure_default_model
    from tokenloom.front.preprocessor import UserInput
    from tokenloom.front.validation import RawParams

    model_dir = ensure_default_model() if args.model == "default" else Path(args.model)
    server_args = ["--max-num-seqs", str(max(args.rows, 64)), *args.server_args.split()]
    runtime = engine_only.load(model_dir, server_args)
    started_rows: set[str] = set()  # requests with a first token: their prompt is in the cache
    engine = runtime.engine(lambda events: started_rows.update(e.request_id for e in events if e.token_ids))
    sampler = engine.sampler = engine_only._Timed(engine.sampler)
    vocab = runtime.served.vocab_size
    generator = torch.Generator().manual_seed(0)
    for _ in range(args.rows):
        ids = torch.randint(100, vocab - 100, (args.context,), generator=generator).tolist()
        params = RawParams(max_new_tokens=args.steps + 64, ignore_eos=True)
        engine.submit(runtime.preprocessor(UserInput(input_ids=ids), params))

    print(f"prefilling {args.rows} prompts of {args.context} tokens ...", file=sys.stderr)
    while len(started_rows) < args.rows:
        engine.run_once()

    linears, attention = _time_linears(engine.runner.model), _time_attention()
    timers = (linears, attention, sampler)
    for timer in timers:
        timer.seconds = 0.0
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        engine.run_once()
        times.append(time.perf_counter() - started)
    total, median = sum(times), statistics.median(times)
    kernel = "C++ kernel" if engine.runner.decode_kernel is not None else "gather + SDPA"
    print(f"\n{args.rows} decode rows, ~{args.context} tokens of context, attention: {kernel}")
    print(f"step: median {median * 1e3:.0f} ms over {args.steps} steps ({args.rows / median:.0f} generated tok/s)")
    rest = total - sum(t.seconds for t in timers)
    for name, seconds in (("linears", linears.seconds), ("attention", attention.seconds),
                          ("sampling", sampler.seconds), ("everything else", rest)):
        print(f"  {name:<16} {seconds / args.steps * 1e3:7.1f} ms per step  {seconds / total:6.1%}")
    engine.stop()


if __name__ == "__main__":
    main()
