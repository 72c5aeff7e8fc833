"""Parameter validation and defaulting: pure, no gRPC, no torch.

Every rule raises `InvalidArgument(field, message)` so the servicer can answer
INVALID_ARGUMENT with a message that names the field the user must change.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from ..request import Constraint, SamplingParams


MAX_LENGTH_PENALTY = 10.0


class InvalidArgument(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message  # the message without the field's name (a front may name the field its own way)


@dataclass(frozen=True)
class Limits:
    """Server-side ceilings: built once from flags, then `resolved` against the loaded model.

    ModelInfo reports each field that its `Limits` message names the same way (servicer.py)."""

    # What a prompt plus its new tokens may span: None until `resolved` knows the model's own.
    context_length: int | None = None
    max_model_len: int | None = None  # caps the model's context length (--max-model-len); None or 0: no cap
    max_new_tokens: int = 4096
    default_max_new_tokens: int = 256
    max_stop_strings: int = 16
    max_stop_string_length: int = 256
    max_chat_messages: int = 256
    max_num_beams: int = 8
    max_num_return_sequences: int = 8
    max_top_n: int = 20
    max_stop_token_ids: int = 16
    max_constraint_bytes: int = 65536  # a JSON schema, regex or grammar's text (--max-constraint-bytes)
    max_grammar_size: int = 200_000  # what one constraint may compile to, in grammar symbols (--max-grammar-size)

    def resolved(self, model_context_length: int, max_num_seqs: int) -> Limits:
        """These limits for a model whose context length is `model_context_length`, served `max_num_seqs`
        rows a step."""
        context = min(model_context_length, self.max_model_len) if self.max_model_len else model_context_length
        return dataclasses.replace(
            self,
            context_length=context,
            # A request's beams or samples run in one step: never wider than a step.
            max_num_beams=min(self.max_num_beams, max_num_seqs),
            max_num_return_sequences=min(self.max_num_return_sequences, max_num_seqs),
        )


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
    num_beams: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | str = False
    num_return_sequences: int | None = None
    no_repeat_ngram_size: int | None = None
    repetition_penalty: float | None = None
    min_new_tokens: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_n: int | None = None
    constraint: Constraint | None = None


CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")


def check_exactly_one_input(has_prompt: bool, has_messages: bool, has_ids: bool) -> None:
    given = sum((has_prompt, has_messages, has_ids))
    if given == 0:
        raise InvalidArgument("prompt", "empty input: set one of prompt, messages or input_ids")
    if given > 1:
        raise InvalidArgument("prompt", "set only one of prompt, messages or input_ids")


def check_prompt_ids(
    ids: list[int] | tuple[int, ...], vocab_size: int, limits: Limits, ids_field: str = "input_ids"
) -> None:
    """`ids_field` names the request's id field in errors (ScoreRequest calls it prompt_ids)."""
    if not ids:
        raise InvalidArgument("prompt", "the input encodes to zero tokens")
    check_token_ids(ids_field, tuple(ids), vocab_size)
    if len(ids) >= limits.context_length:
        raise InvalidArgument(
            "prompt",
            f"the prompt has {len(ids)} tokens; the context length is {limits.context_length}, "
            "and at least one token must be left to generate",
        )


