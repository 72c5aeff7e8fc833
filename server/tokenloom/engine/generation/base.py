"""One live request on the engine side: the interface every decoding mode implements.

The engine picks a mode once, at admission (`generation.start`), and then only calls
- `row(chunk)`: what this step must produce from one of the request's scheduled chunks;
- `apply(results, scheduler)`: this step's outputs for the request's rows -> the events to stream;
- `restart()`: after a preemption freed the request's KV (its sequences recompute);
- `abort(reason, scheduler, error)`: end it now (cancelled, failed), freeing its blocks.
Modes are pure Python: they read and write sequences and the scheduler's block tables, never a
tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from ...request import FinishReason, GenerationRequest, SamplingParams, TokenEvent, TopToken
from ..batch import Row, RowOutput, SampleSpec
from ..detokenizer import IncrementalDetokenizer
from ..scheduler import ScheduledChunk, Scheduler
from ..sequence import Sequence, SequenceGroup


class TokenText:
    """The tokenizer as the modes use it: a detokenizer per streamed sequence, the text of single
    tokens (top-N alternatives; cached, the vocabulary is finite) and whole decodes (beams)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._tokens: dict[int, str] = {}

    def stream(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer)

    def token(self, token_id: int) -> str:
        text = self._tokens.get(token_id)
        if text is None:
            text = self._tokens[token_id] = self.tokenizer.decode([token_id])
        return text

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


@dataclass(frozen=True)
class GenerationContext:
    """What every mode shares: the tokenizer, the model's EOS ids, the sequence id counter, and the
    grammar engine of constrained requests (engine/grammar.py)."""

    text: TokenText
    eos_token_ids: frozenset[int]
    seq_ids: Iterator[int]
    grammars: object | None = None  # a grammar.Grammars


class Generation(ABC):
    def __init__(self, group: SequenceGroup, context: GenerationContext):
        self.group = group
        self.context = context
        p = self.params
        model_eos = frozenset() if p.ignore_eos else context.eos_token_ids
        self.eos_token_ids = model_eos | frozenset(p.stop_token_ids)  # what ends a sequence of this request

    @property
    def request(self) -> GenerationRequest:
        return self.group.request

    @property
    def params(self) -> SamplingParams:
        return self.group.request.params

    @property
    def request_id(self) -> str:
        return self.group.request_id

    @abstractmethod
    def row(self, chunk: ScheduledChunk) -> Row:
        """What this step must produce from `chunk` (one of this request's scheduled chunks)."""

    @abstractmethod
    def apply(self, results: list[tuple[Row, RowOutput]], scheduler: Scheduler) -> list[TokenEvent]:
        """This step's outputs for this request's rows (their KV is in the store): the events to send.
        The request's last event has `final` set, and its sequences are finished by then."""

    finished_at_start = False  # a resumed request whose every sequence had already ended

    def start_event(self) -> TokenEvent | None:
        """The final event of a request that ends as soon as it starts (`finished_at_start`), else None."""
        return None

    def restart(self) -> None:
        """A preemption freed this request's KV; its sequences recompute from position 0."""

    @abstractmethod
    def generated_tokens(self) -> int:
        """Tokens generated so far, over all sequences (usage of a request that ends early)."""

    def abort(self, reason: FinishReason, scheduler: Scheduler, error: str = "") -> TokenEvent:
        generated = self.generated_tokens()
        scheduler.finish(self.group)
        return self.final_event(reason, generated_tokens=generated, error=error)

    # -- for the modes -------------------------------------------------------------------

    def spec(self, seq: Sequence, uniforms: tuple[float | None, ...] = (None,), beam_width: int = 0,
             allowed=None) -> SampleSpec:
        return SampleSpec(self.params, seq.token_ids, seq.prompt_len, self.eos_token_ids, uniforms, beam_width,
                          allowed)

    def top_tokens(self, top: list[tuple[int, float]]) -> tuple[TopToken, ...]:
        return tuple(TopToken(t, self.context.text.token(t), logprob) for t, logprob in top)

    def final_event(self, reason: FinishReason | None, **fields) -> TokenEvent:
        fields.setdefault("prompt_tokens", self.group.num_prompt_tokens)
        fields.setdefault("cached_tokens", self.group.cached_tokens or 0)
        return TokenEvent(self.request_id, finish_reason=reason, final=True, **fields)
