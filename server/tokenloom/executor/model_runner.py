"""Executes one step's batch: builds the packed input, runs the model, samples and scores.

All rows' new tokens go into one packed sequence of `total_tokens`; the LM head runs only at the
positions whose logits some row needs: the last position of a row that
draws, every scored position of a scoring row. The answer is plain data, one `RowOutput` per
row (engine/batch.py), so nothing after this module sees a tensor.
"""

from __future__ import annotations

import torch

from ..engine.batch import Batch, Row, RowOutput
from .attention import AttentionBatch, PrefillSegment
from .kv_cache import KVCache
from .sampler import Sampler


class ModelRunner:
    def __init__(self, model, cache: KVCache, device, decode_kernel=None, sampler: Sampler | None = None):
        # native.NativeModel or hf_model.HFModel: forward(input_ids [T], positions [T], batch, logits_index [K])
        self.model = model
        self.decode_kernel = decode_kernel  # decode_kernel.load()'s function, or None for the torch path
        self.cache = cache
        self.device = torch.device(device)
        self.block_size = cache.block_size
        self.sampler = sampler or Sampler()

    @property
    def kv_bytes_per_block(self) -> int:
        return self.cache.bytes_per_block

    @torch.inference_mode()
    def execute(self, batch: Batch) -> list[RowOutput]:
        self.cache.copy_blocks(batch.block_copies)
        logits, kept = self._forward(batch.rows)  # [kept positions, vocab]; each row's first kept index
        outputs = [RowOutput() for _ in batch.rows]
        drawing = [i for i, row in enumerate(batch.rows) if row.sample is not None]
        if drawing:
            # A drawing row's one kept position is its last; in a step of decode rows alone, those are
            # all of `logits`, in order (no copy).
            positions = [kept[i] for i in drawing]
            if positions != list(range(len(logits))):
                logits_drawn = logits.index_select(0, torch.tensor(positions, device=logits.device))
            else:
                logits_drawn = logits
            for i, out in zip(drawing, self.sampler(logits_drawn, [batch.rows[i].sample for i in drawing])):
                outputs[i] = out
        for i, row in enumerate(batch.rows):
            if row.scored:
                labels = [row.seq.token_ids[p + 1] for p in row.scored]
                scored = logits[kept[i] : kept[i] + len(row.scored)]
                outputs[i].scored_logprobs = self.sampler.label_logprobs(scored, labels)
        return outputs

    def _forward(self, rows: list[Row]) -> tuple[torch.Tensor, list[int]]:
        ids, positions, slots, keep, kept = [], [], [], [], []
        offset = 0
        for row in rows:
            seq, start, end = row.seq, row.start, row.end
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(seq.block_table, start, end))
            kept.append(len(keep))
            wanted = range(end - 1, end) if row.sample is not None else row.scored
            keep.extend(offset + p - start for p in wanted)
            offset += row.num_tokens
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
        self._plan_attention(rows, batch)
        logits = self.model.forward(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            batch,
            torch.tensor(keep, dtype=torch.long, device=dev),
        )
        return logits, kept

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _plan_attention(self, rows: list[Row], batch: AttentionBatch) -> None:
        dev = self.device
        decode_rows, decode_ctx, decode_tables = [], [], []
        offset = 0
        for row in rows:
            if row.num_tokens == 1:
                decode_rows.append(offset)
                decode_ctx.append(row.end)
                decode_tables.append(row.seq.block_table)
            elif row.start == 0:
                batch.prefills.append(PrefillSegment(offset, row.num_tokens, None, None))
            else:
                batch.prefills.append(self._chunk_segment(row, offset))
            offset += row.num_tokens
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

    def _chunk_segment(self, row: Row, offset: int) -> PrefillSegment:
        """A prompt chunk after the first: attends to its history in the store, causally."""
        dev = self.device
        ctx = row.end
        ctx_slots = self._gather_slots([row.seq.block_table], ctx)[0]
        q_pos = torch.arange(row.start, ctx, device=dev)
        mask = torch.arange(ctx, device=dev)[None, :] <= q_pos[:, None]  # [q_len, ctx]
        return PrefillSegment(offset, row.num_tokens, ctx_slots, mask)

    def _gather_slots(self, tables: list[list[int]], length: int) -> torch.Tensor:
        """`[rows, length]` slots of positions 0..length-1 of each table (padding reads block 0)."""
        bs = self.block_size
        width = -(-length // bs)
        padded = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in tables], device=self.device)
        slots = padded[:, :, None] * bs + torch.arange(bs, device=self.device)
        return slots.reshape(len(tables), -1)[:, :length]
