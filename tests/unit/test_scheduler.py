"""The scheduler driven by a fake engine: chunked prefill, row and token limits, preemption, finishing.

No model: each step the "engine" appends a made-up token to every sequence whose chunk samples, and
finishes a sequence once it has its max_new_tokens. Tokens are numbered per sequence so a lost or
duplicated token shows up in the final output.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenloom.block_manager import BlockManager
from tokenloom.request import GenerationRequest, SamplingParams
from tokenloom.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from tokenloom.sequence import Sequence, Status

FIRST_FAKE_TOKEN = 100_000


def make_seq(seq_id: int, prompt_len: int, max_new_tokens: int) -> Sequence:
    request = GenerationRequest(
        request_id=f"req-{seq_id}",
        prompt_ids=tuple(range(1, prompt_len + 1)),
        params=SamplingParams(max_new_tokens=max_new_tokens),
    )
    return Sequence.from_request(seq_id, request)


def expected_output(seq: Sequence) -> list[int]:
    return [FIRST_FAKE_TOKEN + i for i in range(seq.request.params.max_new_tokens)]


class FakeEngine:
    """The engine's step loop without a model, checking what every step promises."""

    def __init__(self, *, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int):
        self.config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        self.blocks = BlockManager(num_blocks, block_size)
        self.sched = Scheduler(self.config, self.blocks)
        self.outputs: list[SchedulerOutput] = []
        # (step, seq, start, num_tokens, samples) per chunk; `samples` is read before the token
        # list grows, as the engine reads it.
        self.log: list[tuple[int, Sequence, int, int, bool]] = []
        self._next_start: dict[int, int] = {}  # where each sequence's next chunk must begin

    def add(self, seq: Sequence) -> None:
        self.sched.add(seq)
        self._next_start[seq.seq_id] = 0

    def step(self) -> SchedulerOutput:
        step = len(self.outputs)
        running_before = list(self.sched.running)
        out = self.sched.schedule()
        self._check_output(out, running_before)
        sampling = [c.seq for c in out.chunks if c.samples]
        for chunk in out.chunks:
            self.log.append((step, chunk.seq, chunk.start, chunk.num_tokens, chunk.seq in sampling))
        self.sched.step_done(out)
        for seq in sampling:
            seq.token_ids.append(FIRST_FAKE_TOKEN + seq.num_generated)
            if seq.num_generated >= seq.request.params.max_new_tokens:
                self.sched.finish(seq)
        self.sched.check_invariants()
        self.outputs.append(out)
        return out

    def _check_output(self, out: SchedulerOutput, running_before: list[Sequence]) -> None:
        assert out.num_tokens <= self.config.max_num_batched_tokens
        assert len(out.chunks) <= self.config.max_num_seqs
        assert len(self.sched.running) <= self.config.max_num_seqs
        seqs = [c.seq for c in out.chunks]
        assert len({id(s) for s in seqs}) == len(seqs), "a sequence is scheduled twice in one step"
        # Victims are the newest running sequences, newest first.
        if out.preempted:
            assert out.preempted == running_before[::-1][: len(out.preempted)]
        for victim in out.preempted:
            assert victim not in seqs
            assert victim.status is Status.WAITING and victim.block_table == [] and victim.num_computed == 0
            self._next_start[victim.seq_id] = 0
        for chunk in out.chunks:
            seq = chunk.seq
            assert chunk.num_tokens >= 1
            assert seq.status is Status.RUNNING
            assert chunk.start == self._next_start[seq.seq_id], "chunks of a sequence must be contiguous"
            assert chunk.start + chunk.num_tokens <= len(seq.token_ids)
            assert self.blocks.blocks_for(chunk.start + chunk.num_tokens) <= len(seq.block_table), (
                "the chunk's KV has no block to go to"
            )
            self._next_start[seq.seq_id] = chunk.start + chunk.num_tokens

    def run(self, max_steps: int) -> None:
        steps = 0
        while self.sched.has_work():
            assert steps < max_steps, "the scheduler made no progress"
            self.step()
            steps += 1

    def chunks_of(self, seq: Sequence) -> list[tuple[int, int, int, bool]]:
        """(step, start, num_tokens, samples) for every chunk of `seq`, in order."""
        return [(step, start, n, samples) for step, s, start, n, samples in self.log if s is seq]


