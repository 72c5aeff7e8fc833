"""Attention over the packed batch and the paged KV store, plugged into HF models.

Every row's new tokens are packed into one `[1, total_tokens]` sequence, so the
MLPs and projections never see padding. This function is registered with
transformers' `AttentionInterface`; HF then builds no mask and calls it once per
layer with the new tokens' q/k/v (after rotary embeddings). It writes k/v into
the store and attends each row to its own history:
- decode rows (one new token) in one batched SDPA call over a padded gather;
- prompt chunks one call each, causal with an offset for chunked prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers

from .kv_cache import KVCache

ATTENTION_NAME = "tokenloom_paged"


@dataclass
class PrefillSegment:
    q_start: int  # offset in the packed token axis
    q_len: int
    # Slots of the whole visible context (history + this chunk), or None when the
    # chunk is the whole context (a fresh prompt): then k/v come straight from the batch.
    ctx_slots: torch.Tensor | None
    mask: torch.Tensor | None  # [q_len, ctx_len] bool, True = attend; None = plain causal


@dataclass
class AttentionBatch:
    """Per-step metadata shared by every layer."""

    cache: KVCache
    slot_mapping: torch.Tensor  # [total_tokens] where each new token's k/v goes
    decode_index: torch.Tensor | None  # [rows] packed positions of single-token rows
    decode_slots: torch.Tensor | None  # [rows, max_ctx] context slots, padded
    decode_mask: torch.Tensor | None  # [rows, 1, 1, max_ctx] bool, True = attend
    prefills: list[PrefillSegment]


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    batch: AttentionBatch = kwargs["tokenloom_batch"]
    k_store, v_store = batch.cache.layer(module.layer_idx)
    # [1, heads, T, D] -> [T, heads, D]
    q = query[0].transpose(0, 1)
    k_new = key[0].transpose(0, 1)
    v_new = value[0].transpose(0, 1)
    k_store.index_copy_(0, batch.slot_mapping, k_new)
    v_store.index_copy_(0, batch.slot_mapping, v_new)

    out = torch.empty_like(q)  # [T, heads, D]
    if batch.decode_index is not None:
        qd = q[batch.decode_index].unsqueeze(2)  # [rows, heads, 1, D]
        kd = _gather(k_store, batch.decode_slots).transpose(1, 2)  # [rows, kv_heads, ctx, D]
        vd = _gather(v_store, batch.decode_slots).transpose(1, 2)
        od = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=batch.decode_mask, scale=scaling, enable_gqa=True
        )
        out[batch.decode_index] = od.squeeze(2)
    for seg in batch.prefills:
        end = seg.q_start + seg.q_len
        qs = q[seg.q_start:end].transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, D]
        if seg.ctx_slots is None:
            ks, vs = k_new[seg.q_start:end], v_new[seg.q_start:end]
        else:
            ks, vs = _gather(k_store, seg.ctx_slots), _gather(v_store, seg.ctx_slots)
        ks = ks.transpose(0, 1).unsqueeze(0)  # [1, kv_heads, ctx, D]
        vs = vs.transpose(0, 1).unsqueeze(0)
        os_ = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=seg.mask, is_causal=seg.mask is None, scale=scaling, enable_gqa=True
        )
        out[seg.q_start:end] = os_[0].transpose(0, 1)
    return out.unsqueeze(0), None  # [1, T, heads, D], as HF's attention functions return


def _gather(store: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`store[slots]`: index_select on flat slots is several times faster than advanced indexing on CPU."""
    return store.index_select(0, slots.reshape(-1)).view(*slots.shape, *store.shape[1:])


def register() -> str:
    transformers.AttentionInterface.register(ATTENTION_NAME, paged_attention)
    return ATTENTION_NAME
