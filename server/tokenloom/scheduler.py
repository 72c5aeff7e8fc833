"""Who runs this step: pure Python, no torch.

Policy, in order:
1. Running sequences, oldest first, each with its pending tokens (one for a
   decoding sequence, the next chunk for a prompt still being prefilled).
   If the KV store cannot hold a sequence's new tokens, the newest running
   sequence is preempted (its blocks freed; it is recomputed later).
2. Waiting sequences, first come first served, while the step's token budget,
   the row limit and free blocks allow. A prompt longer than the budget left
   is prefilled in chunks over several steps (chunked prefill), so a long
   prompt never stalls the decoding rows for more than one chunk.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    # Tokens computed in one step; a prompt chunk takes what the decode rows leave.
    max_num_batched_tokens: int = 512

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (every row decodes one token)")


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # position of the first token computed this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence: its last logits are sampled."""
        return self.start + self.num_tokens == len(self.seq.token_ids)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order, oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def fits_ever(self, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` tokens can ever be held by the KV store."""
        return self.blocks.blocks_for(num_tokens) <= self.blocks.num_blocks

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        pending = deque(self.running)
        kept: list[Sequence] = []
        while pending:
            seq = pending.popleft()
            n = min(seq.num_pending, budget)
            if n == 0:
                kept.append(seq)
                continue
            while self.blocks.extra_blocks(seq.block_table, seq.num_computed + n) > self.blocks.num_free:
                victim = pending.pop() if pending else seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.grow(seq.block_table, seq.num_computed + n)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
            kept.append(seq)
        self.running = kept
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_pending, budget)
            # Keep one block per running sequence in reserve so admitting a
            # prompt does not force an immediate preemption of a decoder.
            reserve = len(self.running)
            if self.blocks.extra_blocks(seq.block_table, seq.num_computed + n) > self.blocks.num_free - reserve:
                break
            self.waiting.popleft()
            self.blocks.grow(seq.block_table, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's KV; it recomputes prompt + generated tokens later."""
        self.blocks.free(seq.block_table)
        self.num_preemptions += 1
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)  # `_schedule_running` drops it from `running`

    def step_done(self, out: SchedulerOutput) -> None:
        """The chunks of `out` now have their KV in the store."""
        for chunk in out.chunks:
            chunk.seq.num_computed += chunk.num_tokens

    def finish(self, seq: Sequence) -> None:
        """Remove `seq` wherever it is and free its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        seq.status = Status.FINISHED

    def check_invariants(self) -> None:
        seqs = list(self.waiting) + self.running
        if len({id(s) for s in seqs}) != len(seqs):
            raise AssertionError("a sequence is queued twice")
        for seq in self.waiting:
            if seq.status is not Status.WAITING:
                raise AssertionError(f"waiting sequence {seq.seq_id} has status {seq.status}")
        for seq in self.running:
            if seq.status is not Status.RUNNING:
                raise AssertionError(f"running sequence {seq.seq_id} has status {seq.status}")
            if self.blocks.blocks_for(seq.num_computed) > len(seq.block_table):
                raise AssertionError(f"sequence {seq.seq_id} has KV beyond its blocks")
        self.blocks.check_invariants([s.block_table for s in seqs])
