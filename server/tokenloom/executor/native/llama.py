"""Llama-style decoders: Llama (SmolLM2), Mistral without a sliding window, Qwen2 (q/k/v biases).

A layer is RMSNorm -> fused q|k|v linear -> rotary on q and k in place, k and v into the store ->
paged attention -> o linear + residual -> RMSNorm -> fused gate|up linear -> act(gate) * up ->
down linear + residual. With the C++ kernels (kernels.py) that is ten calls into torch and the
residual adds ride on the linears; with torch ops, fourteen.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..attention import AttentionBatch, attend
from . import kernels
from .layers import Linear, LinearFactory, Linears, NativeModel, activation, release, rotary_tables

MODEL_TYPES = ("llama", "mistral", "qwen2")


class _Layer(NamedTuple):
    attn_norm: torch.Tensor  # [hidden]
    qkv: Linear  # hidden -> (heads + 2 * kv_heads) * head_dim
    o: Linear
    mlp_norm: torch.Tensor
    gate_up: Linear  # hidden -> 2 * intermediate
    down: Linear


def unsupported(hf_model) -> str | None:
    """Why this model is not one the code below computes exactly, or None."""
    config = hf_model.config
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        return f"a sliding window of {window} tokens"
    layer = hf_model.model.layers[0]
    attention = {name for name, _ in layer.self_attn.named_children()}
    if attention != {"q_proj", "k_proj", "v_proj", "o_proj"}:
        return f"attention modules {sorted(attention)} (q/k norms?)"
    mlp = {name for name, _ in layer.mlp.named_children()}
    if not {"gate_proj", "up_proj", "down_proj"} <= mlp <= {"gate_proj", "up_proj", "down_proj", "act_fn"}:
        return f"MLP modules {sorted(mlp)}"
    if layer.self_attn.head_dim % 2:
        return "an odd head size"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type in ("dynamic", "longrope"):
        # HF picks these frequencies by the sequence's length; the table here is one for all positions.
        return f"{rope_type} rotary scaling"
    return None


class LlamaModel(NativeModel):
    def __init__(self, hf_model, fused_ops: bool = True, linear: LinearFactory | None = None):
        config = hf_model.config
        attn = hf_model.model.layers[0].self_attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.intermediate = hf_model.model.layers[0].mlp.gate_proj.out_features
        self.eps = hf_model.model.norm.variance_epsilon
        self.act = activation(config.hidden_act)
        dtype, device = hf_model.dtype, hf_model.device
        self.rope = rotary_tables(hf_model.model.rotary_emb, config.max_position_embeddings, self.head_dim,
                                  dtype, device)  # [positions, 2 (cos | signed sin), head_dim]
        self.ops = kernels.load(device, dtype) if fused_ops else kernels.torch_ops(dtype)
        make = Linears(hf_model, linear).make
        linears = [(make(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj), make(l.self_attn.o_proj),
                    make(l.mlp.gate_proj, l.mlp.up_proj), make(l.mlp.down_proj)) for l in hf_model.model.layers]
        lm_head = make(hf_model.lm_head)
        release(hf_model)
        # Read after `release`, which moves them off the memory-mapped checkpoint; shared with the HF model.
        self.embed = hf_model.model.embed_tokens.weight.detach()
        self.layers = [_Layer(l.input_layernorm.weight.detach(), qkv, o, l.post_attention_layernorm.weight.detach(),
                              gate_up, down) for l, (qkv, o, gate_up, down) in zip(hf_model.model.layers, linears)]
        norm = hf_model.model.norm.weight.detach()
        super().__init__(config, lambda h: self.ops.rms_norm(h, norm, self.eps), lm_head)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                logits_index: torch.Tensor) -> torch.Tensor:
        tokens, heads, kv_heads, dim, eps = len(input_ids), self.heads, self.kv_heads, self.head_dim, self.eps
        qk_heads, all_heads, inter = heads + kv_heads, heads + 2 * kv_heads, self.intermediate
        norm, rope_store = self.ops.rms_norm, self.ops.rope_store
        rope = self.rope.index_select(0, positions)  # [T, 2, dim]
        stores = batch.cache.kv.unbind(0)  # per layer [2, slots, kv_heads, dim]
        h = F.embedding(input_ids, self.embed)  # [T, hidden]
        for i, (layer, store) in enumerate(zip(self.layers, stores)):
            qkv = layer.qkv(norm(h, layer.attn_norm, eps))  # [T, (heads + 2 * kv_heads) * dim]
            rope_store(qkv, rope, heads, kv_heads, store, batch.slot_mapping)
            qkv = qkv.view(tokens, all_heads, dim)
            out = attend(qkv[:, :heads], qkv[:, heads:qk_heads], qkv[:, qk_heads:], i, batch, self.scaling)
            h = layer.o.add(out.reshape(tokens, heads * dim), h)
            gate_up = layer.gate_up(norm(h, layer.mlp_norm, eps))  # [T, 2 * intermediate]
            h = layer.down.add(self.act(gate_up[:, :inter]).mul_(gate_up[:, inter:]), h)
        return self.logits(h, logits_index)