# Configuration


def test_config_rejects_a_token_budget_smaller_than_the_row_limit():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=7)
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=0, max_num_batched_tokens=8)
    SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=8)


def test_fits_ever_compares_against_the_whole_store():
    sched = Scheduler(SchedulerConfig(), BlockManager(num_blocks=3, block_size=4))
    assert sched.fits_ever(1)
    assert sched.fits_ever(12)
    assert not sched.fits_ever(13)
    # Even while every block is in use, the answer is about the store's size, not what is free now.
    table: list[int] = []
    sched.blocks.grow(table, 12)
    assert sched.fits_ever(12)


# Chunked prefill


def test_a_prompt_longer_than_the_budget_is_prefilled_in_contiguous_chunks():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    seq = make_seq(0, prompt_len=50, max_new_tokens=3)
    eng.add(seq)
    eng.run(max_steps=20)

    chunks = eng.chunks_of(seq)
    prefill = chunks[:4]
    assert [(start, n) for _, start, n, _ in prefill] == [(0, 16), (16, 16), (32, 16), (48, 2)]
    assert [samples for *_, samples in prefill] == [False, False, False, True], "only the last chunk samples"
    # Then one token per step until done; the first sampled token came from the prefill.
    assert [(start, n, samples) for _, start, n, samples in chunks[4:]] == [(50, 1, True), (51, 1, True)]
    assert seq.generated_ids == expected_output(seq)


def test_a_prompt_exactly_the_budget_is_one_chunk():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    seq = make_seq(0, prompt_len=16, max_new_tokens=1)
    eng.add(seq)
    eng.run(max_steps=5)
    assert eng.chunks_of(seq) == [(0, 0, 16, True)]


def test_a_long_prompt_never_stalls_the_decoding_rows():
    eng = FakeEngine(num_blocks=256, block_size=4, max_num_seqs=8, max_num_batched_tokens=8)
    decoders = [make_seq(i, prompt_len=3, max_new_tokens=30) for i in range(3)]
    for seq in decoders:
        eng.add(seq)
    eng.step()  # all three prefill (9 tokens > 8: the third is chunked)
    eng.step()
    long_prompt = make_seq(9, prompt_len=100, max_new_tokens=2)
    eng.add(long_prompt)
    first_long_step = len(eng.outputs)
    for _ in range(10):
        out = eng.step()
        decoding = [c for c in out.chunks if c.seq in decoders]
        assert len(decoding) == 3, "every decoding row runs every step"
        assert all(c.num_tokens == 1 for c in decoding)
        # Running rows come first, the prompt chunk takes what they leave.
        assert [c.seq for c in out.chunks[:3]] == decoders
        assert out.chunks[3].seq is long_prompt and out.chunks[3].num_tokens == 8 - 3
    starts = [start for step, start, _, _ in eng.chunks_of(long_prompt) if step >= first_long_step]
    assert starts == [5 * i for i in range(10)]
    eng.run(max_steps=200)
    assert all(s.generated_ids == expected_output(s) for s in decoders + [long_prompt])


def test_decode_rows_are_scheduled_before_a_new_prompt():
    # A prompt that arrives while others decode gets only the budget they leave.
    eng = FakeEngine(num_blocks=256, block_size=4, max_num_seqs=4, max_num_batched_tokens=4)
    a, b = make_seq(0, 2, 20), make_seq(1, 2, 20)
    eng.add(a)
    eng.add(b)
    eng.step()
    c = make_seq(2, 40, 1)
    eng.add(c)
    out = eng.step()
    assert [(ch.seq, ch.num_tokens) for ch in out.chunks] == [(a, 1), (b, 1), (c, 2)]


# Row limit


