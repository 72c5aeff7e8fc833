"""What the SDK hands to users: plain frozen dataclasses, no protobuf.

Finish reasons are lowercase strings ("eos", "length", "stop_string", "cancelled",
"error"), None while a stream is still running, so callers never import generated code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system", "user", "assistant": whatever the model's chat template accepts
    content: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int = 0  # of prompt_tokens, those served from the server's prefix cache


@dataclass(frozen=True)
class TopToken:
    """One of the `top_n` most likely tokens at a generated position."""

    token_id: int
    text: str  # the token decoded alone
    logprob: float  # under the model's raw distribution (before penalties and sampling filters)

    @property
    def prob(self) -> float:
        return math.exp(self.logprob)


@dataclass(frozen=True)
class Hypothesis:
    """One returned sequence of a request; a result lists every one (num_return_sequences of them)."""

    token_ids: list[int]
    text: str
    # Beams: HF's sequences_scores (length-penalised sum of log-probs).
    # Samples: the sum of the tokens' log-probs.
    score: float
    finish_reason: str | None  # None in a provisional (still running) beam


@dataclass(frozen=True)
class StreamChunk:
    """One message of a stream: the tokens and text produced since the previous one.

    With `num_return_sequences` samples, `index` says which sample the chunk extends.
    Beam search streams no text: each chunk carries the whole best hypothesis so far
    (`provisional`; the SDK rebuilds it from the server's per-step edits), and the last one
    the n best, `hypotheses[0]` also as token_ids/text.
    The last chunk of every request lists every returned sequence in `hypotheses`.
    """

    request_id: str
    token_ids: list[int]
    logprobs: list[float]  # one per token, before temperature / top-k / top-p
    text: str  # a delta; the deltas of a stream (of one index) concatenate to the full text
    finish_reason: str | None  # set on the last chunk only
    usage: Usage | None  # set on the last chunk only
    error_message: str = ""  # set when finish_reason == "error"
    index: int = 0
    top_tokens: list[list[TopToken]] = field(default_factory=list)  # one list per token, top_n > 0
    provisional: bool = False
    hypotheses: list[Hypothesis] = field(default_factory=list)


@dataclass(frozen=True)
class GenerationResult:
    """The whole reply. With several sequences, token_ids/text are the first (best) one."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    usage: Usage
    error_message: str = ""  # set when finish_reason == "error"
    top_tokens: list[list[TopToken]] = field(default_factory=list)  # one list per token, top_n > 0
    hypotheses: list[Hypothesis] = field(default_factory=list)  # num_return_sequences of them


@dataclass(frozen=True)
class ScoreResult:
    request_id: str
    prompt_ids: list[int]
    continuation_ids: list[int]
    logprobs: list[float]  # log p(continuation_ids[i] | prompt, continuation_ids[:i])
    total_logprob: float
    usage: Usage | None = None  # prompt and continuation tokens, and how many came from the prefix cache


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int
    default_max_new_tokens: int  # used when neither max_new_tokens nor max_length is set
    max_stop_strings: int
    max_stop_string_length: int
    max_input_tokens: int
    max_num_seqs: int
    kv_cache_tokens: int
    max_num_beams: int
    max_num_return_sequences: int
    max_top_n: int


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    model_type: str
    context_length: int
    vocab_size: int
    eos_token_ids: list[int]
    has_chat_template: bool
    dtype: str
    device: str
    limits: Limits
    quantization: str = "none"  # the linear layers' weight format: "none", "gguf", "q4_1", ...
