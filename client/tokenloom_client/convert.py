"""Protobuf <-> SDK dataclasses; the only SDK module that touches generated messages.

Both clients build requests and read replies through here, so the sync and async
paths cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, MutableSequence
from typing import Any

from .best_so_far import BestSoFar
from .pb.tokenloom.v1 import generation_pb2 as pb
from .types import (
    ChatMessage,
    GenerationResult,
    Hypothesis,
    Limits,
    ModelInfo,
    ScoreResult,
    StreamChunk,
    TopToken,
    Usage,
)

# Read from the contract rather than listed by hand, so fields added to the proto
# are accepted without touching the SDK.
PARAMETER_NAMES = tuple(pb.GenerationParameters.DESCRIPTOR.fields_by_name)
_FINISH_PREFIX = "FINISH_REASON_"


def build_request(
    prompt: str | None,
    messages: Iterable[ChatMessage | Mapping[str, str]] | None,
    input_ids: Iterable[int] | None,
    request_id: str,
    params: Mapping[str, Any],
) -> pb.GenerateRequest:
    """Checks the arguments before any RPC, so mistakes fail fast without a server."""
    given = [name for name, value in
             (("prompt", prompt), ("messages", messages), ("input_ids", input_ids))
             if value is not None]
    if len(given) != 1:
        raise TypeError(f"pass exactly one of prompt, messages, input_ids (got {given or 'none'})")
    request = pb.GenerateRequest(request_id=request_id, parameters=build_parameters(params))
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.messages.extend(_chat_message(m) for m in messages)
    else:
        request.input_ids.extend(input_ids)
    return request


def build_parameters(params: Mapping[str, Any]) -> pb.GenerationParameters:
    """HF-named keyword arguments -> GenerationParameters; None leaves a field unset."""
    message = pb.GenerationParameters()
    for name, value in params.items():
        if name not in PARAMETER_NAMES:
            raise TypeError(f"unknown generation parameter {name!r}; "
                            f"expected one of: {', '.join(PARAMETER_NAMES)}")
        if value is None:
            continue
        if name == "early_stopping":
            value = early_stopping(value)
        if name == "constraint":
            message.constraint.CopyFrom(constraint(value))
            continue
        field = getattr(message, name)
        try:
            if isinstance(field, MutableSequence):
                # A bare string would otherwise be split into one stop string per character.
                field.extend([value] if isinstance(value, str) else value)
            else:
                setattr(message, name, value)
        except (TypeError, ValueError) as exc:  # protobuf's own message does not name the field
            raise type(exc)(f"generation parameter {name}={value!r}: {exc}") from exc
    return message


CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")


def constraint(value: Mapping[str, Any]) -> pb.Constraint:
    """{"json_schema": schema (a dict or JSON text)} | {"json_object": True} | {"regex": str} |
    {"grammar": Lark text} | {"choice": [str, ...]} -> the Constraint message."""
    if not isinstance(value, Mapping) or len(value) != 1 or next(iter(value)) not in CONSTRAINT_KINDS:
        raise ValueError(f"constraint must be a dict with one key of {', '.join(CONSTRAINT_KINDS)}, "
                         f"e.g. {{'regex': '[0-9]+'}}; got {value!r}")
    (kind, spec), = value.items()
    if kind == "json_schema" and not isinstance(spec, str):
        spec = json.dumps(spec)
    if kind == "choice":
        return pb.Constraint(choice=pb.Choice(options=list(spec)))
    if kind == "json_object":
        return pb.Constraint(json_object=bool(spec))
    return pb.Constraint(**{kind: spec})


def early_stopping(value: bool | str) -> int:
    """HF's early_stopping (False, True or "never") -> the EarlyStopping enum."""
    # `is`, not ==: 0 and 1 equal the bools but are not HF values.
    if value is False:
        return pb.EARLY_STOPPING_FALSE
    if value is True:
        return pb.EARLY_STOPPING_TRUE
    if value == "never":
        return pb.EARLY_STOPPING_NEVER
    raise ValueError(f"early_stopping must be False, True or \"never\", not {value!r}")


def build_score_request(
    prompt: str | None,
    continuation: str | None,
    prompt_ids: Iterable[int] | None,
    continuation_ids: Iterable[int] | None,
    request_id: str,
) -> pb.ScoreRequest:
    """Checks the arguments before any RPC: exactly one prompt and one continuation."""
    for text_name, text, ids_name, ids in (("prompt", prompt, "prompt_ids", prompt_ids),
                                           ("continuation", continuation,
                                            "continuation_ids", continuation_ids)):
        if (text is None) == (ids is None):
            got = "both" if text is not None else "neither"
            raise TypeError(f"pass exactly one of {text_name}, {ids_name} (got {got})")
    request = pb.ScoreRequest(request_id=request_id)
    if prompt is not None:
        request.prompt = prompt
    else:
        request.prompt_ids.extend(prompt_ids)
    if continuation is not None:
        request.continuation = continuation
    else:
        request.continuation_ids.extend(continuation_ids)
    return request


