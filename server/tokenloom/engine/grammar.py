"""Constrained decoding with llguidance: compiled constraints, one matcher per generated sequence.

llguidance (a maintained Rust engine, the one behind Guidance) turns a JSON Schema, a regex, a Lark
grammar or a list of choices into a matcher over the model's own tokenizer, which says, at each
step, which tokens may come next (a bitmask over the vocabulary) and advances with the token
chosen. Why llguidance: it enforces the most of JSON Schema and refuses, by name, what it does not
(rather than ignoring a keyword and letting invalid output through), compiles a schema in
milliseconds, bounds compile and per-token work with limits, and computes masks without the GIL, so
that a step's masks are filled by a worker thread while the model runs (`Matcher.mask` returns a
future the sampler waits on). Measured here: about 10-20 µs per mask for a 10-field schema.

Compiled constraints are cached by their text; a request gets a copy of the compiled matcher.
The matcher describes the tokens, not their KV: it survives a preemption unchanged, and a resumed
request's tokens are fed to a fresh one as the detokenizer takes them (the preprocessor has replayed
them once already, to refuse resumed tokens the constraint does not allow).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import llguidance.hf
import llguidance.numpy as llnp
from llguidance import LLMatcher, LLParserLimits

from ..request import Constraint

# JSON with no free whitespace: "," and ":" as in compact JSON, so the model cannot pad for ever.
_JSON_DEFAULTS = {"whitespace_flexible": False}


class ConstraintError(ValueError):
    """The constraint does not compile: the grammar engine's own message."""


@dataclass
class MaskStats:
    """What constrained rows cost: masks filled, the grammar thread's time filling them, and the part of
    it the sampler waited for after the forward (the rest overlapped the model)."""

    masks: int = 0
    fill_seconds: float = 0.0
    wait_seconds: float = 0.0


class Grammars:
    """The grammar engine over one model's tokenizer; thread-safe (the front compiles, the engine
    thread takes matchers). `max_grammar_size` bounds what one constraint may compile to."""

    def __init__(self, tokenizer, vocab_size: int, max_grammar_size: int = 200_000, cache_size: int = 256):
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.limits = LLParserLimits(max_grammar_size=max_grammar_size)
        self._tokenizer = None  # built at first use (half a second), not at every server start
        self._cache: OrderedDict[Constraint, LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="tokenloom-grammar")
        self.stats = MaskStats()

    def compile(self, constraint: Constraint) -> Constraint:
        """`constraint` carrying its compiled grammar (also kept in the cache), or raise ConstraintError
        saying why it cannot be compiled."""
        return dataclasses.replace(constraint, compiled=self._compiled(constraint))

    def matcher(self, constraint: Constraint) -> "Matcher":
        compiled = constraint.compiled if constraint.compiled is not None else self._compiled(constraint)
        return Matcher(compiled.deep_copy(), self)

    def _compiled(self, constraint: Constraint) -> LLMatcher:
        with self._lock:
            compiled = self._cache.get(constraint)
            if compiled is not None:
                self._cache.move_to_end(constraint)
                return compiled
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size)
        compiled = LLMatcher(self._tokenizer, _grammar(constraint), log_level=0, limits=self.limits)
        if compiled.is_error():  # llguidance does not raise: a matcher that failed to compile says why
            raise ConstraintError(compiled.get_error())
        with self._lock:
            self._cache[constraint] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled


def _grammar(c: Constraint) -> str:
    try:
        if c.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(c.text, defaults=_JSON_DEFAULTS)
        if c.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_DEFAULTS)
        if c.kind == "regex":
            return LLMatcher.grammar_from_regex(c.text)
        if c.kind == "grammar":
            return LLMatcher.grammar_from_lark(c.text)
        if c.kind == "choice":
            return llguidance.grammar_from("choice", json.loads(c.text))
    except (ValueError, TypeError) as exc:  # e.g. a schema that is not JSON
        raise ConstraintError(str(exc)) from None
    raise ConstraintError(f"unknown constraint kind {c.kind!r}")


class Matcher:
    """One sequence's place in its constraint."""

    def __init__(self, matcher: LLMatcher, grammars: Grammars):
        self._m = matcher
        self._grammars = grammars
        self.failure: Exception | None = None  # why a mask could not be filled (see `check`)

    def mask(self) -> "PendingMask":
        """The allowed next tokens, computed by the grammar thread from now on: its `result()` is an
        int32 bitmask (bit t of word t // 32 set: token t allowed)."""
        return PendingMask(self._grammars.pool.submit(self._fill), self._grammars.stats, self)

    def _fill(self):
        started = time.perf_counter()
        bitmask = llnp.allocate_token_bitmask(1, self._grammars.vocab_size)
        llnp.fill_next_token_bitmask(self._m, bitmask, 0)
        if self._m.is_error():  # e.g. a per-token limit hit: the mask would not be the grammar's
            raise RuntimeError(self._m.get_error())
        stats = self._grammars.stats
        stats.masks += 1
        stats.fill_seconds += time.perf_counter() - started
        return bitmask[0]

    def fork(self) -> "Matcher":
        """A copy at the same place, that advances on its own (a beam's child)."""
        return Matcher(self._m.deep_copy(), self._grammars)

    def check(self) -> None:
        """Raise if this sequence's last mask failed: its token was drawn without the constraint, so
        its request must fail (alone: the engine fails a request whose bookkeeping raises)."""
        if self.failure is not None:
            raise RuntimeError(f"the constraint could not give the allowed next tokens: {self.failure}")

    def accept(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise RuntimeError(f"token {token} broke the constraint: {self._m.get_error()}")

    def replay(self, tokens) -> None:
        for token in tokens:
            self.accept(token)

    @property
    def complete(self) -> bool:
        """Nothing may follow but the end of the sequence."""
        return self._m.is_stopped()


class PendingMask:
    """A mask being filled; `result()` waits for it (the sampler, after the forward) and counts the wait.
    A mask that failed is None (that row draws unconstrained) and the failure is left on its matcher,
    whose `check` then fails that request alone rather than the whole step."""

    def __init__(self, future: Future, stats: MaskStats, matcher: Matcher):
        self._future = future
        self._stats = stats
        self._matcher = matcher

    def result(self):
        started = time.perf_counter()
        try:
            bits = self._future.result()
        except Exception as exc:
            self._matcher.failure = exc
            bits = None
        self._stats.wait_seconds += time.perf_counter() - started
        return bits
