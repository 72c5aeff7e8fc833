"""OpenAI's HTTP request bodies -> domain objects: `UserInput`, `RawParams` and how to answer (`Options`).

Pure: no HTTP, no asyncio (`http_app.py` calls it; `openai_response.py` renders the answers). Every
problem with a body is an `InvalidArgument` naming the body's own field (`max_tokens`, `n`, `stop`,
...); the validation rules themselves are the gRPC front's (`validation.py`), whose field names
`field_name` translates.

Semantics (docs/http.md says the same for users):
- `temperature` absent samples at 1.0, as OpenAI does; 0 is greedy. Beam requests (`num_beams` > 1)
  are greedy unless they set a temperature (beam sampling is refused).
- `top_k` is off unless given (OpenAI has none); our other controls are extra body fields.
- `max_tokens` defaults to 16 for completions (OpenAI's default) and to the server's
  --default-max-new-tokens for chat.
- `logprobs` (completions: how many alternatives, chat: `logprobs` + `top_logprobs`) is our top-N:
  the alternatives and their log-probabilities under the raw model distribution.
- `response_format` (json_object, json_schema) and vLLM's `guided_*` fields are our `constraint`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..request import Constraint
from .preprocessor import UserInput
from .validation import InvalidArgument, RawParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# Our field names as the HTTP body spells them, for the errors of the shared validation.
_HTTP_NAMES = {
    "max_new_tokens": "max_tokens",
    "num_return_sequences": "n",
    "stop_strings": "stop",
    "top_n": "logprobs",
    "min_new_tokens": "min_tokens",
    "constraint": "response_format",
    "input_ids": "prompt",
    "continuation_ids": "continuation_ids",
}

# OpenAI fields accepted and ignored: they change nothing a model computes.
_IGNORED = ("user", "metadata", "store", "service_tier")
# OpenAI fields we do not implement: a value other than "off" is refused, naming the field.
_UNSUPPORTED = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "echo": (None, False),
    "suffix": (None, ""),
}
_UNSUPPORTED_WHY = {
    "frequency_penalty": "not implemented; use repetition_penalty (an extra body field) instead",
    "presence_penalty": "not implemented; use repetition_penalty (an extra body field) instead",
    "echo": "not supported; POST /v1/score gives the log-probability of every token of a text",
}
# Our own controls, accepted as extra body fields (as vLLM does): body name -> (RawParams field, type).
_EXTRA = {
    "top_k": ("top_k", int),
    "min_p": ("min_p", float),
    "typical_p": ("typical_p", float),
    "repetition_penalty": ("repetition_penalty", float),
    "no_repeat_ngram_size": ("no_repeat_ngram_size", int),
    "num_beams": ("num_beams", int),
    "length_penalty": ("length_penalty", float),
    "min_tokens": ("min_new_tokens", int),
    "ignore_eos": ("ignore_eos", bool),
}
# Constrained decoding beyond response_format, under vLLM's names: body name -> our constraint kind.
_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream", "stream_options",
           "logprobs", "best_of", "early_stopping", "stop_token_ids", "return_token_ids", "response_format", *_GUIDED,
           *_IGNORED, *_UNSUPPORTED, *_EXTRA}
_COMPLETION_FIELDS = _COMMON | {"prompt"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
_SCORE_FIELDS = {"model", "prompt", "messages", "prompt_ids", "continuation", "continuation_ids"}



def field_name(ours: str, chat: bool = False) -> str:
    """The HTTP body's name for a field that the shared validation names `ours` (chat asks for the
    top-N as `top_logprobs`, completions as `logprobs`)."""
    if chat and ours == "top_n":
        return "top_logprobs"
    return _HTTP_NAMES.get(ours, ours)


@dataclass(frozen=True)
class Options:
    """How to answer: the response's shape, apart from what the engine computes."""

    chat: bool
    model: str
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False  # return the chosen tokens' log-probabilities (and top_n alternatives)
    return_token_ids: bool = False
    beams: bool = False
    stop: tuple[str, ...] = ()  # OpenAI leaves the stop sequence out of the text (the engine keeps it, as HF)


