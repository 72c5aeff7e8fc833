"""Our events -> OpenAI's JSON: stream chunks, whole responses, usage, scores, the model list.

Pure: no HTTP, no asyncio. `Responder` follows one request: `chunks(event)` for a stream, or
`add(event)` then `response()` for a unary answer. OpenAI leaves a stop sequence out of the text
(the engine keeps it, as HF does): the text is cut before it, and a stream holds back the end of
its text while it could still begin one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from ..request import FinishReason, Hypothesis, TokenEvent
from .openai_request import Options

_FINISH = {FinishReason.EOS: "stop", FinishReason.STOP_STRING: "stop", FinishReason.LENGTH: "length"}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # chat: content entries; completions: (token, lp, top, offset)
    offset: int = 0  # characters of this choice's generated text before the next token (held back or not)
    finish_reason: str | None = None
    started: bool = False  # chat: the role went out in this choice's first chunk
    held: str = ""  # streamed text kept back: it may be the start of a stop sequence


class Responder:
    """Turns one request's events into OpenAI JSON: stream chunks as they come (`chunks`), or the
    whole response at the end (`add` each event, then `response`). `token_text(id)` is a token's text."""

    def __init__(self, options: Options, request_id: str, token_text):
        self.o = options
        self.token_text = token_text
        prefix = "chatcmpl-" if options.chat else "cmpl-"
        self.id = prefix + request_id
        self.created = int(time.time())
        self.object = "chat.completion" if options.chat else "text_completion"
        self.choices: dict[int, _Choice] = {}
        self.hypotheses: tuple[Hypothesis, ...] = ()
        self.usage: dict | None = None

    # streaming
    def chunks(self, event: TokenEvent) -> list[dict]:
        out = []
        if event.provisional:
            if event.best_update is not None:  # beams: the whole best hypothesis so far
                choice = self.choices.setdefault(0, _Choice())
                u = event.best_update
                choice.token_ids[u.keep_tokens:] = u.token_ids
                choice.text = choice.text.encode()[: u.keep_text_bytes].decode(errors="ignore") + u.text_suffix
                out.append(self._chunk([], best_so_far={"text": choice.text, "token_ids": list(choice.token_ids)}))
        elif not self.o.beams and (event.token_ids or event.text or event.finish_reason is not None):
            choice = self.choices.setdefault(event.index, _Choice())
            entry = {"index": event.index, "finish_reason": _FINISH.get(event.finish_reason)}
            text = self._releasable(choice, event)
            if self.o.chat:
                entry["delta"] = {"content": text}
                if not choice.started:
                    entry["delta"] = {"role": "assistant", "content": text}
            else:
                entry["text"] = text
            entry["logprobs"] = self._logprobs(event, choice) if self.o.logprobs else None
            if self.o.return_token_ids:
                entry["token_ids"] = list(event.token_ids)
            choice.started = True
            choice.text += text
            out.append(self._chunk([entry]))
        if event.final:
            for i, h in enumerate(event.hypotheses if self.o.beams else ()):
                entry = {"index": i, "finish_reason": _FINISH.get(h.finish_reason), "score": _finite(h.score),
                         "logprobs": None, "token_ids": list(h.token_ids)}
                if self.o.chat:
                    entry["delta"] = {"role": "assistant", "content": h.text}
                else:
                    entry["text"] = h.text
                out.append(self._chunk([entry]))
            if self.o.include_usage:
                out.append(self._chunk([], usage=usage(event.prompt_tokens, event.generated_tokens,
                                                       event.cached_tokens)))
        return out

    def _releasable(self, choice: _Choice, event: TokenEvent) -> str:
        """The text a chunk may carry: none of a stop sequence, so the end of the text is kept back while
        it could still become one (at most the longest stop's length - 1 characters)."""
        text = choice.held + event.text
        choice.held = ""
        if event.finish_reason is FinishReason.STOP_STRING:
            return _before_stop(text, self.o.stop)
        keep = max(map(len, self.o.stop), default=1) - 1
        if keep and event.finish_reason is None:
            text, choice.held = text[:-keep], text[-keep:]
        return text

    def _chunk(self, choices: list[dict], **extra) -> dict:
        kind = "chat.completion.chunk" if self.o.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.o.model, "choices": choices,
                **extra}

    # unary
    def add(self, event: TokenEvent) -> None:
        if not event.provisional and not self.o.beams:
            choice = self.choices.setdefault(event.index, _Choice())
            if self.o.logprobs:
                self._logprobs(event, choice)
            choice.text += event.text
            choice.token_ids.extend(event.token_ids)
            if event.finish_reason is not None:
                choice.finish_reason = _FINISH.get(event.finish_reason)
            if event.finish_reason is FinishReason.STOP_STRING:
                choice.text = _before_stop(choice.text, self.o.stop)
        if event.final:
            self.hypotheses = event.hypotheses
            self.usage = usage(event.prompt_tokens, event.generated_tokens, event.cached_tokens)

    def response(self) -> dict:
        choices = []
        if self.o.beams:
            for i, h in enumerate(self.hypotheses):
                choices.append(self._choice(i, h.text, list(h.token_ids), None, _FINISH.get(h.finish_reason),
                                            score=_finite(h.score)))
        else:
            for i in sorted(self.choices):
                c = self.choices[i]
                choices.append(self._choice(i, c.text, c.token_ids, c, c.finish_reason))
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.o.model,
                "choices": choices, "usage": self.usage}

    def _choice(self, index: int, text: str, token_ids: list[int], choice: _Choice | None, finish: str | None,
                **extra) -> dict:
        entry = {"index": index, "finish_reason": finish, **extra}
        if self.o.chat:
            entry["message"] = {"role": "assistant", "content": text}
        else:
            entry["text"] = text
        entry["logprobs"] = self._whole_logprobs(choice) if self.o.logprobs and choice is not None else None
        if self.o.return_token_ids:
            entry["token_ids"] = token_ids
        return entry

    # log-probabilities: chat's `content` list, or completions' parallel lists
    def _logprobs(self, event: TokenEvent, choice: _Choice) -> dict:
        start = len(choice.logprobs)
        offset = choice.offset
        for k, (token_id, logprob) in enumerate(zip(event.token_ids, event.logprobs)):
            top = event.top_tokens[k] if k < len(event.top_tokens) else ()
            text = self.token_text(token_id)
            if self.o.chat:
                choice.logprobs.append({"token": text, "logprob": _finite(logprob), "bytes": list(text.encode()),
                                        "top_logprobs": [{"token": t.text, "logprob": _finite(t.logprob),
                                                          "bytes": list(t.text.encode())} for t in top]})
            else:
                choice.logprobs.append((text, _finite(logprob), {t.text: _finite(t.logprob) for t in top}, offset))
            offset += len(text)
        choice.offset = offset
        return self._as_logprobs(choice.logprobs[start:])

    def _whole_logprobs(self, choice: _Choice) -> dict:
        return self._as_logprobs(choice.logprobs)

    def _as_logprobs(self, entries: list) -> dict:
        if self.o.chat:
            return {"content": entries}
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries], "text_offset": [e[3] for e in entries]}


def _before_stop(text: str, stops: tuple[str, ...]) -> str:
    """`text` up to its first stop sequence (the engine stopped on the token that completed it)."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(cuts)] if cuts else text


def _finite(x: float) -> float:
    """JSON has no -inf: a log-probability of zero probability (or a score) goes out as a very small number."""
    return x if math.isfinite(x) else -1e30 if x < 0 else 1e30


def score_response(model: str, prompt_ids, continuation_ids, logprobs, prompt_tokens: int,
                   cached_tokens: int) -> dict:
    return {"object": "score", "model": model, "prompt_ids": list(prompt_ids),
            "continuation_ids": list(continuation_ids), "logprobs": [_finite(x) for x in logprobs],
            "total_logprob": _finite(sum(logprobs)),
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens,
                      "prompt_tokens_details": {"cached_tokens": cached_tokens}}}


def models(model: str, context_length: int, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "tokenloom",
                                        "max_model_len": context_length}]}
