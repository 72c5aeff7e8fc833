"""The elementwise work of a Llama layer: C++ kernels (fused_ops.cpp) on CPU fp32, torch ops elsewhere.

Both forms have one signature, chosen once when a model is built:
- `rms_norm(x [rows, n], weight [n], eps) -> [rows, n]`
- `rope_store(qkv [T, (heads + 2 * kv_heads) * dim], rope [T, 2, dim], heads, kv_heads,
  store [2, slots, kv_heads, dim], slots [T])`: rotary in place on the q and k heads, then k and v
  into their slots (rope: cos, and sin with its first half negated, per token).

The torch form gives HF's bits exactly; the C++ form sums the RMSNorm's squares in another order
(logits within 7e-5 of HF's on the default model) and takes 2-4 ms off a SmolLM2 decode step at
1-32 rows, 5-7 ms at 64 (tests/bench/native_step.py). Built as ../kernel_build.py says (~25 s, once
per machine); without a compiler the torch form runs.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import kernel_build

SOURCE = Path(__file__).with_name("fused_ops.cpp")
# Reassociation vectorises the sum of squares; no contraction into fused multiply-adds keeps the
# rotary products rounded as HF's separate torch ops round them.
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
          "-fassociative-math", "-ffp-contract=off", "-fopenmp"]


class LayerOps(NamedTuple):
    rms_norm: object
    rope_store: object
    name: str  # "cpp" | "torch"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm in float32, bit for bit: torch's rms_norm runs the same ops in one call."""
    return F.rms_norm(x, weight.shape, weight, eps)


def rms_norm_upcast(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm for 16-bit dtypes: normalised in float32, rounded, then scaled in the model's
    dtype (torch's rms_norm scales before rounding: other bits)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_store(qkv: torch.Tensor, rope: torch.Tensor, heads: int, kv_heads: int, store: torch.Tensor,
               slots: torch.Tensor) -> None:
    tokens, dim = len(qkv), store.shape[-1]
    x = qkv.view(tokens, -1, 2, dim // 2)  # the two halves of every head
    qk = x[:, :heads + kv_heads]
    halves = rope.view(tokens, 2, 1, 2, dim // 2)
    rotated = qk.flip(2)  # rotate_half without its sign, which the sin carries
    qk.mul_(halves[:, 0]).add_(rotated.mul_(halves[:, 1]))
    store.index_copy_(1, slots, x[:, heads:].reshape(tokens, 2, kv_heads, dim).transpose(0, 1))


def torch_ops(dtype: torch.dtype) -> LayerOps:
    return LayerOps(rms_norm if dtype == torch.float32 else rms_norm_upcast, rope_store, "torch")


def load(device: torch.device, dtype: torch.dtype) -> LayerOps:
    """The C++ form where it applies and builds (logged once), else the torch form."""
    if device.type != "cpu" or dtype != torch.float32:
        return torch_ops(dtype)
    return _cpu_ops()


@functools.cache
def _cpu_ops() -> LayerOps:
    module = kernel_build.build("tokenloom_native_ops", SOURCE, ["rms_norm", "rope_store"], CFLAGS,
                                "native model's CPU kernels")
    return torch_ops(torch.float32) if module is None else LayerOps(module.rms_norm, module.rope_store, "cpp")
