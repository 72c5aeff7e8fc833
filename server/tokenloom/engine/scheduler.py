"""Who runs this step: pure Python, no torch.

The unit of scheduling is a request's `SequenceGroup`. Under the default policy,
prefill-first, while prompt work is pending (a waiting request, or a running one
still prefilling) and rows are decoding, prompt steps (passes 2 and 3 in the budget
the decode rows leave) and decode steps (pass 1 alone) take turns: a new prompt
starts at the next step, and the decoders wait for one step of at most one chunk. Otherwise (and always under decode-first), in order:
1. Decode rows (one token each) of running groups, oldest group first. A beam
   group's beams always run together. If the KV store cannot hold the new
   tokens, the newest running group is preempted: its blocks are freed and it
   is recomputed later (the engine restarts beam groups from their prompt).
2. Prompt chunks of running groups still prefilling, in the budget left.
3. Waiting groups, first come first served, while the token budget, the row
   limit and free blocks allow. A prompt longer than the budget left is
   prefilled in chunks over several steps (chunked prefill), so a long prompt
   never stalls the decoding rows for more than one chunk.

A paused group (its client stopped reading: front/stream.py) is in no step and takes no row,
but keeps its KV while the store has room: resuming costs nothing. When a step needs blocks
that are not free, paused groups give theirs back first, oldest pause first, before any running
group is preempted; such a group recomputes its tokens once it resumes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceGroup, Status


POLICIES = ("prefill-first", "decode-first")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    # Tokens computed in one step; a prompt chunk takes what the decode rows leave.
    max_num_batched_tokens: int = 512
    # "prefill-first": prompt steps and decode steps take turns while both have work, so a new
    # request's first token is not computed beside every decoder; "decode-first": decode rows run
    # every step and prompts get the budget they leave.
    policy: str = "prefill-first"

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (every row decodes one token)")


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # position of the first token computed this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence: its last logits are used."""
        return self.start + self.num_tokens == len(self.seq.token_ids)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[SequenceGroup] = field(default_factory=list)
    # Paused groups whose KV this step took back: they recompute their tokens when they resume.
    reclaimed: list[SequenceGroup] = field(default_factory=list)
    # (src, dst) KV blocks to copy before the forward: copy-on-write of shared blocks.
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []  # in admission order, oldest first
        self.paused: list[SequenceGroup] = []  # in the order they paused
        self.num_preemptions = 0
        # Prefix cache lookups of admitted sequences, in tokens: asked (their reusable prefixes) and found.
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self._decodes_waited = False  # the last step was prompts only: this one runs the decode rows

    def add(self, group: SequenceGroup) -> None:
        group.status = Status.WAITING
        self.waiting.append(group)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def fits_ever(self, num_tokens: int, width: int = 1) -> bool:
        """Whether `width` sequences of `num_tokens` tokens, unshared, fit in the KV store at all."""
        return self.blocks.blocks_for(num_tokens) * width <= self.blocks.num_blocks

    @property
    def rows_in_use(self) -> int:
        return sum(g.width for g in self.running)

    def pause(self, group: SequenceGroup) -> None:
        """Take `group` out of the steps (it keeps its KV); a no-op unless it is waiting or running."""
        if group.status is Status.RUNNING:
            self.running.remove(group)
        elif group.status is Status.WAITING:
            self.waiting.remove(group)
        else:
            return
        self._set_status(group, Status.PAUSED)
        self.paused.append(group)

    def resume(self, group: SequenceGroup) -> None:
        """A paused group queues again, ahead of groups that never ran. If it kept its KV, that KV
        stays reclaimable while it waits (`_reclaim`), so a waiting group never blocks the queue."""
        if group.status is not Status.PAUSED:
            return
        self.paused.remove(group)
        self._set_status(group, Status.WAITING)
        self.waiting.appendleft(group)

    @property
    def num_paused_seqs(self) -> int:
        return sum(len(g.seqs) for g in self.paused)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        decodes_turn = False
        if self.config.policy == "prefill-first" and self._prefill_pending():
            # Prompt steps and decode steps take turns while both have work. A prompt step leaves
            # the decoders' share of the budget unused, so the one step they wait for is never
            # longer than a step that would have held them too.
            if not self._decodes_waited:
                decoding = self._decode_rows()
                budget = self._schedule_prefills(out, budget - decoding)
                self._schedule_waiting(out, budget)
                if out.chunks:
                    self._decodes_waited = decoding > 0
                    return out
                budget = self.config.max_num_batched_tokens
            decodes_turn = self._decodes_waited
        self._decodes_waited = False
        budget = self._schedule_decodes(out, budget)
        if decodes_turn and out.chunks:
            return out
        budget = self._schedule_prefills(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        if not out.chunks and len(self.running) > 1:
            # Every running group is stuck mid-prefill on a full store: free the newest
            # so the others can go on next step.
            self._preempt(self.running[-1], out)
        return out

    def _decode_rows(self) -> int:
        return sum(1 for g in self.running for s in g.seqs if s.num_pending == 1)

    def _prefill_pending(self) -> bool:
        return bool(self.waiting) or any(s.num_pending > 1 for g in self.running for s in g.seqs)

    # -- the three passes --------------------------------------------------------

    def _schedule_decodes(self, out: SchedulerOutput, budget: int) -> int:
        pending = deque(self.running)
        while pending:
            group = pending.popleft()
            rows = [s for s in group.seqs if s.num_pending == 1]
            if not rows or len(rows) > budget:
                continue
            need = self._blocks_needed(rows, 1)
            while need > self.blocks.num_free and not self._reclaim(need, out):
                victim = pending.pop() if pending else group
                self._preempt(victim, out)
                if victim is group:
                    break
                need = self._blocks_needed(rows, 1)
            if group.status is not Status.RUNNING:
                continue
            for seq in rows:
                self._take(seq, 1, out)
            budget -= len(rows)
        return budget

    def _schedule_prefills(self, out: SchedulerOutput, budget: int) -> int:
        for group in self.running:
            for seq in group.seqs:
                if seq.num_pending > 1 and budget > 0:
                    n = min(seq.num_pending, budget)
                    if self._reclaim(self._blocks_needed([seq], n), out):
                        self._take(seq, n, out)
                        budget -= n
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        rows = self.rows_in_use
        while self.waiting and budget > 0 and rows + self.waiting[0].width <= self.config.max_num_seqs:
            group = self.waiting[0]
            first = group.seqs[0]
            looked = self._take_cached(group)
            n = min(first.num_pending, budget)
            # Keep one block per running row in reserve so that admitting a prompt
            # does not force an immediate preemption of a decoding row.
            if not self._reclaim(self._blocks_needed([first], n) + rows, out, keep=group):
                for seq in looked:
                    self._free_seq_kv(seq)
                break
            self._count_cached(group, looked)
            self.waiting.popleft()
            self._set_status(group, Status.RUNNING)
            self.running.append(group)
            rows += group.width
            for seq in group.seqs:
                n = min(seq.num_pending, budget)
                if n and self._reclaim(self._blocks_needed([seq], n), out):
                    self._take(seq, n, out)
                    budget -= n

    # -- blocks --------------------------------------------------------------------

    def _blocks_needed(self, seqs: list[Sequence], n: int) -> int:
        need = 0
        writers: dict[int, int] = {}  # shared block -> how many of `seqs` write into it
        for seq in seqs:
            need += self.blocks.extra_blocks(seq.block_table, seq.num_computed + n)
            if self._writes_shared_block(seq):
                block = seq.block_table[seq.num_computed // self.blocks.block_size]
                writers[block] = writers.get(block, 0) + 1
        # Every writer but the last holder gets a copy; the last one keeps the block.
        return need + sum(min(w, self.blocks.refcount(b) - 1) for b, w in writers.items())

    def _reclaim(self, need: int, out: SchedulerOutput, keep: SequenceGroup | None = None) -> bool:
        """Whether `need` blocks are free, after taking back, if that is enough, the KV of groups
        that are in no step: paused ones (oldest pause first), then waiting ones that kept theirs
        (resumed, not yet admitted), never `keep`'s. Each loses all its KV (`out.reclaimed`)."""
        if self.blocks.num_free >= need:
            return True
        holders = [g for g in self.paused if g is not keep] + [g for g in self.waiting if g is not keep]
        holders = [g for g in holders if any(seq.block_table for seq in g.seqs)]
        if not holders or self.blocks.num_free + self._freed_with(holders) < need:
            return False  # nothing to gain: keep everybody's KV
        for group in holders:
            self._free_kv(group)
            out.reclaimed.append(group)
            if self.blocks.num_free >= need:
                break
        return True

    def _freed_with(self, groups: list[SequenceGroup]) -> int:
        """Blocks that freeing all of `groups`' KV would free (held by nobody else)."""
        held: dict[int, int] = {}
        for group in groups:
            for seq in group.seqs:
                for block in seq.block_table:
                    held[block] = held.get(block, 0) + 1
        return sum(1 for block, n in held.items() if n == self.blocks.refcount(block))

    def _writes_shared_block(self, seq: Sequence) -> bool:
        index = seq.num_computed // self.blocks.block_size
        return index < len(seq.block_table) and self.blocks.refcount(seq.block_table[index]) > 1

    def _take(self, seq: Sequence, n: int, out: SchedulerOutput) -> None:
        if self._writes_shared_block(seq):
            out.block_copies.append(self.blocks.make_writable(seq.block_table, seq.num_computed))
        self.blocks.grow(seq.block_table, seq.num_computed + n)
        out.chunks.append(ScheduledChunk(seq, seq.num_computed, n))

    def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        """Free a running group's KV; its sequences recompute their tokens later."""
        self._free_kv(group)
        self._set_status(group, Status.WAITING)
        self.running.remove(group)
        self.waiting.appendleft(group)
        out.preempted.append(group)
        self.num_preemptions += 1

    def _free_kv(self, group: SequenceGroup) -> None:
        for seq in group.seqs:
            self._free_seq_kv(seq)

    def _free_seq_kv(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.named_blocks = seq.tail_name = seq.num_computed = 0

    def _take_cached(self, group: SequenceGroup) -> list[Sequence]:
        """Give each sequence of `group` that has no KV the cached blocks of its longest cached
        prefix; the sequences looked up."""
        looked: list[Sequence] = []
        if self.blocks.cache is None:
            return looked
        for seq in group.seqs:
            if seq.num_computed or seq.block_table:
                continue
            seq.block_table, seq.tail_name = self.blocks.cached_prefix(seq.token_ids, seq.reusable_prefix_len)
            seq.named_blocks = len(seq.block_table)
            seq.num_computed = len(seq.block_table) * self.blocks.block_size
            looked.append(seq)
        return looked

    def _count_cached(self, group: SequenceGroup, looked: list[Sequence]) -> None:
        """At a request's first admission: its prompt's lookup, in the counters and its usage."""
        if group.cached_tokens is not None or not looked:
            return
        first = looked[0]
        group.cached_tokens = first.num_computed
        self.prefix_query_tokens += first.reusable_prefix_len
        self.prefix_hit_tokens += first.num_computed

    @staticmethod
    def _set_status(group: SequenceGroup, status: Status) -> None:
        group.status = status
        for seq in group.seqs:
            seq.status = status

    # -- after the step ----------------------------------------------------------------

    def step_done(self, out: SchedulerOutput) -> None:
        """The chunks of `out` now have their KV in the store."""
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.status is Status.FINISHED:  # its request failed in this step: its blocks are gone
                continue
            seq.num_computed += chunk.num_tokens
            seq.named_blocks, seq.tail_name = self.blocks.name_blocks(
                seq.block_table, seq.token_ids, seq.named_blocks, seq.tail_name, seq.num_computed)

    def branch(self, parent: Sequence, token_ids: list[int], seq_id: int) -> Sequence:
        """A sequence that shares `parent`'s computed KV and continues with `token_ids` (not yet a
        member of any group: `fork` adds it to one, beam reselection replaces members with it)."""
        return parent.child(seq_id, token_ids, self.blocks.fork(parent.block_table))

    def fork(self, group: SequenceGroup, parent: Sequence, token_ids: list[int], seq_id: int) -> Sequence:
        """A new member of `group` that shares `parent`'s computed KV and continues with `token_ids`."""
        child = self.branch(parent, token_ids, seq_id)
        group.seqs.append(child)
        return child

    def replace_members(self, group: SequenceGroup, members: list[Sequence]) -> None:
        """Swap a group's sequences (beam reselection): `members` come from `branch`."""
        for seq in group.seqs:
            self.blocks.free(seq.block_table)
            seq.status = Status.FINISHED
        group.seqs = members

    def finish_seq(self, group: SequenceGroup, seq: Sequence) -> None:
        """One member is done: free its blocks now; the group ends with its last member."""
        self.blocks.free(seq.block_table)
        seq.status = Status.FINISHED
        group.seqs.remove(seq)
        if not group.seqs:
            self.finish(group)

    def finish(self, group: SequenceGroup) -> None:
        """Remove `group` wherever it is and free all its blocks at once."""
        if group.status is Status.RUNNING:
            self.running.remove(group)
        elif group.status is Status.WAITING:
            self.waiting.remove(group)
        elif group.status is Status.PAUSED:
            self.paused.remove(group)
        for seq in group.seqs:
            self.blocks.free(seq.block_table)
        self._set_status(group, Status.FINISHED)

    def check_invariants(self) -> None:
        groups = list(self.waiting) + self.running + self.paused
        if len({id(g) for g in groups}) != len(groups):
            raise AssertionError("a group is queued twice")
        for group in groups:
            expected = (Status.WAITING if group in self.waiting else
                        Status.RUNNING if group in self.running else Status.PAUSED)
            if group.status is not expected:
                raise AssertionError(f"group {group.request_id} has status {group.status}, expected {expected}")
            for seq in group.seqs:
                if seq.status is not expected:
                    raise AssertionError(f"sequence {seq.seq_id} has status {seq.status}, expected {expected}")
                if self.blocks.blocks_for(seq.num_computed) > len(seq.block_table):
                    raise AssertionError(f"sequence {seq.seq_id} has KV beyond its blocks")
        if self.rows_in_use > self.config.max_num_seqs:
            raise AssertionError(f"{self.rows_in_use} rows running, limit {self.config.max_num_seqs}")
        self.blocks.check_invariants([s.block_table for g in groups for s in g.seqs])