@dataclass(frozen=True)
class ParsedRequest:
    user: UserInput
    raw: RawParams
    options: Options


@dataclass(frozen=True)
class ParsedScore:
    prompt: UserInput
    continuation: str
    continuation_ids: tuple[int, ...]


def parse_completion(body: object, served_model: str) -> ParsedRequest:
    body = _object(body, _COMPLETION_FIELDS)
    user = _completion_prompt(body.get("prompt"))
    logprobs = _typed(body, "logprobs", int)
    top_n = logprobs
    return _parse(body, served_model, user, chat=False, top_n=top_n, want_logprobs=logprobs is not None,
                  max_tokens=_typed(body, "max_tokens", int), default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS)


def parse_chat(body: object, served_model: str) -> ParsedRequest:
    body = _object(body, _CHAT_FIELDS)
    user = UserInput(messages=_messages(body.get("messages")))
    want_logprobs = bool(_typed(body, "logprobs", bool))
    top_n = _typed(body, "top_logprobs", int)
    if top_n is not None and not want_logprobs:
        raise InvalidArgument("top_logprobs", "needs logprobs: true")
    max_tokens = _typed(body, "max_completion_tokens", int)
    legacy = _typed(body, "max_tokens", int)
    if max_tokens is not None and legacy is not None and max_tokens != legacy:
        raise InvalidArgument("max_completion_tokens", "set max_completion_tokens or max_tokens, not both")
    return _parse(body, served_model, user, chat=True, top_n=top_n if want_logprobs else None,
                  want_logprobs=want_logprobs, max_tokens=max_tokens if max_tokens is not None else legacy,
                  default_max_tokens=None)


def parse_score(body: object, served_model: str) -> ParsedScore:
    body = _object(body, _SCORE_FIELDS)
    check_model(body, served_model)
    messages = body.get("messages")
    prompt = UserInput(prompt=_typed(body, "prompt", str) or "",
                       messages=_messages(messages) if messages is not None else (),
                       input_ids=_ids(body, "prompt_ids"))
    return ParsedScore(prompt, _typed(body, "continuation", str) or "", _ids(body, "continuation_ids"))


def check_model(body: dict, served_model: str) -> None:
    model = _typed(body, "model", str)
    if model is not None and model != served_model:
        raise ModelNotFound(f"the model '{model}' is not served here; this server serves '{served_model}' "
                            "(GET /v1/models lists it)")


class ModelNotFound(Exception):
    pass


def _parse(body: dict, served_model: str, user: UserInput, *, chat: bool, top_n: int | None, want_logprobs: bool,
           max_tokens: int | None, default_max_tokens: int | None) -> ParsedRequest:
    check_model(body, served_model)
    for name, off in _UNSUPPORTED.items():
        if name in body and body[name] not in off:
            why = _UNSUPPORTED_WHY.get(name, "not supported by this server")
            raise InvalidArgument(name, why)
    extra = {ours: _typed(body, name, kind) for name, (ours, kind) in _EXTRA.items()}
    num_beams = extra["num_beams"] or 1
    temperature = _typed(body, "temperature", float)
    n = _typed(body, "n", int)
    best_of = _typed(body, "best_of", int)
    if best_of is not None and best_of != (n or 1):
        raise InvalidArgument("best_of", "not supported apart from best_of == n; for the best of several "
                              "candidates use num_beams")
    # OpenAI samples unless temperature is 0; beams are greedy unless a temperature asks otherwise.
    greedy = temperature == 0 or (temperature is None and num_beams > 1)
    if greedy and (n or 1) > 1 and num_beams < 2:
        raise InvalidArgument("n", "n > 1 needs sampling (a temperature above 0) or num_beams >= n")
    if num_beams > 1 and want_logprobs:
        raise InvalidArgument("logprobs", "not supported with beam search (num_beams > 1)")
    stream = bool(_typed(body, "stream", bool))
    stream_options = body.get("stream_options")
    if stream_options is not None and not stream:
        raise InvalidArgument("stream_options", "only allowed with stream: true")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage", "continuous_usage_stats"}:
            raise InvalidArgument("stream_options", "must be an object with include_usage")
        include_usage = bool(_typed(stream_options, "include_usage", bool, "stream_options.include_usage"))
    early = body.get("early_stopping")
    if early is not None and early not in (True, False, "never"):
        raise InvalidArgument("early_stopping", f"must be true, false or \"never\", got {early!r}")
    raw = RawParams(
        **{k: v for k, v in extra.items() if k not in ("ignore_eos", "top_k")},
        ignore_eos=bool(extra["ignore_eos"]),
        max_new_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_k=extra["top_k"] if extra["top_k"] is not None else 0,
        top_p=_typed(body, "top_p", float),
        seed=_typed(body, "seed", int),
        stop_strings=_stop(body.get("stop")),
        num_return_sequences=n,
        early_stopping=False if early is None else early,
        stop_token_ids=_ids(body, "stop_token_ids"),
        top_n=top_n,
        constraint=_constraint(body),
    )
    options = Options(chat=chat, model=served_model, stream=stream, include_usage=include_usage,
                      logprobs=want_logprobs, return_token_ids=bool(_typed(body, "return_token_ids", bool)),
                      beams=num_beams > 1, stop=raw.stop_strings)
    return ParsedRequest(user, raw, options)


