"""What the SDK hands to users: plain frozen dataclasses, no protobuf.

Finish reasons are lowercase strings ("eos", "length", "stop_string", "cancelled",
"error"), None while a stream is still running, so callers never import generated code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system", "user", "assistant": whatever the model's chat template accepts
    content: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class StreamChunk:
    """One message of a stream: the tokens and text produced since the previous one."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]  # one per token, before temperature / top-k / top-p
    text: str  # a delta; the deltas of a stream concatenate to the full text
    finish_reason: str | None  # set on the last chunk only
    usage: Usage | None  # set on the last chunk only
    error_message: str = ""  # set when finish_reason == "error"


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    usage: Usage
    error_message: str = ""  # set when finish_reason == "error"


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int
    default_max_new_tokens: int  # used when neither max_new_tokens nor max_length is set
    max_stop_strings: int
    max_stop_string_length: int
    max_input_tokens: int
    max_num_seqs: int
    kv_cache_tokens: int


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
