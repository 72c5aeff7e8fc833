"""Builds the packed batch of one step, runs the HF model, returns the logits to sample from.

All rows' new tokens go into one `[1, total_tokens]` sequence; the LM head runs
only at the last token of each chunk that samples (`logits_to_keep`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import AttentionBatch, PrefillSegment
from .kv_cache import KVCache
from ..engine.scheduler import ScheduledChunk, SchedulerOutput


@dataclass
class RunnerOutput:
    logits: torch.Tensor  # [kept positions, vocab], float32
    # For each chunk whose logits are used, its first row in `logits` and how many:
    # one row (the last position) for a sampling chunk, every scored position for a
    # scoring chunk (the positions that predict a continuation token).
    rows: list[tuple[ScheduledChunk, int, int]]


def kept_positions(chunk: ScheduledChunk) -> range:
    """Positions of `chunk` whose logits the engine needs."""
    seq, end = chunk.seq, chunk.start + chunk.num_tokens
    score_from = seq.request.score_from
    if score_from is not None:
        # Position p predicts token p + 1; the last position predicts nothing.
        return range(max(chunk.start, score_from - 1), min(end, len(seq.token_ids) - 1))
    return range(end - 1, end) if chunk.samples else range(0)


class ModelRunner:
    def __init__(self, model, cache: KVCache, device, decode_kernel=None):
        self.model = model
        self.decode_kernel = decode_kernel  # decode_kernel.load()'s function, or None for the torch path
        self.cache = cache
        self.device = torch.device(device)
        self.block_size = cache.block_size

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self.cache.copy_blocks(out.block_copies)
        chunks = out.chunks
        ids, positions, slots, keep, rows = [], [], [], [], []
        offset = 0
        for chunk in chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(self._slots(seq.block_table, start, start + n))
            wanted = kept_positions(chunk)
            if wanted:
                rows.append((chunk, len(keep), len(wanted)))
                keep.extend(offset + p - start for p in wanted)
            offset += n
        dev = self.device
        batch = AttentionBatch(
            cache=self.cache,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            decode_index=None,
            decode_blocks=None,
            decode_mask=None,
            decode_lens=None,
            decode_kernel=self.decode_kernel,
            prefills=[],
        )
        self._plan_attention(chunks, batch)
        logits = self.model(
            input_ids=torch.tensor([ids], dtype=torch.long, device=dev),
            position_ids=torch.tensor([positions], dtype=torch.long, device=dev),
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=dev),
            use_cache=False,
            tokenloom_batch=batch,
        ).logits[0]
        return RunnerOutput(logits=logits.float(), rows=rows)

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _plan_attention(self, chunks: list[ScheduledChunk], batch: AttentionBatch) -> None:
        dev = self.device
        decode_rows, decode_ctx, decode_tables = [], [], []
        offset = 0
        for chunk in chunks:
            ctx = chunk.start + chunk.num_tokens
            if chunk.num_tokens == 1:
                decode_rows.append(offset)
                decode_ctx.append(ctx)
                decode_tables.append(chunk.seq.block_table)
            elif chunk.start == 0:
                batch.prefills.append(PrefillSegment(offset, chunk.num_tokens, None, None))
            else:
                batch.prefills.append(self._chunk_segment(chunk, offset))
            offset += chunk.num_tokens
        if decode_rows:
            width = -(-max(decode_ctx) // self.block_size)  # blocks of the longest row
            batch.decode_index = torch.tensor(decode_rows, dtype=torch.long, device=dev)
            batch.decode_blocks = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in decode_tables],
                                               dtype=torch.long, device=dev)
            lengths = torch.tensor(decode_ctx, device=dev)
            batch.decode_lens = lengths
            if self.decode_kernel is None:
                mask = torch.arange(width * self.block_size, device=dev)[None, :] < lengths[:, None]
                batch.decode_mask = mask[:, None, None, :]  # [rows, 1, 1, width * block_size]

    def _chunk_segment(self, chunk: ScheduledChunk, offset: int) -> PrefillSegment:
        """A prompt chunk after the first: attends to its history in the store, causally."""
        dev = self.device
        ctx = chunk.start + chunk.num_tokens
        ctx_slots = self._gather_slots([chunk.seq.block_table], ctx)[0]
        q_pos = torch.arange(chunk.start, ctx, device=dev)
        mask = torch.arange(ctx, device=dev)[None, :] <= q_pos[:, None]  # [q_len, ctx]
        return PrefillSegment(offset, chunk.num_tokens, ctx_slots, mask)

    def _gather_slots(self, tables: list[list[int]], length: int) -> torch.Tensor:
        """`[rows, length]` slots of positions 0..length-1 of each table (padding reads block 0)."""
        bs = self.block_size
        width = -(-length // bs)
        padded = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in tables], device=self.device)
        slots = padded[:, :, None] * bs + torch.arange(bs, device=self.device)
        return slots.reshape(len(tables), -1)[:, :length]
