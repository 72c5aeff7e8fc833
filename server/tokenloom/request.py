"""Domain objects of one generation request, free of gRPC and torch.

The servicer turns protobuf messages into these; the engine turns them into
sequences and reports back with `TokenEvent`s.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.Enum):
    EOS = "eos"
    LENGTH = "length"
    STOP_STRING = "stop_string"
    CANCELLED = "cancelled"
    ERROR = "error"


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


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float = 0.0


@dataclass(frozen=True)
class TokenEvent:
    """What one engine step produced for one request.

    `token_ids` may be empty on the final event (e.g. cancelled) or when the
    detokenizer holds back an incomplete character; `text` is the matching delta.
    """

    request_id: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class GenerationOutput:
    """A whole result, accumulated from a request's events."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    error: str = ""

    def add(self, event: TokenEvent) -> None:
        self.token_ids.extend(event.token_ids)
        self.logprobs.extend(event.logprobs)
        self.text += event.text
        if event.finished:
            self.finish_reason = event.finish_reason
            self.prompt_tokens = event.prompt_tokens
            self.generated_tokens = event.generated_tokens
            self.error = event.error
