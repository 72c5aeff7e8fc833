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
    p.add_argument("--model", default="default", help="'default' (the embedded SmolLM2-135M-Instruct, served as "
                   "`make serve` serves it) or a local HF dir")
    p.add_argument("--rows", type=int, default=64, help="decode rows in every step (default 64)")
    p.add_argument("--context", type=int, default=300, help="prompt tokens per row (default 300)")
    p.add_argument("--steps", type=int, default=20, help="decode steps to time (default 20)")
    p.add_argument("--server-args", default="", help="extra `python -m tokenloom` flags, e.g. '--attention-kernel torch'")
    return p.parse_args(argv)


def _time_linears(model):
    """One timer around every linear layer: the HF model's nn.Linear forwards, or the native model's
    linears (dense, packed or quantized), including the LM head."""
    import torch

    timer = _Total()
    if hasattr(model, "layers"):  # native: each layer is a NamedTuple holding its linears (callables with add)
        model.layers = [layer._replace(**{f: _Counted(timer, v) for f, v in layer._asdict().items()
                                           if callable(v) and hasattr(v, "add")}) for layer in model.layers]
        model.lm_head = _Counted(timer, model.lm_head)
        return timer
    for module in model.model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = _Counted(timer, module.forward)
    return timer


def _time_attention(model):
    """A timer around the attention: the function the native models call for it, or the one HF looks
    up by name at every layer call (re-registered with the timer)."""
    import transformers

    from tokenloom.executor import attention
    from tokenloom.executor.native import gpt2, llama

    timer = _Total()
    if hasattr(model, "layers"):
        for family in (llama, gpt2):
            family.attend = _Counted(timer, attention.attend)
    else:
        transformers.AttentionInterface.register(attention.ATTENTION_NAME, _Counted(timer, attention.paged_attention))
    return timer


class _Total:
    seconds = 0.0


class _Counted:
    """Calls `inner` (or its `add`, the residual form of a native linear) and adds its time to a total
    shared by many wrapped callables."""

    def __init__(self, timer, inner):
        self.timer, self.inner = timer, inner

    def __call__(self, *args, **kwargs):
        return self._timed(self.inner, *args, **kwargs)

    def add(self, *args):
        return self._timed(self.inner.add, *args)

    def _timed(self, fn, *args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.timer.seconds += time.perf_counter() - started


def main(argv=None) -> None:
    args = parse_args(argv)
    import engine_only

    server_args = ["--max-num-seqs", str(max(args.rows, 64)), *args.server_args.split()]
    runtime, thread = engine_only.load(args.model, server_args)
    # On the thread that loaded the model, as the server steps (engine/engine_thread.py).
    thread.call(profile, runtime, args)


def profile(runtime, args) -> None:
    import torch

    import engine_only
    from tokenloom.front.preprocessor import UserInput
    from tokenloom.front.validation import RawParams

    started_rows: set[str] = set()  # requests with a first token: their prompt is in the cache
    engine = runtime.engine(lambda events: started_rows.update(e.request_id for e in events if e.token_ids))
    executor = engine.executor
    sampler = executor.sampler = engine_only._Timed(executor.sampler)
    vocab = runtime.served.vocab_size
    generator = torch.Generator().manual_seed(0)
    for _ in range(args.rows):
        ids = torch.randint(100, vocab - 100, (args.context,), generator=generator).tolist()
        params = RawParams(max_new_tokens=args.steps + 64, ignore_eos=True)
        engine.submit(runtime.preprocessor(UserInput(input_ids=ids), params))

    print(f"prefilling {args.rows} prompts of {args.context} tokens ...", file=sys.stderr)
    while len(started_rows) < args.rows:
        engine.run_once()

    linears, attention = _time_linears(executor.model), _time_attention(executor.model)
    timers = (linears, attention, sampler)
    for timer in timers:
        timer.seconds = 0.0
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        engine.run_once()
        times.append(time.perf_counter() - started)
    total, median = sum(times), statistics.median(times)
    kernel = "C++ kernel" if executor.decode_kernel is not None else "gather + SDPA"
    model = runtime.model
    print(f"\n{args.rows} decode rows, ~{args.context} tokens of context; {model.impl} model code, "
          f"quantization {model.quantization}, decode attention: {kernel}")
    print(f"step: median {median * 1e3:.1f} ms over {args.steps} steps ({args.rows / median:.0f} generated tok/s)")
    rest = total - sum(t.seconds for t in timers)
    for name, seconds in (("linears", linears.seconds), ("attention", attention.seconds),
                          ("sampling", sampler.seconds), ("everything else", rest)):
        print(f"  {name:<16} {seconds / args.steps * 1e3:7.1f} ms per step  {seconds / total:6.1%}")


if __name__ == "__main__":
    main()
