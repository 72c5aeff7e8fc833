"""What one linear call costs: QuantLinear (Q4_1 / Q8_0) against fp32 oneDNN, F.linear and torch int4.

    python tests/bench/quant_linear_cost.py [--rows 1 8 32 64] [--cold] [--threads 1 --cpu-time]

For the default model's shapes (and the fused QKV / gate-up ones), prints µs per call: the median over
`--repeats` batches of calls (~0.1 s each) of the batch's mean, and the spread (slowest / fastest
batch). `--cold` rotates through copies of each weight so that it comes from memory, as a model's
layers do in a decode step (the whole model is three times the L3); without it the weight stays in
cache. On the shared 2-core machine other processes show up as spread; `--threads 1 --cpu-time`
counts only the calling thread's CPU time and is steady under load.
torch int4 is `_weight_int4pack_mm_for_cpu` (group 32, bf16 activations, conversions included);
oneDNN is cpu_linear's prepacked path, packed for the call's row count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[2] / "server"))

from tokenloom.executor import cpu_linear, quant  # noqa: E402

# (name, in, out, kind): SmolLM2-135M's linears, the fused shapes, and the Q8_0 LM head.
SHAPES = [
    ("q/o 576->576", 576, 576, "q4_1"),
    ("k/v 576->192", 576, 192, "q4_1"),
    ("gate/up 576->1536", 576, 1536, "q4_1"),
    ("qkv 576->960", 576, 960, "q4_1"),
    ("qkv+gate 576->1920", 576, 1920, "q4_1"),
    ("gate+up 576->3072", 576, 3072, "q4_1"),
    ("down 1536->576", 1536, 576, "q4_1"),
    ("lm_head 576->49152", 576, 49152, "q8_0"),
]


def per_call_us(fn, x, repeats: int, clock=time.perf_counter) -> tuple[float, float]:
    fn(x)
    start, calls = clock(), 0
    while clock() - start < 0.05:
        fn(x)
        calls += 1
    calls = max(3, int(calls * 2))  # ~0.1 s a batch
    batches = []
    for _ in range(repeats):
        start = clock()
        for _ in range(calls):
            fn(x)
        batches.append((clock() - start) / calls * 1e6)
    return statistics.median(batches), max(batches) / min(batches)


def rotating(make, weight: torch.Tensor, nbytes: int, cold: bool):
    """One callable, or (cold) one per copy of the weight, called in turn so that their bytes come
    from memory rather than cache (copies enough to pass 96 MiB, three times this machine's L3)."""
    if not cold:
        return make(weight)
    fns = [make(weight.clone()) for _ in range(max(1, -(-(96 << 20) // nbytes)))]
    turn = iter(range(1 << 62))
    return lambda x: fns[next(turn) % len(fns)](x)


def int4_linear(weight: torch.Tensor):
    """torch's int4 CPU kernel on the Q4_1 blocks (scale = d, zero = m + 8·d: the same weights, up to
    torch's own rounding of them)."""
    qw = quant.quantize(weight, "q4_1")
    out, nb = qw.blocks.shape[:2]
    d = qw.blocks[..., 0:2].contiguous().view(torch.float16).float()[..., 0]  # [out, nb]
    m = qw.blocks[..., 2:4].contiguous().view(torch.float16).float()[..., 0]
    nib = qw.blocks[..., 4:]
    q = torch.cat([nib & 15, nib >> 4], -1).reshape(out, -1).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    scale_zeros = torch.stack([d, m + 8 * d], -1).transpose(0, 1).contiguous()  # [nb, out, 2]
    scale_zeros = scale_zeros.to(torch.bfloat16)  # its fast path: float32 activations were 10-90x slower
    return lambda x: torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, 32, scale_zeros).float()


def onednn_linear(weight: torch.Tensor, rows: int):
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--shapes", nargs="*", help="substrings of shape names to run (default all)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("--cold", action="store_true", help="weights from memory, not cache (rotate copies)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time the calling thread's CPU time (with --threads 1: immune to a busy machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'cold' if args.cold else 'warm'} weights, "
          f"{'CPU' if args.cpu_time else 'wall'} time; median µs per call (spread)")
    print(f"{'shape':22} {'rows':>4} {'quant':>14} {'oneDNN fp32':>14} {'F.linear':>14} {'torch int4':>14}")
    for name, inp, out, kind in SHAPES:
        if args.shapes and not any(s in name for s in args.shapes):
            continue
        weight = torch.randn(out, inp) * 0.05
        dense = quant.QuantLinear.from_dense(weight, kind).dequantize()
        qbytes = quant.BLOCK_BYTES[kind] * out * inp // quant.BLOCK
        ours = rotating(lambda w: quant.QuantLinear.from_dense(w, kind), weight, qbytes, args.cold)
        int4 = rotating(int4_linear, weight, out * inp // 2, args.cold) if kind == "q4_1" else None
        fp32 = rotating(lambda w: (lambda t: F.linear(t, w)), dense, dense.nbytes, args.cold)
        for rows in args.rows:
            x = torch.randn(rows, inp)
            cells = [per_call_us(ours, x, args.repeats, clock)]
            onednn = rotating(lambda w: onednn_linear(w, rows), dense, dense.nbytes, args.cold)
            cells.append(per_call_us(onednn, x, args.repeats, clock) if cpu_linear.available(x.device, x.dtype) else None)
            cells.append(per_call_us(fp32, x, args.repeats, clock))
            cells.append(per_call_us(int4, x, args.repeats, clock) if int4 else None)
            text = [f"{c[0]:8.0f} ({c[1]:.2f})" if c else f"{'-':>14}" for c in cells]
            print(f"{name:22} {rows:4d} " + " ".join(f"{t:>14}" for t in text), flush=True)

if __name__ == "__main__":
    main()
