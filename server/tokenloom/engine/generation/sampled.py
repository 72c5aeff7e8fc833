"""Greedy and sampled requests, with `num_return_sequences` samples of one prompt.

The prompt is computed once. Its last position's logits feed the first token of every sample
(n draws from one row); the samples other than the first then fork from the prompt's sequence,
sharing its KV blocks, and each streams under its own `index`. Samples keep their tokens across
a preemption: they recompute them, and a seeded draw depends only on (seed, index, k), so the
tokens that follow are the ones an unpreempted request would have drawn.

A resumed request (`request.resume`, tokens an interrupted stream already delivered) starts as a
preempted one would restart: each sample still running gets a sequence holding its tokens (they
are recomputed, then drawing goes on at the same positions, with the same numbers), and its
detokenizer and stop checks have seen them, so text goes on exactly where the client's ended.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...request import FinishReason, Hypothesis, TokenEvent
from .. import draws
from ..batch import Row, RowOutput
from ..detokenizer import IncrementalDetokenizer
from ..scheduler import ScheduledChunk, Scheduler
from ..sequence import Sequence
from ..stopping import check_stop
from .base import Generation


@dataclass
class _Sample:
    index: int
    detokenizer: IncrementalDetokenizer
    seq: Sequence | None = None  # None until forked from the prompt's first draw
    logprob_sum: float = 0.0
    result: Hypothesis | None = None  # set when the sample ends
    matcher: object | None = None  # a grammar.Matcher: where a constrained sample is in its constraint


class SampledGeneration(Generation):
    def __init__(self, group, context):
        super().__init__(group, context)
        p = self.params
        self.seed = p.seed if p.seed is not None else draws.fresh_seed()
        self.samples = [_Sample(i, context.text.stream()) for i in range(p.num_return_sequences)]
        if p.constraint is not None:
            for sample in self.samples:
                sample.matcher = context.grammars.matcher(p.constraint)
        if self.request.resume:
            self._resume(group)
        else:
            self.samples[0].seq = group.seqs[0]
        self._by_seq = {s.seq.seq_id: s for s in self.samples if s.seq is not None}

    def _resume(self, group) -> None:
        """Give each sample its resumed tokens; those they already end are finished, the others get
        a sequence of the prompt and their tokens (the group's first, then new ones)."""
        prompt = list(self.request.prompt_ids)
        spare = [group.seqs[0]]
        for sample in self.samples:
            tokens = self.request.resume[sample.index] if sample.index < len(self.request.resume) else ()
            reason = None
            for k, token in enumerate(tokens):
                delta = sample.detokenizer.add(token)
                reason = self._stop(token, k + 1, sample.detokenizer.text, len(delta), sample)
                if reason is not None:
                    sample.detokenizer.flush()
                    sample.result = Hypothesis(tuple(tokens[: k + 1]), sample.detokenizer.text, 0.0, reason)
                    break
            if reason is None:
                seq = spare.pop() if spare else Sequence(next(self.context.seq_ids), self.request, [])
                seq.token_ids = prompt + list(tokens)
                if seq is not group.seqs[0]:
                    group.seqs.append(seq)
                sample.seq = seq
        if spare:  # every sample had ended: nothing to compute
            self.finished_at_start = True

    def _stop(self, token: int, num_generated: int, text: str, new_text_len: int, sample: _Sample):
        p = self.params
        reason = check_stop(
            last_token=token, num_generated=num_generated, max_new_tokens=p.max_new_tokens,
            eos_token_ids=self.eos_token_ids, text=text, new_text_len=new_text_len, stop_strings=p.stop_strings,
        )
        if sample.matcher is not None and token not in self.eos_token_ids:
            sample.matcher.accept(token)
            if reason in (None, FinishReason.LENGTH) and sample.matcher.complete:
                reason = FinishReason.EOS  # the constraint is complete: only the end may follow
        return reason

    def row(self, chunk: ScheduledChunk) -> Row:
        if not chunk.samples:
            return Row.of(chunk)
        drawing = self._drawing(chunk.seq)
        k = chunk.seq.num_generated
        uniforms = tuple(draws.uniform(self.seed, s.index, k) if self.params.do_sample else None for s in drawing)
        # Samples drawn from one row are at the same place in the constraint (the prompt's end).
        allowed = drawing[0].matcher.mask() if drawing[0].matcher is not None else None
        return Row.of(chunk, sample=self.spec(chunk.seq, uniforms, allowed=allowed))

    def _drawing(self, seq: Sequence) -> list[_Sample]:
        """The samples a draw from `seq`'s logits is for: its own, plus, at the prompt's first
        token, every sample not forked yet."""
        own = self._by_seq[seq.seq_id]
        if seq.num_generated or self.request.resume:  # resumed: each sample has its own sequence
            return [own]
        return [own] + [s for s in self.samples if s.seq is None]

    def apply(self, results: list[tuple[Row, RowOutput]], scheduler: Scheduler) -> list[TokenEvent]:
        events = []
        for row, out in results:
            if row.sample is None:
                continue
            drawing = self._drawing(row.seq)
            if drawing[0].matcher is not None:
                drawing[0].matcher.check()  # the row's mask was filled: its draws kept to the constraint
            for sample, token in zip(drawing[1:], out.token_ids[1:]):
                sample.seq = scheduler.fork(self.group, row.seq, row.seq.token_ids + [token], next(self.context.seq_ids))
                self._by_seq[sample.seq.seq_id] = sample
            row.seq.token_ids.append(out.token_ids[0])
            events += [self._advance(s, out.logprobs[i], out.top_tokens, scheduler) for i, s in enumerate(drawing)]
        if events and all(s.result is not None for s in self.samples):
            events[-1] = self._final(events[-1])
        return events

    def _advance(self, sample: _Sample, logprob: float, top, scheduler: Scheduler) -> TokenEvent:
        """`sample` got its next token (already appended): stream it, and end the sample if it stops."""
        seq, p = sample.seq, self.params
        token = seq.token_ids[-1]
        sample.logprob_sum += logprob
        delta = sample.detokenizer.add(token)
        reason = self._stop(token, seq.num_generated, sample.detokenizer.text, len(delta), sample)
        if reason is not None:
            delta += sample.detokenizer.flush()
            sample.result = Hypothesis(tuple(seq.generated_ids), sample.detokenizer.text, sample.logprob_sum, reason)
            scheduler.finish_seq(self.group, seq)
        return TokenEvent(
            self.request_id, (token,), (logprob,), delta, finish_reason=reason, index=sample.index,
            top_tokens=(self.top_tokens(top),) if p.top_n else (),
        )

    def _final(self, last: TokenEvent) -> TokenEvent:
        """The request's last event: the last sample's last token, and every sample's result."""
        hypotheses = tuple(s.result for s in self.samples)
        return self.final_event(
            last.finish_reason, token_ids=last.token_ids, logprobs=last.logprobs, text=last.text, index=last.index,
            top_tokens=last.top_tokens, hypotheses=hypotheses,
            generated_tokens=sum(len(h.token_ids) for h in hypotheses),
        )

    def start_event(self) -> TokenEvent | None:
        if not self.finished_at_start:
            return None
        last = self.samples[-1]
        return self._final(TokenEvent(self.request_id, finish_reason=last.result.finish_reason, index=last.index))

    def generated_tokens(self) -> int:
        return sum(len(s.result.token_ids) if s.result is not None else s.seq.num_generated
                   for s in self.samples if s.seq is not None or s.result is not None)