def _chat_message(message: ChatMessage | Mapping[str, str]) -> pb.ChatMessage:
    if isinstance(message, ChatMessage):
        return pb.ChatMessage(role=message.role, content=message.content)
    return pb.ChatMessage(role=message["role"], content=message["content"])


def finish_reason(value: int) -> str | None:
    """FINISH_REASON_STOP_STRING -> "stop_string"; UNSPECIFIED (still running) -> None."""
    if value == pb.FINISH_REASON_UNSPECIFIED:
        return None
    try:
        return pb.FinishReason.Name(value).removeprefix(_FINISH_PREFIX).lower()
    except ValueError:  # a newer server may send a reason this client's proto lacks
        return f"unknown_{value}"


def _usage(message: pb.Usage) -> Usage:
    return Usage(prompt_tokens=message.prompt_tokens, generated_tokens=message.generated_tokens,
                 cached_tokens=message.cached_tokens)


def _top_tokens(positions: Iterable[pb.TopTokens]) -> list[list[TopToken]]:
    return [[TopToken(token_id=t.token_id, text=t.text, logprob=t.logprob) for t in p.alternatives]
            for p in positions]


def _hypotheses(hypotheses: Iterable[pb.Hypothesis]) -> list[Hypothesis]:
    return [Hypothesis(token_ids=list(h.token_ids), text=h.text, score=h.score,
                       finish_reason=finish_reason(h.finish_reason)) for h in hypotheses]


def to_chunk(response: pb.GenerateResponse, best: BestSoFar) -> StreamChunk:
    """`best` carries a beam stream's progress from one message to the next (pass the same one for
    every message of a stream); a provisional chunk then lists the whole best so far in `hypotheses`."""
    hypotheses = _hypotheses(response.hypotheses)
    if response.HasField("best_update"):
        u = response.best_update
        hypotheses = [best.update(u.keep_tokens, list(u.token_ids), u.keep_text_bytes, u.text_suffix)]
    return StreamChunk(
        request_id=response.request_id,
        token_ids=list(response.token_ids),
        logprobs=list(response.logprobs),
        text=response.text,
        finish_reason=finish_reason(response.finish_reason),
        usage=_usage(response.usage) if response.HasField("usage") else None,
        error_message=response.error_message,
        index=response.index,
        top_tokens=_top_tokens(response.top_tokens),
        provisional=response.provisional,
        hypotheses=hypotheses,
    )


def to_result(result: pb.GenerateResult) -> GenerationResult:
    return GenerationResult(
        request_id=result.request_id,
        token_ids=list(result.token_ids),
        logprobs=list(result.logprobs),
        text=result.text,
        # A finished result always has a reason; "" only if a server breaks the contract.
        finish_reason=finish_reason(result.finish_reason) or "",
        usage=_usage(result.usage),
        error_message=result.error_message,
        top_tokens=_top_tokens(result.top_tokens),
        hypotheses=_hypotheses(result.hypotheses),
    )


def to_score_result(response: pb.ScoreResponse) -> ScoreResult:
    return ScoreResult(
        request_id=response.request_id,
        prompt_ids=list(response.prompt_ids),
        continuation_ids=list(response.continuation_ids),
        logprobs=list(response.logprobs),
        total_logprob=response.total_logprob,
        usage=_usage(response.usage) if response.HasField("usage") else None,
    )


def to_model_info(response: pb.ModelInfoResponse) -> ModelInfo:
    limits = response.limits
    return ModelInfo(
        model_name=response.model_name,
        model_type=response.model_type,
        context_length=response.context_length,
        vocab_size=response.vocab_size,
        eos_token_ids=list(response.eos_token_ids),
        has_chat_template=response.has_chat_template,
        dtype=response.dtype,
        device=response.device,
        quantization=response.quantization,
        limits=Limits(
            max_new_tokens=limits.max_new_tokens,
            default_max_new_tokens=limits.default_max_new_tokens,
            max_stop_strings=limits.max_stop_strings,
            max_stop_string_length=limits.max_stop_string_length,
            max_input_tokens=limits.max_input_tokens,
            max_num_seqs=limits.max_num_seqs,
            kv_cache_tokens=limits.kv_cache_tokens,
            max_num_beams=limits.max_num_beams,
            max_num_return_sequences=limits.max_num_return_sequences,
            max_top_n=limits.max_top_n,
        ),
    )


def model_info_request() -> pb.ModelInfoRequest:
    return pb.ModelInfoRequest()