def _constraint(body: dict) -> Constraint | None:
    """`response_format` (json_object, json_schema) or one of the guided_* fields -> our constraint."""
    found = []
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise InvalidArgument("response_format", 'must be {"type": "text" | "json_object" | "json_schema"}')
        if fmt["type"] == "json_object":
            found.append(Constraint("json_object"))
        elif fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise InvalidArgument("response_format", 'json_schema needs {"name": ..., "schema": {...}}')
            found.append(Constraint("json_schema", json.dumps(spec["schema"])))
    for name, kind in _GUIDED.items():
        value = body.get(name)
        if value is None:
            continue
        if kind == "json_schema" and isinstance(value, dict):
            value = json.dumps(value)
        elif kind == "choice":
            if not isinstance(value, list):
                raise InvalidArgument(name, "must be a list of strings")
            value = json.dumps(value)  # validation checks the options
        elif not isinstance(value, str):
            raise InvalidArgument(name, "must be a string")
        found.append(Constraint(kind, value))
    if len(found) > 1:
        raise InvalidArgument("response_format", "give one constraint: response_format or one guided_* field")
    return found[0] if found else None


def _object(body: object, known: set[str]) -> dict:
    if not isinstance(body, dict):
        raise InvalidArgument("body", "the request body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidArgument(unknown[0], f"unknown field (this endpoint takes: {', '.join(sorted(known))})")
    return body


def _typed(body: dict, name: str, kind: type, shown: str = ""):
    """`body[name]` if it has type `kind` (an int is a float; a bool is not an int), None if absent or null."""
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise InvalidArgument(shown or name, f"must be {_KIND[kind]}, got {value!r}")
    return value


_KIND = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _ids(body: dict, name: str) -> tuple[int, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InvalidArgument(name, "must be a list of token ids (integers)")
    return tuple(value)


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise InvalidArgument("stop", "must be a string or a list of strings")


def _completion_prompt(prompt) -> UserInput:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return UserInput(prompt=prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return UserInput(input_ids=tuple(prompt))
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise InvalidArgument("prompt", f"send one prompt per request ({len(prompt)} given); "
                              "requests sent concurrently share the engine's batch")
    raise InvalidArgument("prompt", "must be a string or a list of token ids")


def _messages(messages) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidArgument("messages", f"message {i} must be an object with a string role")
        if set(m) - {"role", "content", "name"}:
            extra = sorted(set(m) - {"role", "content", "name"})[0]
            raise InvalidArgument("messages", f"message {i}: '{extra}' is not supported (text messages only)")
        out.append((m["role"], _content(m.get("content"), i)))
    return tuple(out)


def _content(content, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidArgument("messages", f"message {i}: only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidArgument("messages", f"message {i}: content must be a string or a list of text parts")


