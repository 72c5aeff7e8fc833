"""Domain objects of one generation request, free of gRPC and torch.

The servicer turns protobuf messages into these; the engine turns them into
sequences and reports back with `TokenEvent`s.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EngineUnavailable(RuntimeError):
    """The engine is stopping or its thread has died: it takes no new requests."""


class RequestTooLarge(ValueError):
    """The request can never fit in the KV store."""


class FinishReason(enum.Enum):
    EOS = "eos"
    LENGTH = "length"
    STOP_STRING = "stop_string"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class Constraint:
    """What every generated sequence must be a sentence of: `kind` is json_schema, json_object, regex,
    grammar or choice; `text` the schema, regex or Lark grammar (for choice: a JSON list of strings).
    `compiled`: the grammar engine's compiled form, set by the front once it compiled it (so that the
    engine's thread never compiles); not part of what the constraint is (equality, hash)."""

    kind: str
    text: str = ""
    compiled: object = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters after validation and defaulting (HF `generate` names).

    `max_new_tokens` is already resolved from max_new_tokens / max_length and
    the context length, so the engine needs no model facts to apply it.
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # False, True or "never", as HF
    num_return_sequences: int = 1
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    min_p: float = 0.0
    typical_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_n: int = 0
    constraint: Constraint | None = None

    @property
    def is_beam(self) -> bool:
        return self.num_beams > 1

    @property
    def width(self) -> int:
        """Rows this request occupies in a step once it runs."""
        return max(self.num_beams, self.num_return_sequences)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float = 0.0
    # Scoring requests only: prompt_ids = prompt + continuation, and the continuation
    # starts at this index. Nothing is generated.
    score_from: int | None = None
    # Resumed generation: tokens already generated, per sample index (fixed output; see the proto).
    resume: tuple[tuple[int, ...], ...] = ()

    @property
    def max_len(self) -> int:
        """The most tokens one of its sequences can hold: the KV it may need per row."""
        return len(self.prompt_ids) + (0 if self.score_from is not None else self.params.max_new_tokens)


@dataclass(frozen=True)
class TopToken:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class Hypothesis:
    """One returned sequence of a request with several (beams, n samples)."""

    token_ids: tuple[int, ...]
    text: str
    score: float
    finish_reason: FinishReason


@dataclass(frozen=True)
class BestUpdate:
    """Beam progress: the new best running hypothesis as an edit of the one shown before.

    The client keeps the first `keep_tokens` ids and `keep_text_bytes` UTF-8 bytes of the text it
    holds and appends `token_ids` and `text_suffix` (the proto's BestUpdate says the same).
    """

    keep_tokens: int
    token_ids: tuple[int, ...]
    keep_text_bytes: int
    text_suffix: str

    @classmethod
    def between(cls, old_ids: tuple[int, ...], old_text: str, ids: tuple[int, ...], text: str) -> BestUpdate:
        keep = _common_prefix_len(old_ids, ids)
        keep_chars = _common_prefix_len(old_text, text)  # in characters, so the byte cut is a boundary
        return cls(keep, tuple(ids[keep:]), len(text[:keep_chars].encode()), text[keep_chars:])


def _common_prefix_len(a, b) -> int:
    """By slice comparisons (C loops), not a Python loop: it runs for every beam request every step."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n  # the usual step: the best grew by one token
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class TokenEvent:
    """What one engine step produced for one request.

    `token_ids` may be empty (e.g. cancelled, or text held back for an
    incomplete character). `finish_reason` ends the sequence `index`; `final`
    ends the request (the last event of every request has it).
    """

    request_id: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    text: str = ""
    finish_reason: FinishReason | None = None
    final: bool = False
    index: int = 0
    top_tokens: tuple[tuple[TopToken, ...], ...] = ()
    provisional: bool = False  # beams: `best_update` says how the best so far changed
    hypotheses: tuple[Hypothesis, ...] = ()
    best_update: BestUpdate | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    error: str = ""


@dataclass
class GenerationOutput:
    """A whole result, accumulated from a request's events."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    top_tokens: list[tuple[TopToken, ...]] = field(default_factory=list)
    hypotheses: tuple[Hypothesis, ...] = ()
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""

    def add(self, event: TokenEvent) -> None:
        if event.index == 0 and not event.provisional:
            self.token_ids.extend(event.token_ids)
            self.logprobs.extend(event.logprobs)
            self.text += event.text
            self.top_tokens.extend(event.top_tokens)
            if event.finish_reason is not None:
                self.finish_reason = event.finish_reason
        if event.final:
            self.hypotheses = event.hypotheses
            self.finish_reason = event.finish_reason or self.finish_reason
            self.prompt_tokens = event.prompt_tokens
            self.generated_tokens = event.generated_tokens
            self.cached_tokens = event.cached_tokens
            self.error = event.error
