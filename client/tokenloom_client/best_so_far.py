"""Beam search progress, rebuilt: the server streams each step's best running hypothesis as an
edit of the one before (the proto's BestUpdate: keep a prefix, append a suffix), so that a stream's
bytes grow linearly with its length; `BestSoFar` folds the edits back into whole hypotheses.
"""

from __future__ import annotations

from .types import Hypothesis


class BestSoFar:
    """The best running hypothesis of one stream, as its provisional messages left it."""

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._text = bytearray()  # UTF-8, since the server counts the kept text in bytes

    def update(self, keep_tokens: int, token_ids: list[int], keep_text_bytes: int,
               text_suffix: str) -> Hypothesis:
        """Applies one edit; returns the whole best so far (no score or finish reason yet)."""
        if not (0 <= keep_tokens <= len(self._ids) and 0 <= keep_text_bytes <= len(self._text)):
            raise ValueError(f"beam progress keeps {keep_tokens} tokens / {keep_text_bytes} bytes of a best "
                             f"of {len(self._ids)} / {len(self._text)}: a message was lost or reordered")
        del self._ids[keep_tokens:]
        self._ids.extend(token_ids)
        del self._text[keep_text_bytes:]
        self._text += text_suffix.encode()
        return Hypothesis(token_ids=list(self._ids), text=self._text.decode(), score=0.0, finish_reason=None)