def check_token_ids(field: str, ids: tuple[int, ...], vocab_size: int) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidArgument(field, f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def check_resume(resume: tuple[tuple[int, ...], ...], params: SamplingParams, vocab_size: int) -> None:
    """Tokens already generated (resumable generation): one list per sample, within max_new_tokens."""
    if not resume:
        return
    if params.is_beam:
        raise InvalidArgument("resume", "beam search is not resumable: send the request again without resume")
    if len(resume) > params.num_return_sequences:
        raise InvalidArgument("resume", f"{len(resume)} sequences given for num_return_sequences "
                              f"{params.num_return_sequences}")
    for i, ids in enumerate(resume):
        if len(ids) > params.max_new_tokens:
            raise InvalidArgument("resume", f"sequence {i} has {len(ids)} tokens, more than max_new_tokens "
                                  f"({params.max_new_tokens})")
        check_token_ids("resume", ids, vocab_size)


def resolve_params(raw: RawParams, prompt_len: int, limits: Limits) -> SamplingParams:
    """Validate `raw` and apply HF `generate`'s defaults and length semantics."""
    params = SamplingParams(
        max_new_tokens=_max_new_tokens(raw, prompt_len, limits),
        do_sample=raw.do_sample,
        temperature=_temperature(raw),
        top_k=_top_k(raw),
        top_p=_top_p(raw),
        seed=raw.seed,
        stop_strings=_stop_strings(raw, limits),
        num_beams=_bounded_int(raw.num_beams, "num_beams", 1, 1, limits.max_num_beams),
        length_penalty=_length_penalty(raw),
        early_stopping=raw.early_stopping,
        num_return_sequences=_bounded_int(
            raw.num_return_sequences, "num_return_sequences", 1, 1, limits.max_num_return_sequences
        ),
        no_repeat_ngram_size=_bounded_int(raw.no_repeat_ngram_size, "no_repeat_ngram_size", 0, 0, 64),
        repetition_penalty=_repetition_penalty(raw),
        min_new_tokens=_bounded_int(raw.min_new_tokens, "min_new_tokens", 0, 0, limits.max_new_tokens),
        min_p=_unit_interval(raw.min_p, "min_p", 0.0, allow_zero=True),
        typical_p=_unit_interval(raw.typical_p, "typical_p", 1.0, allow_zero=False),
        stop_token_ids=_stop_token_ids(raw, limits),
        ignore_eos=raw.ignore_eos,
        top_n=_bounded_int(raw.top_n, "top_n", 0, 0, limits.max_top_n),
        constraint=_constraint(raw.constraint, limits),
    )
    _check_combinations(params)
    return params


def _check_combinations(p: SamplingParams) -> None:
    """Combinations HF would reject, or that tokenloom cannot honour, fail loudly."""
    if p.is_beam:
        if p.do_sample:
            raise InvalidArgument("num_beams", "beam search with do_sample=true (beam sampling) is not supported")
        if p.num_return_sequences > p.num_beams:
            raise InvalidArgument(
                "num_return_sequences",
                f"num_return_sequences ({p.num_return_sequences}) must be <= num_beams ({p.num_beams})",
            )
        for field, unsupported in (("stop_strings", p.stop_strings), ("top_n", p.top_n)):
            if unsupported:
                raise InvalidArgument(field, f"{field} is not supported with beam search (num_beams > 1)")
    elif p.num_return_sequences > 1 and not p.do_sample:
        raise InvalidArgument(
            "num_return_sequences",
            "greedy decoding returns one sequence; set do_sample=true for several samples or num_beams for beams",
        )


def _constraint(c: Constraint | None, limits: Limits) -> Constraint | None:
    """The constraint's shape; whether the grammar engine can compile it is the preprocessor's check."""
    if c is None:
        return None
    if c.kind not in CONSTRAINT_KINDS:
        raise InvalidArgument("constraint", f"unknown kind {c.kind!r}; one of {', '.join(CONSTRAINT_KINDS)}")
    if c.kind != "json_object" and not c.text:
        raise InvalidArgument("constraint", f"the {c.kind} is empty")
    if c.kind == "choice":
        options = json.loads(c.text)
        if not options or not all(isinstance(o, str) and o for o in options):
            raise InvalidArgument("constraint", "choice needs at least one option, none of them empty")
    if len(c.text.encode()) > limits.max_constraint_bytes:
        raise InvalidArgument("constraint", f"the {c.kind} has {len(c.text.encode())} bytes; at most "
                              f"{limits.max_constraint_bytes} are allowed (--max-constraint-bytes)")
    return c


def _bounded_int(value: int | None, field: str, default: int, low: int, high: int) -> int:
    v = default if value is None else value
    if not low <= v <= high:
        raise InvalidArgument(field, f"must be in [{low}, {high}], got {v}")
    return v


def _finite(value: float | None, field: str, default: float) -> float:
    v = default if value is None else value
    if not math.isfinite(v):
        raise InvalidArgument(field, f"must be a finite number, got {v}")
    return v


def _unit_interval(value: float | None, field: str, default: float, allow_zero: bool) -> float:
    v = default if value is None else value
    ok = math.isfinite(v) and (0.0 <= v if allow_zero else 0.0 < v) and v <= 1.0
    if not ok:
        raise InvalidArgument(field, f"must be in {'[0' if allow_zero else '(0'}, 1], got {v}")
    return v


def _length_penalty(raw: RawParams) -> float:
    # Beam scores divide by length ** length_penalty: a bound keeps that a normal float (no overflow, no
    # division by zero) for any context length; useful values lie within [-2, 5].
    v = _finite(raw.length_penalty, "length_penalty", 1.0)
    if not -MAX_LENGTH_PENALTY <= v <= MAX_LENGTH_PENALTY:
        raise InvalidArgument("length_penalty", f"must be in [-{MAX_LENGTH_PENALTY}, {MAX_LENGTH_PENALTY}], got {v}")
    return v


def _repetition_penalty(raw: RawParams) -> float:
    v = _finite(raw.repetition_penalty, "repetition_penalty", 1.0)
    if v <= 0:
        raise InvalidArgument("repetition_penalty", f"must be > 0 (1.0 is off), got {v}")
    return v


def _stop_token_ids(raw: RawParams, limits: Limits) -> tuple[int, ...]:
    if len(raw.stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidArgument(
            "stop_token_ids", f"{len(raw.stop_token_ids)} given; at most {limits.max_stop_token_ids} are allowed"
        )
    return tuple(raw.stop_token_ids)


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
