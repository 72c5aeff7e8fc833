"""Attention over the packed batch and the paged KV store.

Every row's new tokens are packed into one `[1, total_tokens]` sequence, so the
MLPs and projections never see padding. `attend` is the attention itself, on
`q [T, heads, D]` once the new tokens' k/v are in the store: each row attends to
its own history:
- decode rows (one new token) in one batched call over their blocks (the C++ kernel, or
  gather + SDPA); a step of decode rows only needs no gather or scatter of q at all;
- prompt chunks one call each, causal with an offset for chunked prefill.
`paged_attention` adapts it to HF models: registered with transformers'
`AttentionInterface`, HF then builds no mask and calls it once per layer with the new
tokens' q/k/v (after rotary embeddings); it writes k/v into the store and attends.
The native models (native/) write the store themselves and call `attend`.
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
    decode_blocks: torch.Tensor | None  # [rows, max_blocks] each row's block table, padded with block 0
    decode_mask: torch.Tensor | None  # [rows, 1, 1, max_blocks * block_size] bool, True = attend
    decode_lens: torch.Tensor | None  # [rows] context length of each decode row
    decode_kernel: object | None  # decode_kernel.load()'s function; None: gather + SDPA
    prefills: list[PrefillSegment]


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The HF adapter: `[1, heads, T, D]` in, `[1, T, heads, D]` out, as HF's attention functions are."""
    batch: AttentionBatch = kwargs["tokenloom_batch"]
    k_store, v_store = batch.cache.layer(module.layer_idx)
    # [1, heads, T, D] -> [T, heads, D]
    q = query[0].transpose(0, 1)
    k_new = key[0].transpose(0, 1)
    v_new = value[0].transpose(0, 1)
    k_store.index_copy_(0, batch.slot_mapping, k_new)
    v_store.index_copy_(0, batch.slot_mapping, v_new)
    return attend(q, k_new, v_new, module.layer_idx, batch, scaling).unsqueeze(0), None


def attend(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, layer: int, batch: AttentionBatch,
           scaling: float | None) -> torch.Tensor:
    """Attention of the packed batch's queries `q [T, heads, D]` to each row's history in layer `layer`
    of the store, whose k/v for this step's tokens (`k_new`, `v_new`: `[T, kv_heads, D]`) are written
    already. Returns `[T, heads, D]`."""
    k_store, v_store = batch.cache.layer(layer)
    tokens, heads, dim = q.shape
    decoding = batch.decode_index is not None
    if decoding and len(batch.decode_index) == tokens:  # decode rows only: no gather, no scatter
        return _decode(q.reshape(tokens, k_store.shape[1], heads // k_store.shape[1], dim), k_store, v_store,
                       batch, scaling).reshape(tokens, heads, dim)
    out = torch.empty(tokens, heads, dim, dtype=q.dtype, device=q.device)
    if decoding:
        rows, kv_heads = len(batch.decode_index), k_store.shape[1]
        # Grouped-query attention without expanding K/V: the query heads that share a KV head
        # become that head's query positions (one new token each, so no causal order among them).
        qd = q[batch.decode_index].view(rows, kv_heads, heads // kv_heads, dim)
        out[batch.decode_index] = _decode(qd, k_store, v_store, batch, scaling).reshape(rows, heads, dim)
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
    return out


def _decode(qd: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, batch: AttentionBatch,
            scaling: float | None) -> torch.Tensor:
    """`qd [rows, kv_heads, group, D]` -> the same shape, each row over its own blocks."""
    if batch.decode_kernel is not None:  # reads the store in place
        return batch.decode_kernel(qd, k_store, v_store, batch.decode_blocks, batch.decode_lens,
                                   batch.cache.block_size, qd.shape[-1]**-0.5 if scaling is None else scaling)
    kd = _gather_blocks(k_store, batch.decode_blocks, batch.cache.block_size)  # [rows, kv_heads, ctx, D]
    vd = _gather_blocks(v_store, batch.decode_blocks, batch.cache.block_size)
    return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=batch.decode_mask, scale=scaling)


def _gather_blocks(store: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """`[rows, kv_heads, blocks * block_size, D]` view of the rows' blocks, copied a block at a time
    (whole blocks are contiguous in the store: one index per block, not per token)."""
    slots, kv_heads, dim = store.shape
    flat = store.view(slots // block_size, block_size * kv_heads * dim).index_select(0, blocks.reshape(-1))
    return flat.view(blocks.shape[0], blocks.shape[1] * block_size, kv_heads, dim).transpose(1, 2)


def _gather(store: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`store[slots]`: index_select on flat slots is several times faster than advanced indexing on CPU."""
    return store.index_select(0, slots.reshape(-1)).view(*slots.shape, *store.shape[1:])


def register() -> str:
    transformers.AttentionInterface.register(ATTENTION_NAME, paged_attention)
    return ATTENTION_NAME
