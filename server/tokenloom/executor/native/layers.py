"""Pieces every native model shares: linear weights in their fastest form, rotary tables, activations,
and taking weights off the HF modules so that only one copy stays in memory."""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from .. import cpu_linear
from ..attention import AttentionBatch
from ..models import release_linears


class Linear:
    """`y = x W^T + b` for `x [rows, in]`: on CPU fp32 a prepacked oneDNN kernel (cpu_linear.py), else
    F.linear. Any callable of the same shape (a quantized kernel) can stand where a Linear stands;
    `add` is the residual form, fused into the kernel where the kernel can do it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int = 32):
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().clone()
        if cpu_linear.available(weight.device, weight.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
            self.weight = None
            self._call = functools.partial(cpu_linear._packed_forward, self.packed, self.bias)
        else:
            self.packed = None
            self.weight = weight.detach().clone()
            self._call = functools.partial(F.linear, weight=self.weight, bias=self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(x)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`residual + x W^T + b`: a oneDNN binary post-op saves one pass over the output where the
        rows need no bucket padding (the decode steps); rounding is the same as a separate add."""
        if self.packed is not None and cpu_linear.rows_bucket(len(x)) == len(x):
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")
        return self._call(x).add_(residual)


# Given the HF names of the linears to compute side by side ("model.layers.0.self_attn.q_proj", ...),
# the modules themselves and whether their weights are stored transposed (GPT-2's Conv1D): a callable
# `x [rows, in] -> [rows, out]` with an `add(x, residual)` (quant.QuantLinear), or None for the dense
# Linear from the HF weights.
LinearFactory = Callable[[list[str], list[torch.nn.Module], bool], object]


class Linears:
    """Makes the native model's linears: `make(*modules)` fuses HF linears side by side, built by the
    factory where it answers (quantized weights), else dense from the HF weights."""

    def __init__(self, hf_model: torch.nn.Module, factory: LinearFactory | None = None):
        self.names = {id(m): name for name, m in hf_model.named_modules()}
        self.factory = factory

    def make(self, *modules: torch.nn.Module, transposed: bool = False):
        names = [self.names[id(m)] for m in modules]
        made = None if self.factory is None else self.factory(names, list(modules), transposed)
        return made if made is not None else Linear(*fused_weight(*modules, transposed=transposed))


def fused_weight(*modules: torch.nn.Module, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight `[sum of outs, in]` and bias of several HF linears side by side (q|k|v, gate|up): one
    matmul instead of several. `transposed`: GPT-2's Conv1D keeps its weight as `[in, out]`."""
    weights = [m.weight.detach().t() if transposed else m.weight.detach() for m in modules]
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        bias = None
    else:
        bias = torch.cat([b.detach() if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
                          for b, w in zip(biases, weights)])
    weight = weights[0].contiguous() if len(weights) == 1 else torch.cat(weights)
    return weight, bias


def rotary_tables(rotary_emb: torch.nn.Module, max_positions: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """`[max_positions, 2, head_dim]`: cos, and sin with its first half negated, of every position,
    computed once by the HF model's own rotary module, so that every rope type HF knows (linear,
    dynamic, yarn, llama3, ...) comes out as HF computes it for positions below max_positions.

    With the sign in the table, HF's `x * cos + rotate_half(x) * sin` is `x * cos + swap(x) * sin`,
    `swap` exchanging the two halves of each head (the sign flip is exact, so are the bits)."""
    with torch.inference_mode():
        positions = torch.arange(max_positions, device=device)[None]  # [1, max_positions]
        probe = torch.zeros(1, dtype=dtype, device=device)
        cos, sin = rotary_emb(probe, positions)  # each [1, max_positions, head_dim]
        sin = sin[0].clone()
        sin[:, :head_dim // 2].neg_()
        return torch.stack([cos[0], sin], dim=1)  # [max_positions, 2, head_dim]


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The HF activation `name` as one torch function where one computes it (one op, not HF's several
    for gelu_new), else HF's own module."""
    tanh_gelu = functools.partial(F.gelu, approximate="tanh")
    table = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
             "gelu_new": tanh_gelu, "gelu_pytorch_tanh": tanh_gelu}
    return table.get(name) or ACT2FN[name]


def release(hf_model: torch.nn.Module) -> None:
    """The HF model's linear weights go (the native model holds its own, packed); the rest (embeddings,
    norms: the native model shares these tensors) is copied off the memory-mapped checkpoint. The HF
    model cannot run afterwards."""
    release_linears(hf_model, _is_linear)


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


class NativeModel:
    """What the runner calls instead of the HF model: one forward over the packed batch.

    `forward(input_ids [T], positions [T], batch, logits_index [K]) -> [K, vocab]` float32 logits at
    the packed positions `logits_index` only, having written the k/v of all T tokens into
    `batch.cache` exactly where (and as) the HF path writes them. Call it under
    `torch.inference_mode()` (it writes the store in place)."""

    def __init__(self, config, final_norm: Callable[[torch.Tensor], torch.Tensor], lm_head: Linear):
        self.config = config
        self.final_norm = final_norm
        self.lm_head = lm_head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                logits_index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor, logits_index: torch.Tensor) -> torch.Tensor:
        """The final norm and the LM head at the kept positions only (the norm is per position, so
        selecting first gives the same numbers)."""
        return self.lm_head(self.final_norm(hidden.index_select(0, logits_index))).float()
