"""Parameter validation and defaulting: pure, no gRPC, no torch.

Every rule raises `InvalidArgument(field, message)` so the servicer can answer
INVALID_ARGUMENT with a message that names the field the user must change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .request import SamplingParams


class InvalidArgument(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Limits:
    """Server-side ceilings, from flags."""

    context_length: int
    max_new_tokens: int = 4096
    default_max_new_tokens: int = 256
    max_stop_strings: int = 16
    max_stop_string_length: int = 256
    max_chat_messages: int = 256


@dataclass(frozen=True)
class RawParams:
    """Parameters as the user sent them; None means "not set" (proto3 optional)."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()


def check_exactly_one_input(has_prompt: bool, has_messages: bool, has_ids: bool) -> None:
    given = sum((has_prompt, has_messages, has_ids))
    if given == 0:
        raise InvalidArgument("prompt", "empty input: set one of prompt, messages or input_ids")
    if given > 1:
        raise InvalidArgument("prompt", "set only one of prompt, messages or input_ids")


def check_prompt_ids(ids: list[int] | tuple[int, ...], vocab_size: int, limits: Limits) -> None:
    if not ids:
        raise InvalidArgument("prompt", "the input encodes to zero tokens")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidArgument("input_ids", f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    if len(ids) >= limits.context_length:
        raise InvalidArgument(
            "prompt",
            f"the prompt has {len(ids)} tokens; the context length is {limits.context_length}, "
            "and at least one token must be left to generate",
        )


def resolve_params(raw: RawParams, prompt_len: int, limits: Limits) -> SamplingParams:
    """Validate `raw` and apply HF `generate`'s defaults and length semantics."""
    return SamplingParams(
        max_new_tokens=_max_new_tokens(raw, prompt_len, limits),
        do_sample=raw.do_sample,
        temperature=_temperature(raw),
        top_k=_top_k(raw),
        top_p=_top_p(raw),
        seed=raw.seed,
        stop_strings=_stop_strings(raw, limits),
    )


def _max_new_tokens(raw: RawParams, prompt_len: int, limits: Limits) -> int:
    room = limits.context_length - prompt_len
    # HF: max_new_tokens wins over max_length when both are set.
    if raw.max_new_tokens is not None:
        if raw.max_new_tokens < 1:
            raise InvalidArgument("max_new_tokens", f"must be >= 1, got {raw.max_new_tokens}")
        if raw.max_new_tokens > limits.max_new_tokens:
            raise InvalidArgument(
                "max_new_tokens", f"{raw.max_new_tokens} is above the server limit {limits.max_new_tokens}"
            )
        if raw.max_new_tokens > room:
            raise InvalidArgument(
                "max_new_tokens",
                f"prompt ({prompt_len} tokens) + max_new_tokens ({raw.max_new_tokens}) exceeds "
                f"the context length {limits.context_length}; at most {room} new tokens fit",
            )
        return raw.max_new_tokens
    if raw.max_length is not None:
        if raw.max_length > limits.context_length:
            raise InvalidArgument(
                "max_length", f"{raw.max_length} exceeds the context length {limits.context_length}"
            )
        if raw.max_length <= prompt_len:
            raise InvalidArgument(
                "max_length",
                f"max_length ({raw.max_length}) counts the prompt ({prompt_len} tokens) and leaves "
                "no room to generate; raise it or use max_new_tokens",
            )
        if raw.max_length - prompt_len > limits.max_new_tokens:
            raise InvalidArgument(
                "max_length",
                f"max_length ({raw.max_length}) leaves {raw.max_length - prompt_len} new tokens, above "
                f"the server limit {limits.max_new_tokens}; lower it or set max_new_tokens",
            )
        return raw.max_length - prompt_len
    # Neither given: the server default, clamped to what the context leaves.
    return min(limits.default_max_new_tokens, room)


def _temperature(raw: RawParams) -> float:
    t = 1.0 if raw.temperature is None else raw.temperature
    if not math.isfinite(t):
        raise InvalidArgument("temperature", f"must be a finite number, got {t}")
    if t < 0 or (raw.do_sample and t == 0):
        raise InvalidArgument("temperature", f"must be > 0 when sampling, got {t}")
    if t > 100:
        raise InvalidArgument("temperature", f"must be <= 100, got {t}")
    return t


def _top_k(raw: RawParams) -> int:
    k = 50 if raw.top_k is None else raw.top_k
    if k < 0:
        raise InvalidArgument("top_k", f"must be >= 0 (0 disables it), got {k}")
    return k


def _top_p(raw: RawParams) -> float:
    p = 1.0 if raw.top_p is None else raw.top_p
    if not (math.isfinite(p) and 0.0 < p <= 1.0):
        raise InvalidArgument("top_p", f"must be in (0, 1], got {p}")
    return p


def _stop_strings(raw: RawParams, limits: Limits) -> tuple[str, ...]:
    if len(raw.stop_strings) > limits.max_stop_strings:
        raise InvalidArgument(
            "stop_strings", f"{len(raw.stop_strings)} given; at most {limits.max_stop_strings} are allowed"
        )
    for s in raw.stop_strings:
        if not s:
            raise InvalidArgument("stop_strings", "a stop string must not be empty")
        if len(s) > limits.max_stop_string_length:
            raise InvalidArgument(
                "stop_strings",
                f"a stop string has {len(s)} characters; at most {limits.max_stop_string_length} are allowed",
            )
    return tuple(raw.stop_strings)
