"""What one step asks of the executor, and what the executor answers: plain data, no torch.

The scheduler decides which sequences compute which tokens (`ScheduledChunk`s); each request's
mode turns its chunks into `Row`s, saying what the step must produce from them: a draw from the
last position (`SampleSpec`), log-probabilities of known tokens (scoring), or nothing (a prompt
chunk before the last). The executor answers one `RowOutput` per row, in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence as Tokens
from dataclasses import dataclass, field

from ..request import SamplingParams
from .scheduler import ScheduledChunk
from .sequence import Sequence


@dataclass(frozen=True, slots=True)
class SampleSpec:
    """Draw the next token(s) from the logits of a row's last computed position."""

    params: SamplingParams
    token_ids: Tokens[int]  # the sequence so far, prompt included: the penalties' history
    prompt_len: int  # min_new_tokens counts generated tokens from here
    eos_token_ids: frozenset[int]  # what min_new_tokens holds back (the request's own EOS set)
    # One entry per draw: a uniform in [0, 1) for a sampled draw, None for the argmax. A prompt
    # whose n samples all start from its one forward draws n times from the same logits.
    uniforms: tuple[float | None, ...] = (None,)
    beam_width: int = 0  # > 0: no draw; return this many (token, processed log-prob) candidates
    # Constrained rows: a future of the allowed tokens' int32 bitmask (bit t of word t // 32), filled by
    # the grammar thread while the model runs (engine/grammar.py); None: every token is allowed.
    allowed: object = None


@dataclass(frozen=True, slots=True)
class Row:
    """One sequence's work in a step: compute the KV of `seq.token_ids[start : start + num_tokens]`,
    then produce what `sample` or `scored` ask for."""

    seq: Sequence  # token ids and block table (read, never changed, by the executor)
    start: int
    num_tokens: int
    sample: SampleSpec | None = None
    # Positions whose next token is already known (scoring): the log-probability of
    # seq.token_ids[p + 1] under the logits at position p, for each p in `scored`.
    scored: range = range(0)

    @classmethod
    def of(cls, chunk: ScheduledChunk, sample: SampleSpec | None = None, scored: range = range(0)) -> "Row":
        return cls(chunk.seq, chunk.start, chunk.num_tokens, sample, scored)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def request_id(self) -> str:
        return self.seq.request_id


@dataclass(slots=True)
class RowOutput:
    """What the executor produced for one row (lists, so nothing downstream needs torch)."""

    token_ids: list[int] = field(default_factory=list)  # one per draw
    logprobs: list[float] = field(default_factory=list)  # each drawn token's raw model log-prob
    top_tokens: list[tuple[int, float]] = field(default_factory=list)  # top_n alternatives, raw log-probs
    candidates: list[tuple[int, float]] = field(default_factory=list)  # beam rows: processed log-probs
    scored_logprobs: list[float] = field(default_factory=list)  # one per position of Row.scored


@dataclass(frozen=True, slots=True)
class Batch:
    """A step's rows and the KV block copies (copy-on-write of shared blocks) that go first."""

    rows: list[Row]
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(row.num_tokens for row in self.rows)
