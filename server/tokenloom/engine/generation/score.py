"""Scoring requests: prefill prompt + continuation and read the log-probability of every
continuation token; nothing is generated.

Position p predicts token p + 1, so a chunk contributes the positions from
max(its start, score_from - 1) up to the sequence's second-to-last token. A preempted scoring
request recomputes, and its log-probabilities are collected again from the start.
"""

from __future__ import annotations

from ...request import FinishReason, TokenEvent
from ..batch import Row, RowOutput
from ..scheduler import ScheduledChunk, Scheduler
from .base import Generation


class ScoreGeneration(Generation):
    def __init__(self, group, context):
        super().__init__(group, context)
        self.logprobs: list[float] = []

    def restart(self) -> None:
        self.logprobs.clear()

    def row(self, chunk: ScheduledChunk) -> Row:
        seq, end = chunk.seq, chunk.start + chunk.num_tokens
        return Row.of(chunk, scored=range(max(chunk.start, self.request.score_from - 1), min(end, len(seq.token_ids) - 1)))

    def apply(self, results: list[tuple[Row, RowOutput]], scheduler: Scheduler) -> list[TokenEvent]:
        done = False
        for row, out in results:
            self.logprobs.extend(out.scored_logprobs)
            done = done or row.end == len(row.seq.token_ids)
        if not done:
            return []
        scheduler.finish(self.group)
        request = self.request
        return [self.final_event(
            FinishReason.LENGTH, token_ids=request.prompt_ids[request.score_from:], logprobs=tuple(self.logprobs),
            prompt_tokens=request.score_from, generated_tokens=0,
        )]

    def generated_tokens(self) -> int:
        return 0
