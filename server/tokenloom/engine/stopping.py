"""When a sequence is done: pure functions, no model."""

from __future__ import annotations

from ..request import FinishReason


def check_stop(
    *,
    last_token: int,
    num_generated: int,
    max_new_tokens: int,
    eos_token_ids: frozenset[int],
    text: str,
    new_text_len: int,
    stop_strings: tuple[str, ...],
) -> FinishReason | None:
    """The reason generation ends after the token just appended, or None.

    `text` is the generated text so far and `new_text_len` how much of its end
    the last token added; a stop string counts only if it ends inside that new
    part, so it fires once, on the token that completes it (as HF's
    `stop_strings`, which keep the stop string in the output).
    """
    if last_token in eos_token_ids:
        return FinishReason.EOS
    if stop_strings and new_text_len > 0 and _ends_with_stop(text, new_text_len, stop_strings):
        return FinishReason.STOP_STRING
    if num_generated >= max_new_tokens:
        return FinishReason.LENGTH
    return None


def _ends_with_stop(text: str, new_text_len: int, stop_strings: tuple[str, ...]) -> bool:
    for stop in stop_strings:
        # A match must end within the new text, so search from len(stop) - 1 chars before it.
        start = max(0, len(text) - new_text_len - len(stop) + 1)
        if text.find(stop, start) != -1:
            return True
    return False