def test_no_more_than_max_num_seqs_run_at_once():
    eng = FakeEngine(num_blocks=512, block_size=4, max_num_seqs=3, max_num_batched_tokens=64)
    seqs = [make_seq(i, prompt_len=5, max_new_tokens=4 + i) for i in range(10)]
    for seq in seqs:
        eng.add(seq)
    out = eng.step()
    assert [c.seq for c in out.chunks] == seqs[:3], "first come, first served"
    max_running = 0
    while eng.sched.has_work():
        eng.step()
        max_running = max(max_running, len(eng.sched.running))
        assert len(eng.sched.running) <= 3
    assert max_running == 3
    assert all(s.generated_ids == expected_output(s) for s in seqs)
    # A waiting sequence starts only once a row frees up: the fourth starts after the first finishes.
    first_done = max(step for step, *_ in eng.chunks_of(seqs[0]))
    fourth_start = min(step for step, *_ in eng.chunks_of(seqs[3]))
    assert fourth_start > first_done


# Preemption


def test_when_the_kv_store_runs_out_the_newest_sequence_is_preempted_and_recomputed():
    # 4 blocks of 2 tokens; each sequence needs 3 blocks at its longest (2 + 5 - 1 tokens).
    eng = FakeEngine(num_blocks=4, block_size=2, max_num_seqs=8, max_num_batched_tokens=64)
    old, new = make_seq(0, prompt_len=2, max_new_tokens=5), make_seq(1, prompt_len=2, max_new_tokens=5)
    eng.add(old)
    eng.add(new)

    preempt_step = None
    while preempt_step is None:
        out = eng.step()
        if out.preempted:
            preempt_step = len(eng.outputs) - 1
            assert out.preempted == [new]
            assert new.block_table == [] and new.num_computed == 0
            assert new.status is Status.WAITING and eng.sched.waiting[0] is new
            assert old in [c.seq for c in out.chunks], "the older sequence keeps running"
        assert len(eng.outputs) < 20
    generated_when_preempted = new.num_generated
    assert generated_when_preempted >= 1

    eng.run(max_steps=30)
    resumed = [c for c in eng.chunks_of(new) if c[0] > preempt_step]
    step, start, n, samples = resumed[0]
    assert start == 0, "a preempted sequence recomputes from the start"
    assert n == new.prompt_len + generated_when_preempted, "it recomputes the prompt and every generated token"
    assert samples, "and samples its next token right after"
    for seq in (old, new):
        assert seq.status is Status.FINISHED
        assert seq.generated_ids == expected_output(seq), "no token lost or duplicated by preemption"
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_a_preempted_sequence_resumes_before_sequences_queued_after_it():
    # Two rows at most: `late` waits behind the running pair, then `new` is preempted.
    eng = FakeEngine(num_blocks=4, block_size=2, max_num_seqs=2, max_num_batched_tokens=64)
    old, new, late = make_seq(0, 2, 5), make_seq(1, 2, 5), make_seq(2, 1, 1)
    for seq in (old, new, late):
        eng.add(seq)
    while not eng.step().preempted:
        assert late.status is Status.WAITING
    preempt_step = len(eng.outputs) - 1
    assert list(eng.sched.waiting) == [new, late], "the preempted sequence goes back to the head of the queue"
    eng.run(max_steps=30)
    new_resume = min(step for step, *_ in eng.chunks_of(new) if step > preempt_step)
    late_start = min(step for step, *_ in eng.chunks_of(late))
    assert new_resume <= late_start
    assert all(s.generated_ids == expected_output(s) for s in (old, new, late))


def test_preemption_under_pressure_still_gives_every_sequence_exactly_its_tokens():
    eng = FakeEngine(num_blocks=8, block_size=2, max_num_seqs=6, max_num_batched_tokens=12)
    seqs = [make_seq(i, prompt_len=1 + i % 3, max_new_tokens=6 + i) for i in range(6)]
    for seq in seqs:
        assert eng.sched.fits_ever(seq.prompt_len + seq.request.params.max_new_tokens)
        eng.add(seq)
    eng.run(max_steps=500)
    assert any(out.preempted for out in eng.outputs), "the store is too small: something must be preempted"
    for seq in seqs:
        assert seq.generated_ids == expected_output(seq)
        assert seq.token_ids[: seq.prompt_len] == list(seq.request.prompt_ids)
    assert eng.blocks.num_used == 0


# Finishing


