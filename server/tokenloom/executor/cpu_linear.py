"""Prepacked oneDNN kernels for the model's linear layers on CPU.

Measured on the 2-core machine (576 -> 1536 fp32): a prepacked oneDNN linear takes
0.25 / 0.52 / 0.86 ms at 4 / 32 / 64 rows against 0.50 / 0.74 / 1.14 ms for
`F.linear`, and the linear layers are three quarters of a decode step. Outputs
differ from `F.linear` by float rounding only (about 1e-4 on the default model's
logits, whose top-1/top-2 gaps along greedy paths were above 0.02).
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


def available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def rows_bucket(rows: int) -> int:
    """The row count a linear call is padded to: exact up to 32, then 16 steps per doubling.

    oneDNN builds (and caches, up to 1024) one primitive per input shape, ~0.2 MB each; with a
    row count that changes every step the process grew by ~125 MiB over a 20,000-request soak.
    Buckets bound the shapes to ~100 per weight shape up to 512 rows, for at most 6.25 % padded
    rows (8 steps per doubling padded a 481-token prompt step to 512 rows)."""
    if rows <= 32:
        return rows
    step = 1 << (rows.bit_length() - 5)
    return -(-rows // step) * step


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    padded = rows_bucket(rows)
    if padded == rows:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    flat = x.reshape(rows, x.shape[-1])
    flat = torch.cat([flat, flat.new_zeros(padded - rows, flat.shape[1])])
    out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")[:rows]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def pack_linears(model: torch.nn.Module, rows_hint: int = 32) -> int:
    """Replace every nn.Linear's forward with a prepacked oneDNN kernel; returns how many.

    The original weight is released unless another module shares it (tied
    embeddings), so packing does not double the model's memory.
    """
    shared = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)}
    count = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight.detach()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
        bias = None if module.bias is None else module.bias.detach()
        module.forward = functools.partial(_packed_forward, packed, bias)
        if id(module.weight) not in shared:
            module.weight.data = torch.empty(0, dtype=weight.dtype)
        count += 1
    # Weights loaded from safetensors may still be pages of the memory-mapped file; the packed
    # copies replace the linears', and copying what is left (embeddings, norms) lets the mapping
    # go: otherwise the whole file stays resident beside the packed weights (measured: 2901 ->
    # 2496 MiB for the default model with its KV store).
    with torch.no_grad():
        for param in model.parameters():
            if param.numel():
                param.data = param.data.clone()
    log.info("packed %d linear layers for oneDNN", count)
    return count
