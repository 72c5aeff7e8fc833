"""One decode step of the native model code against the HF modules: `python tests/bench/native_step.py`.

Three paths run the same model (default: SmolLM2-135M-Instruct) in fp32 with oneDNN linears and the
C++ decode kernel, on the same packed decode batch (ROWS rows, contexts drawn from 100-300 tokens,
random KV), in this process's main thread: `hf` (the HF modules), `native` (native/, with its C++
elementwise kernels) and `native-torch` (native/ with torch ops only). Steps alternate between the
paths, so that load from other processes falls on all alike; the medians are printed. A second pass
puts timers around the linear layers and the attention function and splits each step into linears,
attention and the rest (norms, rotary, residuals, embedding, dispatch). Llama-family models only.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF dir")
    p.add_argument("--rows", default="1,8,32,64", help="decode rows per step, comma-separated")
    p.add_argument("--steps", type=int, default=30, help="timed steps per path and row count")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    p.add_argument("--no-split", action="store_true", help="skip the timed split into linears/attention/rest")
    return p.parse_args(argv)


class Timer:
    seconds = 0.0


class Timed:
    """A linear (or the attention function) that adds its time to a shared total."""

    def __init__(self, timer: Timer, inner):
        self.timer, self.inner = timer, inner

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.timer.seconds += time.perf_counter() - started

    def add(self, x, residual):
        started = time.perf_counter()
        try:
            return self.inner.add(x, residual)
        finally:
            self.timer.seconds += time.perf_counter() - started


def decode_step(rows: int, cache, kernel, vocab: int, seed: int = 0):
    """input_ids, positions, batch and logits_index of one decode step over `rows` rows, each with its
    own scattered blocks, contexts 100-300."""
    from tokenloom.executor.attention import AttentionBatch

    rng = random.Random(seed)
    bs = cache.block_size
    blocks = list(range(1, cache.num_blocks))
    rng.shuffle(blocks)
    lens = [rng.randint(100, 300) for _ in range(rows)]
    tables = [[blocks.pop() for _ in range(-(-n // bs))] for n in lens]
    width = max(len(t) for t in tables)
    positions = torch.tensor([n - 1 for n in lens])
    batch = AttentionBatch(
        cache=cache,
        slot_mapping=torch.tensor([t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lens)]),
        decode_index=torch.arange(rows), decode_blocks=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        decode_mask=None, decode_lens=torch.tensor(lens), decode_kernel=kernel, prefills=[])
    ids = torch.tensor([rng.randrange(vocab) for _ in range(rows)])
    return ids, positions, batch, torch.arange(rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tokenloom.executor import attention, cpu_linear, decode_kernel, native
    from tokenloom.executor.kv_cache import KVCache, KVShape
    from tokenloom.executor.models import ModelSpec, load_model
    from tokenloom.executor.native import llama

    quiet = {"log": lambda message: None}
    spec = ModelSpec(path=args.model)
    hf = load_model(spec, attn_implementation=attention.register(), **quiet).model
    cpu_linear.pack_linears(hf)
    natives = {name: native.build(load_model(spec, attn_implementation=attention.register(), **quiet).model,
                                  fused_ops=fused) for name, fused in (("native", True), ("native-torch", False))}
    kernel = decode_kernel.load()
    config = hf.config
    row_counts = [int(r) for r in args.rows.split(",")]
    cache = KVCache(KVShape.from_config(config), num_blocks=max(row_counts) * 20 + 1, block_size=16,
                    dtype=torch.float32, device="cpu")
    cache.kv.normal_(0, 0.5)

    def hf_step(ids, positions, batch, keep):
        return hf(input_ids=ids[None], position_ids=positions[None], logits_to_keep=keep, use_cache=False,
                  tokenloom_batch=batch).logits[0]

    paths = {"hf": hf_step, **{name: model.forward for name, model in natives.items()}}
    print(f"{config.model_type}, {config.num_hidden_layers} layers, torch threads {torch.get_num_threads()}, "
          f"median of {args.steps} steps (alternating paths), ms per step")
    with torch.inference_mode():
        for rows in row_counts:
            step = decode_step(rows, cache, kernel, config.vocab_size)
            times = {name: [] for name in paths}
            for _ in range(3):
                for fn in paths.values():
                    fn(*step)
            for _ in range(args.steps):
                for name, fn in paths.items():
                    started = time.perf_counter()
                    fn(*step)
                    times[name].append(time.perf_counter() - started)
            line = "  ".join(f"{name} {statistics.median(t) * 1e3:7.2f}" for name, t in times.items())
            print(f"rows {rows:3d}: {line}")
            if not args.no_split:
                for name in paths:
                    model = hf if name == "hf" else natives[name]
                    print(f"           {name:<12} {_split(paths[name], step, model, llama, attention, args.steps)}")


def _split(fn, step, model, llama_module, attention, steps) -> str:
    """Total, linears, attention and the rest (ms, medians) with timers around the linears and attention."""
    linears, attn = Timer(), Timer()
    restore = []
    hf = isinstance(model, torch.nn.Module)
    if hf:
        import transformers

        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                restore.append((module, module.forward))
                module.forward = Timed(linears, module.forward)
        transformers.AttentionInterface.register(attention.ATTENTION_NAME, Timed(attn, attention.paged_attention))
    else:
        layers, head = model.layers, model.lm_head
        timed = ("qkv", "o", "gate_up", "down")
        model.layers = [layer._replace(**{f: Timed(linears, getattr(layer, f)) for f in timed}) for layer in layers]
        model.lm_head = Timed(linears, head)
        original_attend = llama_module.attend
        llama_module.attend = Timed(attn, original_attend)
    totals, lin, att = [], [], []
    try:
        for _ in range(steps):
            linears.seconds = attn.seconds = 0.0
            started = time.perf_counter()
            fn(*step)
            totals.append(time.perf_counter() - started)
            lin.append(linears.seconds)
            att.append(attn.seconds)
    finally:
        if hf:
            for module, forward in restore:
                module.forward = forward
            transformers.AttentionInterface.register(attention.ATTENTION_NAME, attention.paged_attention)
        else:
            model.layers, model.lm_head, llama_module.attend = layers, head, original_attend
    rest = [t - a - b for t, a, b in zip(totals, lin, att)]
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    return f"total {med(totals):7.2f}  linears {med(lin):6.2f}  attention {med(att):5.2f}  rest {med(rest):5.2f}"


if __name__ == "__main__":
    main()
