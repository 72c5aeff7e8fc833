"""GPT-2: learned position embeddings, LayerNorm with bias, Conv1D (`[in, out]`) weights, no rotary.

One layer is LayerNorm -> q|k|v linear -> k/v into the store -> paged attention -> proj + residual ->
LayerNorm -> fc -> activation -> proj + residual.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..attention import AttentionBatch, attend
from .layers import Linear, LinearFactory, Linears, NativeModel, activation, release

MODEL_TYPES = ("gpt2",)


class _Layer(NamedTuple):
    ln_1: tuple[torch.Tensor, torch.Tensor]  # weight, bias
    qkv: Linear
    attn_proj: Linear
    ln_2: tuple[torch.Tensor, torch.Tensor]
    fc: Linear
    mlp_proj: Linear
    scaling: float  # per layer: GPT-2 configs may scale by 1 / (layer + 1) too


def unsupported(hf_model) -> str | None:
    if getattr(hf_model.config, "add_cross_attention", False):
        return "cross-attention"
    return None


class GPT2Model(NativeModel):
    def __init__(self, hf_model, fused_ops: bool = True, linear: LinearFactory | None = None):
        # fused_ops: none needed here, LayerNorm is one op already
        config = hf_model.config
        blocks = hf_model.transformer.h
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.hidden = (config.hidden_size,)
        self.eps = config.layer_norm_epsilon
        self.act = activation(config.activation_function)
        make = Linears(hf_model, linear).make
        linears = [tuple(make(m, transposed=True) for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))
                   for b in blocks]
        lm_head = make(hf_model.lm_head)
        release(hf_model)
        # Read after `release`, which moves them off the memory-mapped checkpoint; shared with the HF model.
        self.wte = hf_model.transformer.wte.weight.detach()
        self.wpe = hf_model.transformer.wpe.weight.detach()
        self.layers = [_Layer(_norm(b.ln_1), qkv, attn_proj, _norm(b.ln_2), fc, mlp_proj, b.attn.scaling)
                       for b, (qkv, attn_proj, fc, mlp_proj) in zip(blocks, linears)]
        ln_f = _norm(hf_model.transformer.ln_f)
        super().__init__(config, lambda h: F.layer_norm(h, self.hidden, *ln_f, self.eps), lm_head)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                logits_index: torch.Tensor) -> torch.Tensor:
        tokens, heads, dim, eps, hidden = len(input_ids), self.heads, self.head_dim, self.eps, self.hidden
        stores = batch.cache.kv.unbind(0)  # per layer [2, slots, heads, dim]
        h = F.embedding(input_ids, self.wte).add_(F.embedding(positions, self.wpe))  # [T, hidden]
        for i, (layer, store) in enumerate(zip(self.layers, stores)):
            qkv = layer.qkv(F.layer_norm(h, hidden, *layer.ln_1, eps)).view(tokens, 3 * heads, dim)
            store.index_copy_(1, batch.slot_mapping, qkv[:, heads:].view(tokens, 2, heads, dim).transpose(0, 1))
            out = attend(qkv[:, :heads], qkv[:, heads:2 * heads], qkv[:, 2 * heads:], i, batch, layer.scaling)
            h = layer.attn_proj.add(out.reshape(tokens, heads * dim), h)
            h = layer.mlp_proj.add(self.act(layer.fc(F.layer_norm(h, hidden, *layer.ln_2, eps))), h)
        return self.logits(h, logits_index)


def _norm(module: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    return module.weight.detach(), module.bias.detach()
