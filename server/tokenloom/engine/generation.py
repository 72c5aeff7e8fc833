"""One live request on the engine side: its sequence group and what turns sampled tokens into events.

Three kinds of request share this bookkeeping:
- plain and sampled requests, and `num_return_sequences` samples forked from the
  prompt once it is prefilled (each sample streams under its own `index`);
- beam search, whose beams are reselected every step by `BeamSearch` and forked
  from their parents' KV (the prompt is stored once);
- scoring, which only prefills and reads the log-probabilities of its continuation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from .beam_search import BeamParams, BeamSearch
from .detokenizer import IncrementalDetokenizer
from ..executor.logits_processors import RowContext
from ..request import FinishReason, Hypothesis, TokenEvent, TopToken
from ..executor.sampler import RowRandom, RowResult, SampleRow
from .scheduler import Scheduler
from .sequence import Sequence, SequenceGroup
from .stopping import check_stop


@dataclass
class _Sample:
    """Per-sequence state of a plain or sampled sequence."""

    index: int
    detokenizer: IncrementalDetokenizer
    random: RowRandom | None
    logprob_sum: float = 0.0


@dataclass
class Generation:
    group: SequenceGroup
    tokenizer: object
    eos_token_ids: frozenset[int]
    token_text: Callable[[int], str]
    seq_ids: Iterator[int]
    samples: dict[int, _Sample] = field(default_factory=dict)  # by seq_id
    beams: BeamSearch | None = None
    finished: list[tuple[int, Hypothesis]] = field(default_factory=list)
    score_logprobs: list[float] = field(default_factory=list)

    def __post_init__(self):
        params = self.params
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        self.eos_token_ids = eos | frozenset(params.stop_token_ids)
        self.restart()

    @property
    def params(self):
        return self.group.request.params

    @property
    def request_id(self) -> str:
        return self.group.request_id

    @property
    def is_scoring(self) -> bool:
        return self.group.request.score_from is not None

    def restart(self) -> None:
        """(Re)initialise after admission or preemption: beam groups start over from their
        prompt, scoring recomputes its log-probabilities, samples keep their tokens."""
        self.score_logprobs.clear()
        root = self.group.seqs[0]
        if self.params.is_beam:
            self.group.seqs = [Sequence.from_request(root.seq_id, self.group.request)]
            self.beams = BeamSearch(self._beam_params())
        elif not self.samples:
            self.samples[root.seq_id] = self._new_sample(0)

    def _new_sample(self, index: int) -> _Sample:
        seed = self.params.seed
        random = RowRandom(None if seed is None else seed + index) if self.params.do_sample else None
        return _Sample(index, IncrementalDetokenizer(self.tokenizer), random)

    def _beam_params(self) -> BeamParams:
        p = self.params
        prompt_len = len(self.group.request.prompt_ids)
        return BeamParams(
            num_beams=p.num_beams, prompt_len=prompt_len, max_length=prompt_len + p.max_new_tokens,
            eos_token_ids=self.eos_token_ids, length_penalty=p.length_penalty,
            early_stopping=p.early_stopping, num_return_sequences=p.num_return_sequences,
        )

    # -- what the sampler needs --------------------------------------------------------

    def sample_row(self, seq: Sequence) -> SampleRow:
        p = self.params
        context = RowContext(
            token_ids=seq.token_ids, prompt_len=seq.prompt_len, repetition_penalty=p.repetition_penalty,
            no_repeat_ngram_size=p.no_repeat_ngram_size, min_new_tokens=p.min_new_tokens,
            eos_token_ids=self.eos_token_ids,
        )
        if self.beams is not None:
            return SampleRow(p, context, [], beam_candidates=self.beams.params.beams_to_keep)
        if seq.num_generated == 0 and p.num_return_sequences > 1 and len(self.group.seqs) == 1:
            # The prompt's one forward feeds all n samples: draw n tokens from it.
            for i in range(1, p.num_return_sequences):
                self.samples.setdefault(-i, self._new_sample(i))
            randoms = [self.samples[seq.seq_id].random] + [self.samples[-i].random for i in range(1, p.num_return_sequences)]
            return SampleRow(p, context, randoms)
        return SampleRow(p, context, [self.samples[seq.seq_id].random])

    # -- applying results ------------------------------------------------------------------

    def on_sampled(self, seq: Sequence, result: RowResult, scheduler: Scheduler) -> list[TokenEvent]:
        """A plain/sampled sequence got its next token(s); n > 1 draws fork the prompt into samples."""
        seqs = [seq]
        for i, token in enumerate(result.token_ids[1:], start=1):
            child = scheduler.fork(self.group, seq, seq.token_ids + [token], next(self.seq_ids))
            self.samples[child.seq_id] = self.samples.pop(-i)
            seqs.append(child)
        seq.token_ids.append(result.token_ids[0])
        events = [self._advance(s, result.logprobs[i], result.top_tokens, scheduler) for i, s in enumerate(seqs)]
        if not self.group.seqs:
            events[-1] = self._final(events[-1])
        return events

    def _advance(self, seq: Sequence, logprob: float, top, scheduler: Scheduler) -> TokenEvent:
        sample = self.samples[seq.seq_id]
        token = seq.token_ids[-1]
        sample.logprob_sum += logprob
        delta = sample.detokenizer.add(token)
        reason = check_stop(
            last_token=token, num_generated=seq.num_generated, max_new_tokens=self.params.max_new_tokens,
            eos_token_ids=self.eos_token_ids, text=sample.detokenizer.text, new_text_len=len(delta),
            stop_strings=self.params.stop_strings,
        )
        if reason is not None:
            delta += sample.detokenizer.flush()
            text = sample.detokenizer.text
            self.finished.append((sample.index, Hypothesis(tuple(seq.generated_ids), text, sample.logprob_sum, reason)))
            scheduler.finish_seq(self.group, seq)
        return TokenEvent(
            self.request_id, (token,), (logprob,), delta, finish_reason=reason, index=sample.index,
            top_tokens=(self._top(top),) if self.params.top_n else (),
        )

    def _top(self, top: list[tuple[int, float]]) -> tuple[TopToken, ...]:
        return tuple(TopToken(t, self.token_text(t), lp) for t, lp in top)

    def on_beam_step(self, results: list[RowResult], scheduler: Scheduler) -> list[TokenEvent]:
        """All beams of the group were computed this step: reselect them (forking KV) or finish."""
        old = self.group.seqs
        step = self.beams.step([r.candidates for r in results])
        children = [
            old[p].child(next(self.seq_ids), old[p].token_ids + [t], scheduler.blocks.fork(old[p].block_table))
            for p, t in zip(step.parents, step.tokens)
        ]
        scheduler.replace_members(self.group, children)
        if step.done:
            return [self._beam_final(scheduler)]
        best = self.beams.best_running()
        provisional = Hypothesis(best, self.tokenizer.decode(list(best), skip_special_tokens=True), 0.0, None)
        return [TokenEvent(self.request_id, provisional=True, hypotheses=(provisional,))]

    def _beam_final(self, scheduler: Scheduler) -> TokenEvent:
        hyps = tuple(
            Hypothesis(h.token_ids, self.tokenizer.decode(list(h.token_ids), skip_special_tokens=True), h.score,
                       FinishReason.EOS if h.finished_by_eos else FinishReason.LENGTH)
            for h in self.beams.results()
        )
        scheduler.finish(self.group)
        best = hyps[0]
        return TokenEvent(
            self.request_id, best.token_ids, (), best.text, finish_reason=best.finish_reason, final=True,
            hypotheses=hyps, prompt_tokens=self.group.num_prompt_tokens, generated_tokens=len(best.token_ids),
        )

    def on_scores(self, logprobs: list[float], last_chunk: bool, scheduler: Scheduler) -> list[TokenEvent]:
        self.score_logprobs.extend(logprobs)
        if not last_chunk:
            return []
        scheduler.finish(self.group)
        request = self.group.request
        continuation = request.prompt_ids[request.score_from:]
        return [TokenEvent(
            self.request_id, continuation, tuple(self.score_logprobs), final=True, finish_reason=FinishReason.LENGTH,
            prompt_tokens=request.score_from, generated_tokens=0,
        )]

    # -- endings -------------------------------------------------------------------------------

    def _final(self, last: TokenEvent) -> TokenEvent:
        """The request's last event: every sample is done."""
        hyps = tuple(h for _, h in sorted(self.finished, key=lambda ih: ih[0]))
        generated = sum(len(h.token_ids) for h in hyps)
        return TokenEvent(
            last.request_id, last.token_ids, last.logprobs, last.text, last.finish_reason, final=True,
            index=last.index, top_tokens=last.top_tokens,
            hypotheses=hyps if self.params.num_return_sequences > 1 else (),
            prompt_tokens=self.group.num_prompt_tokens, generated_tokens=generated,
        )

    def abort(self, reason: FinishReason, scheduler: Scheduler, error: str = "") -> TokenEvent:
        generated = sum(s.num_generated for s in self.group.seqs) + sum(len(h.token_ids) for _, h in self.finished)
        scheduler.finish(self.group)
        return TokenEvent(
            self.request_id, finish_reason=reason, final=True, prompt_tokens=self.group.num_prompt_tokens,
            generated_tokens=generated, error=error,
        )
