"""Block-quantized weights (GGUF's Q4_0, Q4_1, Q8_0) and the linear layer that runs on them.

A block is 32 consecutive weights of one output row, stored as fp16 scale(s) and small integers:
  Q4_1: d, m (fp16), 16 bytes of nibbles  w = d·q + m,  q in 0..15   (20 bytes a block)
  Q4_0: d (fp16), 16 bytes of nibbles     w = d·(q - 8)               (18 bytes)
  Q8_0: d (fp16), 32 int8                 w = d·q                     (34 bytes)
Byte j of the nibbles holds weight j (low nibble) and weight j + 16 (high nibble).

`read_gguf` takes a GGUF file's blocks as they are (no re-quantization) under the HF parameter names;
`quantize` makes the same blocks from a dense weight with the arithmetic of the reference quantizer
(gguf.quants), for checkpoints that are not GGUF. `QuantLinear` runs `y = x · Wᵀ` on them with the
C++ kernel (quant_kernel.py), whose outputs for a row do not depend on the other rows of the call.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import quant_kernel

log = logging.getLogger(__name__)

BLOCK = 32
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
_KERNEL_KIND = {"q4_0": 0, "q4_1": 0, "q8_0": 1}  # q4_0 runs as q4_1 with m = -8·d
_PANEL = 24  # output features per kernel panel (kernels/quant_gemm.cpp: NR)


@dataclass(frozen=True)
class QuantWeight:
    """A [out_features, in_features] weight as blocks: uint8 [out, in / 32, bytes a block], the file's layout."""

    kind: str
    blocks: torch.Tensor

    def __post_init__(self):
        if self.kind not in BLOCK_BYTES:
            raise ValueError(f"unknown quantization {self.kind!r}; choose one of {sorted(BLOCK_BYTES)}")
        if self.blocks.dtype != torch.uint8 or self.blocks.dim() != 3 or self.blocks.shape[2] != BLOCK_BYTES[self.kind]:
            raise ValueError(f"{self.kind} blocks must be uint8 [out, in / 32, {BLOCK_BYTES[self.kind]}], "
                             f"got {self.blocks.dtype} {tuple(self.blocks.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0], self.blocks.shape[1] * BLOCK

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [out, in] (or [len(rows), in]), equal bit for bit to gguf.quants.dequantize."""
        blocks = self.blocks if rows is None else self.blocks[rows]
        d = _halves(blocks[..., 0:2])  # [out, nb, 1]
        if self.kind == "q8_0":
            q = blocks[..., 2:].view(torch.int8).float()
            w = q * d
        else:
            nibbles = blocks[..., 4:] if self.kind == "q4_1" else blocks[..., 2:]
            q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).float()  # [out, nb, 32]
            w = d * q + _halves(blocks[..., 2:4]) if self.kind == "q4_1" else d * (q - 8)
        return w.reshape(blocks.shape[0], -1)

    def permute_rows(self, order: torch.Tensor) -> QuantWeight:
        """Output rows in a new order; blocks run along the input, so whole rows of blocks move."""
        return QuantWeight(self.kind, self.blocks.index_select(0, order))

    @staticmethod
    def cat(weights: list[QuantWeight]) -> QuantWeight:
        """Output rows stacked (a fused QKV or gate/up weight); the kinds and input sizes must agree."""
        kinds = {w.kind for w in weights}
        if len(kinds) != 1 or len({w.shape[1] for w in weights}) != 1:
            raise ValueError(f"cannot stack {[(w.kind, w.shape) for w in weights]}: kinds and inputs must agree")
        return QuantWeight(kinds.pop(), torch.cat([w.blocks for w in weights]))


def _halves(pairs: torch.Tensor) -> torch.Tensor:
    return pairs.contiguous().view(torch.float16).float()


def quantize(weight: torch.Tensor, kind: str = "q4_1") -> QuantWeight:
    """Blocks for a dense [out, in] weight, as gguf.quants.quantize makes them (same float32 steps)."""
    if kind not in BLOCK_BYTES:
        raise ValueError(f"unknown quantization {kind!r}; choose one of {sorted(BLOCK_BYTES)}")
    out, inp = weight.shape
    if inp % BLOCK:
        raise ValueError(f"in_features ({inp}) must be a multiple of {BLOCK} to quantize by blocks")
    x = weight.detach().to(torch.float32, copy=True).reshape(out, inp // BLOCK, BLOCK)
    zero = torch.zeros((), dtype=torch.float32)
    if kind == "q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127
        n = x * torch.where(d == 0, zero, 1 / d)
        a = n.abs()
        floored = a.floor()
        q = (torch.sign(n) * (floored + (2 * (a - floored)).floor())).to(torch.int8)  # half away from zero
        return QuantWeight(kind, torch.cat([_half_bytes(d), q.view(torch.uint8)], -1))
    if kind == "q4_1":
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        q = ((x - lo) * torch.where(d == 0, zero, 1 / d) + 0.5).trunc()
        scales = torch.cat([_half_bytes(d), _half_bytes(lo)], -1)
    else:  # q4_0: the signed value of largest magnitude maps to -8
        peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))
        d = peak / -8
        q = (x * torch.where(d == 0, zero, 1 / d) + 8.5).trunc()
        scales = _half_bytes(d)
    q = q.clamp(0, 15).to(torch.uint8)
    return QuantWeight(kind, torch.cat([scales, q[..., :16] | (q[..., 16:] << 4)], -1))


def _half_bytes(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).view(torch.uint8)


class QuantLinear:
    """`y = x · Wᵀ (+ bias)` for float32 x [..., in] and a block-quantized W; a plain callable.

    The kernel keeps the weight at its quantized size (0.625 bytes a weight for Q4_1), expands it
    to float32 a panel at a time and accumulates in float32 in an order fixed per output: a row's
    result is the same bit for bit whatever rows share the call. Without the compiled kernel the
    de-quantized float32 weight runs through F.linear (same values, batch-dependent rounding).
    """

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None):
        self.kind = weight.kind
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self._kernel = quant_kernel.load()
        self._kind_id = _KERNEL_KIND[self.kind]
        self._padded = self.out_features % _PANEL != 0
        if self._kernel is not None:
            self._packed, self._dense = pack(weight), None
        else:
            self._packed, self._dense = None, weight.dequantize()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, kind: str = "q4_1", bias: torch.Tensor | None = None) -> QuantLinear:
        return cls(quantize(weight, kind), bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected float32 [..., {self.in_features}], got {x.dtype} {tuple(x.shape)}")
        if self._kernel is None:
            return F.linear(x, self._dense, self.bias)
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = self._kernel(flat, self._packed, self._kind_id)  # [rows, panels * 24]
        if self._padded:
            y = y[:, : self.out_features].contiguous()
        if self.bias is not None:
            y += self.bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`residual + x · Wᵀ (+ bias)`, the residual form native.layers.Linear offers."""
        return self(x).add_(residual)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight this layer multiplies by, or some of its rows, read back from the copy the
        kernel reads (the tests build their reference models from it)."""
        if rows is None:
            rows = torch.arange(self.out_features)
        if self._dense is not None:
            return self._dense[rows]
        return unpack(self._packed, self.kind, rows)

    @property
    def nbytes(self) -> int:
        return (self._packed if self._packed is not None else self._dense).nbytes

    def __repr__(self) -> str:
        return f"QuantLinear({self.kind}, in_features={self.in_features}, out_features={self.out_features})"


def pack(weight: QuantWeight) -> torch.Tensor:
    """The kernel's layout: uint8 [panels, in / 32, 24 · block bytes] (see kernels/quant_gemm.cpp).

    Per panel of 24 output rows and block: the 24 scales, (q4: the 24 minimums,) then the quants
    byte by byte with the 24 rows' bytes side by side; q4 bytes hold weights 2j and 2j + 1 (the file's
    hold j and j + 16). Rows past `out` are zero blocks (weight 0)."""
    blocks = weight.blocks
    out, nb, _ = blocks.shape
    panels = -(-out // _PANEL)
    if panels * _PANEL != out:
        blocks = torch.cat([blocks, blocks.new_zeros(panels * _PANEL - out, nb, blocks.shape[2])])
    b = blocks.view(panels, _PANEL, nb, -1).permute(0, 2, 1, 3)  # [panels, nb, 24, bytes]
    d = b[..., 0:2]
    if weight.kind == "q8_0":
        parts = [d, b[..., 2:]]
    else:
        nibbles = b[..., 4:] if weight.kind == "q4_1" else b[..., 2:]
        q = torch.cat([nibbles & 15, nibbles >> 4], -1)  # [panels, nb, 24, 32] in input order
        pairs = q[..., 0::2] | (q[..., 1::2] << 4)
        if weight.kind == "q4_1":
            m = b[..., 2:4]
        else:
            m = _half_bytes(-8 * _halves(d))
            if not torch.isfinite(_halves(m)).all():
                raise ValueError("a Q4_0 scale is too large to run as Q4_1 (8·d overflows fp16)")
        parts = [d, m, pairs]
    # scales [panels, nb, 24, 2] -> 48 bytes; quants [panels, nb, 24, n] -> [panels, nb, n, 24]
    flat = [p.reshape(panels, nb, -1) for p in parts[:-1]] + [parts[-1].transpose(2, 3).reshape(panels, nb, -1)]
    return torch.cat(flat, -1).contiguous()


def unpack(packed: torch.Tensor, kind: str, rows: torch.Tensor) -> torch.Tensor:
    """float32 [len(rows), in]: those output rows of the weight, from the kernel's layout (undoes `pack`)."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    nb = packed.shape[1]
    picked = packed[(rows // _PANEL)[:, None, None], torch.arange(nb)[None, :, None],
                    _ROW_BYTES[kind][rows % _PANEL][:, None, :]]  # [rows, nb, bytes a block]
    if kind == "q8_0":
        return QuantWeight(kind, picked).dequantize()  # [d, 32 quants]: the file's block exactly
    q = torch.stack([picked[..., 4:] & 15, picked[..., 4:] >> 4], -1).flatten(-2)  # input order
    blocks = torch.cat([picked[..., :4], q[..., :16] | (q[..., 16:] << 4)], -1)
    return QuantWeight("q4_1", blocks).dequantize()  # q4_0 was packed as q4_1


def _row_bytes(scales: int, quants: int) -> torch.Tensor:
    """[24, bytes a block]: where lane l's block bytes lie in a packed panel block (scales, then quants)."""
    lane = torch.arange(_PANEL)[:, None]
    scale_bytes = torch.cat([2 * _PANEL * s + 2 * lane + torch.tensor([0, 1]) for s in range(scales)], -1)
    return torch.cat([scale_bytes, 2 * _PANEL * scales + torch.arange(quants) * _PANEL + lane], -1)


_ROW_BYTES = {"q8_0": _row_bytes(1, 32), "q4_1": _row_bytes(2, 16), "q4_0": _row_bytes(2, 16)}


# ---------------------------------------------------------------------------------------------
# GGUF files

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_KINDS = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0"}


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (Llama/Qwen2 names); None if unknown."""
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if match:
        layer, part, suffix = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}" if part in _LAYER_NAMES else None
    base, _, suffix = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{suffix}" if base in _GLOBAL_NAMES else None


@dataclass(frozen=True)
class GGUFWeights:
    architecture: str  # general.architecture, e.g. "llama"
    metadata: dict[str, Any]  # the file's scalar fields (strings and numbers; arrays left out)
    tensors: dict[str, QuantWeight | torch.Tensor]  # HF names; Q4_0/Q4_1/Q8_0 as blocks, the rest float32

    def linear_weight(self, name: str) -> QuantWeight | torch.Tensor:
        """A linear layer's weight; `lm_head.weight` falls back to the tied embedding, as in the file."""
        if name == "lm_head.weight" and name not in self.tensors:
            return self.tensors["model.embed_tokens.weight"]
        return self.tensors[name]


def read_gguf(path: str | Path) -> GGUFWeights:
    """Every tensor of a Llama-family GGUF file under its HF name, quantized ones as the file's blocks.

    llama.cpp stores Llama's q and k rows permuted for its rotary layout; they are put back in HF's
    order here (as transformers does on load), moving whole rows of blocks. Tensors of other types
    (F32 norms, F16, K-quants) come de-quantized to float32 by gguf.quants.
    """
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    metadata = {}
    for name, field in reader.fields.items():
        if field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            metadata[name] = field.contents()
    arch = metadata.get("general.architecture", "")
    tensors: dict[str, QuantWeight | torch.Tensor] = {}
    for t in reader.tensors:
        name = hf_name(t.name) or t.name
        shape = [int(n) for n in reversed(t.shape)]  # GGUF lists the fastest-moving dimension first
        raw = np.array(t.data)  # a copy: the file's mapping can go
        kind = _GGUF_KINDS.get(t.tensor_type.name)
        if kind is not None and len(shape) == 2:
            tensors[name] = QuantWeight(kind, torch.from_numpy(raw).view(shape[0], shape[1] // BLOCK, -1))
        else:
            dense = gguf.quants.dequantize(raw, t.tensor_type)
            tensors[name] = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)).reshape(shape)
    if arch == "llama":
        heads = int(metadata["llama.attention.head_count"])
        kv_heads = int(metadata.get("llama.attention.head_count_kv", heads))
        for name in list(tensors):
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                groups = heads if ".q_proj." in name else kv_heads
                tensors[name] = _unpermute_rotary(tensors[name], groups)
    log.info("read %d tensors from %s (%s)", len(tensors), path, arch)
    return GGUFWeights(arch, metadata, tensors)


def _unpermute_rotary(weight: QuantWeight | torch.Tensor, heads: int) -> QuantWeight | torch.Tensor:
    # llama.cpp interleaves each head's two rotary halves: its row (h, d, j) is HF's row (h, j, d).
    rows = weight.shape[0]
    order = torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)
    if isinstance(weight, QuantWeight):
        return weight.permute_rows(order)
    return weight.index_select(0, order)