def test_finishing_a_running_sequence_frees_all_its_blocks_at_once():
    eng = FakeEngine(num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = make_seq(0, 10, 50), make_seq(1, 10, 50)
    eng.add(a)
    eng.add(b)
    for _ in range(3):
        eng.step()
    held = len(a.block_table)
    assert held == 3
    free_before = eng.blocks.num_free
    eng.sched.finish(a)  # e.g. cancelled by the client
    assert a.status is Status.FINISHED and a.block_table == []
    assert eng.blocks.num_free == free_before + held
    assert a not in eng.sched.running
    eng.sched.check_invariants()
    out = eng.step()
    assert [c.seq for c in out.chunks] == [b]


def test_finishing_a_sequence_mid_prefill_frees_its_blocks():
    eng = FakeEngine(num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    seq = make_seq(0, 40, 5)
    eng.add(seq)
    eng.step()
    eng.step()
    assert seq.num_computed == 16 and len(seq.block_table) == 4
    eng.sched.finish(seq)
    assert eng.blocks.num_free == 32
    assert not eng.sched.has_work()
    eng.sched.check_invariants()


def test_finishing_a_waiting_sequence_removes_it_from_the_queue():
    eng = FakeEngine(num_blocks=32, block_size=4, max_num_seqs=1, max_num_batched_tokens=8)
    a, b, c = make_seq(0, 3, 4), make_seq(1, 3, 4), make_seq(2, 3, 4)
    for seq in (a, b, c):
        eng.add(seq)
    eng.step()
    assert b.status is Status.WAITING
    eng.sched.finish(b)
    assert b.status is Status.FINISHED and b not in eng.sched.waiting
    eng.sched.check_invariants()
    eng.run(max_steps=50)
    assert eng.chunks_of(b) == []
    assert a.generated_ids == expected_output(a) and c.generated_ids == expected_output(c)
    assert eng.blocks.num_free == 32


def test_finishing_a_preempted_sequence_leaves_nothing_behind():
    eng = FakeEngine(num_blocks=4, block_size=2, max_num_seqs=8, max_num_batched_tokens=64)
    old, new = make_seq(0, 2, 5), make_seq(1, 2, 5)
    eng.add(old)
    eng.add(new)
    while not eng.step().preempted:
        pass
    eng.sched.finish(new)
    assert new not in eng.sched.waiting
    eng.sched.check_invariants()
    eng.run(max_steps=20)
    assert old.generated_ids == expected_output(old)
    assert eng.blocks.num_free == eng.blocks.num_blocks


# Random workloads


@st.composite
def workloads(draw):
    block_size = draw(st.integers(1, 8))
    max_num_seqs = draw(st.integers(1, 6))
    budget = draw(st.integers(max_num_seqs, 48))
    n = draw(st.integers(1, 8))
    lengths = [(draw(st.integers(1, 40)), draw(st.integers(1, 12))) for _ in range(n)]
    longest = max(p + m for p, m in lengths)
    min_blocks = -(-longest // block_size)
    num_blocks = draw(st.integers(min_blocks, min_blocks * 3))
    arrivals = [draw(st.integers(0, 10)) for _ in range(n)]
    return block_size, max_num_seqs, budget, num_blocks, lengths, arrivals


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_random_workloads_finish_every_sequence_with_exactly_its_tokens(workload):
    block_size, max_num_seqs, budget, num_blocks, lengths, arrivals = workload
    eng = FakeEngine(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                   max_num_batched_tokens=budget)
    seqs = [make_seq(i, p, m) for i, (p, m) in enumerate(lengths)]
    for seq in seqs:
        assert eng.sched.fits_ever(seq.prompt_len + seq.request.params.max_new_tokens)
    # The oldest running sequence is never preempted, so it gains a token every step.
    bound = max(arrivals) + sum(p + m for p, m in lengths) + len(seqs)
    step = 0
    while step <= max(arrivals) or eng.sched.has_work():
        for seq, arrival in zip(seqs, arrivals):
            if arrival == step:
                eng.add(seq)
        if eng.sched.has_work():
            eng.step()
        step += 1
        assert step <= bound, "the scheduler stopped making progress"
    for seq in seqs:
        assert seq.status is Status.FINISHED
        assert seq.generated_ids == expected_output(seq)
    assert eng.blocks.num_used == 0
    assert eng.blocks.num_free == num_blocks
