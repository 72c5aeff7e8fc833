"""Incremental detokenisation: text deltas that never split a character.

Decoding only a short window of recent tokens keeps the per-token cost flat.
A delta is released only when the window's text does not end in U+FFFD (the
replacement character of an incomplete UTF-8 sequence, as with byte-level BPE
emitting one byte of a multi-byte character). `flush()` releases the rest at
the end, so the concatenated deltas equal the decode of all generated ids.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window (context for leading spaces)
        self._read = 0  # tokens up to here are already released as text
        self.text = ""  # everything released so far

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (may be empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        window_text = self._decode(self._ids[self._prefix :])
        if len(window_text) <= len(prefix_text) or window_text.endswith(REPLACEMENT):
            return ""
        if not window_text.startswith(prefix_text):
            return ""  # the tokenizer rewrote earlier text; flush() reconciles at the end
        delta = window_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The remaining text, held back or rewritten, against a full decode."""
        full = self._decode(self._ids)
        if not full.startswith(self.text):
            # Cannot take back released text; release only what extends it.
            return ""
        delta = full[len(self.text) :]
        self.text = full
        self._prefix = self._read = len(self._ids)
        return delta
