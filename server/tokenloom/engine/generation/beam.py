"""Beam search requests: every step all beams run, `BeamSearch` picks the next beams from their
candidates, and each new beam forks its parent's KV (the prompt is stored once).

While it runs, each step streams how the best running hypothesis changed since the previous
step (provisional, a `BestUpdate`: resending it whole made a stream's bytes quadratic in its
length); the last event carries the `num_return_sequences` best finished ones, whole. A
preempted beam request starts over from its prompt: beams recompute nothing of the old search.

A constrained beam request gives every beam a matcher of its own: each beam's candidates come from
its masked scores, and a new beam continues a copy of its parent's matcher. As in HF (a
`prefix_allowed_tokens_fn`), too few allowed tokens can fill a step's candidates with -inf ones; a
beam that took such a token runs on at -inf with no matcher. Only hypotheses that keep to the
constraint are returned: none of HF's empty slots, of its -1e9-penalised beams that ran on past
their EOS, or of those at -inf, so there may be fewer than `num_return_sequences`.
"""

from __future__ import annotations

import math
from collections import Counter

from ...request import BestUpdate, FinishReason, Hypothesis, TokenEvent
from ..batch import Row, RowOutput
from ..beam_search import BeamParams, BeamSearch
from ..scheduler import ScheduledChunk, Scheduler
from ..sequence import Sequence
from .base import Generation


class BeamGeneration(Generation):
    def __init__(self, group, context):
        super().__init__(group, context)
        self.search = self._new_search()
        self.matchers = self._new_matchers()
        # The best as the client holds it. Kept across a restart: the next update edits what was shown.
        self.shown: tuple[tuple[int, ...], str] = ((), "")

    def _new_matchers(self) -> dict[int, object]:
        """seq_id -> grammar.Matcher of each running beam that keeps to the constraint; {} unconstrained."""
        constraint = self.params.constraint
        return {} if constraint is None else {self.group.seqs[0].seq_id: self.context.grammars.matcher(constraint)}

    def _new_search(self) -> BeamSearch:
        p, prompt_len = self.params, self.group.num_prompt_tokens
        return BeamSearch(BeamParams(
            num_beams=p.num_beams, prompt_len=prompt_len, max_length=prompt_len + p.max_new_tokens,
            eos_token_ids=self.eos_token_ids, length_penalty=p.length_penalty, early_stopping=p.early_stopping,
            num_return_sequences=p.num_return_sequences,
        ))

    def restart(self) -> None:
        root = self.group.seqs[0]
        fresh = Sequence.from_request(root.seq_id, self.request)
        fresh.status = self.group.status  # waiting (preempted) or paused (its KV taken back)
        self.group.seqs = [fresh]
        self.search = self._new_search()
        self.matchers = self._new_matchers()

    def row(self, chunk: ScheduledChunk) -> Row:
        if not chunk.samples:
            return Row.of(chunk)
        matcher = self.matchers.get(chunk.seq.seq_id)
        return Row.of(chunk, sample=self.spec(chunk.seq, uniforms=(), beam_width=self.search.params.beams_to_keep,
                                              allowed=matcher.mask() if matcher is not None else None))

    def apply(self, results: list[tuple[Row, RowOutput]], scheduler: Scheduler) -> list[TokenEvent]:
        candidates = {row.seq.seq_id: out.candidates for row, out in results if row.sample is not None}
        if not candidates:
            return []  # a prompt chunk before the last
        beams = self.group.seqs
        missing = [b.seq_id for b in beams if b.seq_id not in candidates]
        if missing:
            raise RuntimeError(f"beams {missing} were not computed with the others")  # a scheduler bug
        for matcher in self.matchers.values():
            matcher.check()  # each beam's mask was filled: its candidates kept to the constraint
        step = self.search.step([candidates[b.seq_id] for b in beams])
        seq_ids = self.context.seq_ids
        members = [scheduler.branch(beams[parent], beams[parent].token_ids + [token], next(seq_ids))
                   for parent, token in zip(step.parents, step.tokens)]
        if self.params.constraint is not None:
            self.matchers = self._advance_matchers(beams, members, step)
        scheduler.replace_members(self.group, members)
        if step.done:
            return [self._final(scheduler)]
        return [TokenEvent(self.request_id, provisional=True, best_update=self._best_update())]

    def _advance_matchers(self, beams, members, step) -> dict[int, object]:
        """Each new beam's matcher: its parent's, copied, past the new token (an EOS leaves it where it
        was). None for a beam that took a token its parent's constraint did not allow (scored -inf)."""
        live = [math.isfinite(beam.score) for beam in self.search.running]
        children = Counter(parent for parent, ok in zip(step.parents, live) if ok)
        matchers = {}
        for child, parent, token, ok in zip(members, step.parents, step.tokens, live):
            matcher = self.matchers.get(beams[parent].seq_id)
            if matcher is None or not ok:
                continue
            children[parent] -= 1  # the parent's last child takes its matcher; the others copy it first
            matchers[child.seq_id] = matcher = matcher if children[parent] == 0 else matcher.fork()
            if token not in self.eos_token_ids:  # a beam that ended and runs on (HF keeps one, penalised
                matcher.accept(token)  # by -1e9, when too few are live) stays where it ended
        return matchers

    def _kept_to_constraint(self, h) -> bool:
        """Not an empty slot, nothing after an EOS (a beam that ended and ran on), no forbidden token."""
        return bool(h.token_ids) and h.score != -math.inf and not any(
            t in self.eos_token_ids for t in h.token_ids[:-1])

    def _best_update(self) -> BestUpdate:
        best = self.search.best_running()
        text = self.context.text.decode(best)
        update = BestUpdate.between(*self.shown, best, text)
        self.shown = (best, text)
        return update

    def _final(self, scheduler: Scheduler) -> TokenEvent:
        decode = self.context.text.decode
        hypotheses = tuple(
            Hypothesis(h.token_ids, decode(h.token_ids), h.score,
                       FinishReason.EOS if h.finished_by_eos else FinishReason.LENGTH)
            for h in self.search.results()
            if self.params.constraint is None or self._kept_to_constraint(h)
        )
        if not hypotheses:
            raise RuntimeError("beam search found no hypothesis that keeps to the constraint")
        scheduler.finish(self.group)
        best = hypotheses[0]
        return self.final_event(best.finish_reason, token_ids=best.token_ids, text=best.text, hypotheses=hypotheses,
                                generated_tokens=len(best.token_ids))

    def generated_tokens(self) -> int:
        return sum(s.num_generated for s in self.group.seqs)
