"""Incremental detokenisation: text deltas that never split a character.

One rule, run in Rust or in Python. A token's text is released when the decode of a short window
(the tokens since the release before last, kept as context for leading spaces) grows past the
decode of its older part and does not end in U+FFFD, the replacement character of an incomplete
UTF-8 sequence (byte-level BPE emits multi-byte characters one byte token at a time); otherwise the
token is held back. `flush()` releases the rest against a full decode, so the deltas add up to
`tokenizer.decode(ids, skip_special_tokens=...)` unless the tokenizer rewrote text already released
(nothing can take that back).

Which path:
- Rust, `tokenizers.decoders.DecodeStream` (the same rule, token for token): fast HF tokenizers whose
  `decode` is exactly their backend's decode, as the default model's and most tokenizer.json ones.
- Python, two `tokenizer.decode` calls per token, so that what `decode` adds is seen mid-stream:
  slow tokenizers; subclasses overriding `decode`/`_decode` (CodeGen, CPM, Whisper); tokenizers
  whose `decode` applies `clean_up_tokenization_spaces` in Python (transformers 5.17-5.24 do it for
  non-BPE models with the flag set, and skip it for BPE ones).

Ids: one DecodeStream cannot take (negative, or 2**32 and up) raises ValueError and leaves the
detokenizer as it was; one past the vocabulary decodes to nothing, as in the full decode.

Cost per token, `tests/bench/detokenizer_cost.py` (512 ids one at a time with the final flush,
median of 9 runs, 2-core AVX2 CPU, tokenizers 0.23.3): English 5.6 µs in Python, 1.1 in Rust;
CJK + emoji 6.0 and 1.1.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._backend = _rust_tokenizer(tokenizer)
        self._stream = self._new_stream()
        self._ids: list[int] = []
        # Python path only (DecodeStream keeps its own): the decode window starts at _prefix, and
        # tokens before _read are already released as text.
        self._prefix = 0
        self._read = 0
        self.text = ""  # everything released so far

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (may be empty)."""
        delta = self._add_streamed(token_id) if self._stream is not None else self._add_windowed(token_id)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The remaining text, held back or rewritten, against a full decode."""
        full = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        if not full.startswith(self.text):
            # Cannot take back released text; release only what extends it.
            return ""
        delta = full[len(self.text) :]
        self.text = full
        # A token added after a flush starts a fresh window on either path.
        self._prefix = self._read = len(self._ids)
        self._stream = self._new_stream()
        return delta

    def _new_stream(self) -> DecodeStream | None:
        return None if self._backend is None else DecodeStream(skip_special_tokens=self._skip)

    def _add_streamed(self, token_id: int) -> str:
        try:
            piece = self._stream.step(self._backend, token_id)
        except TypeError:
            # Raised while reading the id, before the stream takes it: its state is unchanged.
            raise ValueError(f"token id {token_id!r} is not an unsigned 32-bit integer") from None
        except Exception as exc:
            # The decoder rewrote text already released (DecodeStreamError::InvalidPrefix, a plain
            # Exception). The Python path holds such a token back too; flush() reconciles what it can.
            if "Invalid prefix" not in str(exc):
                raise
            piece = None
        self._ids.append(token_id)
        return piece or ""

    def _add_windowed(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        window_text = self._decode(self._ids[self._prefix :])
        if len(window_text) <= len(prefix_text) or window_text.endswith(REPLACEMENT):
            return ""
        if not window_text.startswith(prefix_text):
            return ""  # the tokenizer rewrote earlier text; flush() reconciles at the end
        self._prefix, self._read = self._read, len(self._ids)
        return window_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)


def _rust_tokenizer(tokenizer):
    """The Rust `tokenizers.Tokenizer` behind `tokenizer` if its `decode` is exactly that one's, else None."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or _overrides_decode(type(tokenizer)) or _cleans_up_spaces(tokenizer, backend):
        return None
    return backend


def _overrides_decode(cls: type) -> bool:
    """Whether a class ahead of the one that owns the backend redefines decoding."""
    for klass in cls.__mro__:
        if "backend_tokenizer" in vars(klass):
            return False
        if "decode" in vars(klass) or "_decode" in vars(klass):
            return True
    return True  # no class owns the backend: nothing vouches for its decode


def _cleans_up_spaces(tokenizer, backend) -> bool:
    """Whether transformers' `_decode` runs `clean_up_tokenization` after the Rust decode."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    if type(backend.model).__name__ != "BPE":
        return True
    return getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
