"""User input -> a validated `GenerationRequest`: tokenisation, chat template, limits.

Pure of gRPC: the servicer passes plain values in and maps `InvalidArgument`
to INVALID_ARGUMENT.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace

from ..request import GenerationRequest, SamplingParams
from .validation import (
    InvalidArgument,
    Limits,
    RawParams,
    check_exactly_one_input,
    check_prompt_ids,
    check_resume,
    check_token_ids,
    resolve_params,
)


@dataclass(frozen=True)
class UserInput:
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)
    input_ids: tuple[int, ...] = ()
    resume: tuple[tuple[int, ...], ...] = ()  # tokens already generated, per sample index


class Preprocessor:
    """`grammars` compiles constraints (engine/grammar.py's Grammars); None: constraints are refused."""

    def __init__(self, tokenizer, vocab_size: int, limits: Limits, grammars=None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.limits = limits
        self.grammars = grammars

    def __call__(self, user: UserInput, raw: RawParams) -> GenerationRequest:
        ids = self.prompt_ids(user)
        check_prompt_ids(ids, self.vocab_size, self.limits)
        params = resolve_params(raw, len(ids), self.limits)
        check_token_ids("stop_token_ids", params.stop_token_ids, self.vocab_size)
        check_resume(user.resume, params, self.vocab_size)
        if params.constraint is not None:  # compiled here, off the engine's thread, and carried to it
            params = replace(params, constraint=self._compile(params.constraint, user.resume))
        return GenerationRequest(
            request_id=uuid.uuid4().hex, prompt_ids=tuple(ids), params=params, arrival_time=time.monotonic(),
            resume=user.resume,
        )

    def score(self, prompt: UserInput, continuation: str, continuation_ids: tuple[int, ...]) -> GenerationRequest:
        """A request that scores `continuation` after the prompt (text tokenised alone, no special tokens)."""
        ids = self.prompt_ids(prompt)
        if bool(continuation) == bool(continuation_ids):
            raise InvalidArgument("continuation", "set exactly one of continuation or continuation_ids")
        cont = list(continuation_ids) or self.tokenizer.encode(continuation, add_special_tokens=False)
        if not cont:
            raise InvalidArgument("continuation", "the continuation encodes to zero tokens")
        check_token_ids("continuation_ids", tuple(cont), self.vocab_size)
        check_prompt_ids(ids, self.vocab_size, self.limits, ids_field="prompt_ids")
        if len(ids) + len(cont) > self.limits.context_length:
            raise InvalidArgument(
                "continuation",
                f"prompt ({len(ids)}) + continuation ({len(cont)}) tokens exceed the context length "
                f"{self.limits.context_length}",
            )
        return GenerationRequest(
            request_id=uuid.uuid4().hex, prompt_ids=tuple(ids + cont), params=SamplingParams(max_new_tokens=1),
            arrival_time=time.monotonic(), score_from=len(ids),
        )

    def _compile(self, constraint, resume: tuple[tuple[int, ...], ...]):
        """Before the request is admitted: the constraint with its compiled grammar. One the grammar
        engine cannot compile, or resumed tokens it does not allow, are the user's error."""
        if self.grammars is None:
            raise InvalidArgument("constraint", "this server has no grammar engine")
        try:
            constraint = self.grammars.compile(constraint)
        except ValueError as exc:  # grammar.ConstraintError
            raise InvalidArgument("constraint", f"the {constraint.kind} does not compile: {exc}") from None
        for i, tokens in enumerate(resume):
            try:
                self.grammars.matcher(constraint).replay(tokens)
            except RuntimeError as exc:
                raise InvalidArgument("resume", f"sequence {i} is not allowed by the constraint: {exc}") from None
        return constraint

    def prompt_ids(self, user: UserInput) -> list[int]:
        check_exactly_one_input(bool(user.prompt), bool(user.messages), bool(user.input_ids))
        if user.input_ids:
            return list(user.input_ids)
        if user.messages:
            return self._render_chat(user.messages)
        return self.tokenizer.encode(user.prompt, add_special_tokens=True)

    def _render_chat(self, messages: tuple[tuple[str, str], ...]) -> list[int]:
        if len(messages) > self.limits.max_chat_messages:
            raise InvalidArgument(
                "messages", f"{len(messages)} messages; at most {self.limits.max_chat_messages} are allowed"
            )
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidArgument("messages", "this model has no chat template; send a prompt or input_ids")
        for i, (role, _) in enumerate(messages):
            if not role:
                raise InvalidArgument("messages", f"message {i} has no role")
        chat = [{"role": role, "content": content} for role, content in messages]
        try:
            rendered = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # templates raise their own errors for unsupported roles or orders
            raise InvalidArgument("messages", f"the chat template rejected the messages: {exc}") from exc
        # The template already holds the special tokens (BOS etc.).
        return self.tokenizer.encode(rendered, add_special_tokens=False)
