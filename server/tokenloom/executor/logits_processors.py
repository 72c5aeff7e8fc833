"""HF's history-dependent logits processors for a batch whose rows differ: one pass, no loop over vocab.

`apply_penalties` does what `generate` does with `repetition_penalty`, `no_repeat_ngram_size` and
`min_new_tokens`, in HF's order (RepetitionPenaltyLogitsProcessor -> NoRepeatNGramLogitsProcessor ->
MinNewTokensLengthLogitsProcessor), on raw logits (greedy and sampled rows) or on log-softmax scores
(beam rows: HF's beam search runs its processors on log-probabilities). Only (row, token) pairs a
processor touches are gathered and written, so the cost grows with the histories of the rows that
ask for a processor, not with the vocabulary; neutral rows cost one Python attribute check.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowContext:
    """What the processors need to know about one row this step."""

    token_ids: Sequence[int]  # prompt + generated so far: HF's `input_ids` for this row
    prompt_len: int
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    eos_token_ids: frozenset[int] = frozenset()

    @property
    def blocks_eos(self) -> bool:
        # HF: MinNewTokensLengthLogitsProcessor bans EOS while `len(input_ids) - prompt_len < min_new_tokens`.
        return bool(self.eos_token_ids) and len(self.token_ids) - self.prompt_len < self.min_new_tokens


def banned_ngram_tokens(token_ids: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `token_ids` (HF's no_repeat_ngram_size).

    Each window token_ids[j : j + n] whose first n - 1 tokens equal the last n - 1 tokens of the
    history bans its last token. Fewer than n tokens hold no n-gram, so nothing is banned; n = 1 bans
    every token seen. Distinct tokens, in order of first occurrence.

    The candidate windows are found with `Sequence.index` (a C scan over the history), so the Python
    work per row is proportional to the number of matches, not to the history length.
    """
    length = len(token_ids)
    if n <= 0 or length < n:
        return []
    if n == 1:
        return list(dict.fromkeys(token_ids))
    prefix = token_ids[length - n + 1 :]
    first = prefix[0]
    last_start = length - n  # the last window that already holds n tokens starts here
    banned: dict[int, None] = {}
    start = 0
    while True:
        try:
            j = token_ids.index(first, start, last_start + 1)
        except ValueError:
            return list(banned)
        if token_ids[j : j + n - 1] == prefix:
            banned[token_ids[j + n - 1]] = None
        start = j + 1


def apply_penalties(scores: torch.Tensor, rows: list[RowContext], inplace: bool = True) -> torch.Tensor:
    """Repetition penalty, no-repeat-ngram and min-new-tokens for every row, each with its own parameters.

    scores: [rows, vocab] float, modified in place when contiguous and `inplace` (else a copy is):
    use the returned tensor, which is `scores` itself when no row needs a processor. Token ids at or
    past `vocab` (an embedding table larger than the LM head) are ignored, as HF does.
    """
    penalised = [i for i, r in enumerate(rows) if r.repetition_penalty != 1.0]
    ngram = [i for i, r in enumerate(rows) if r.no_repeat_ngram_size > 0]
    min_new = [i for i, r in enumerate(rows) if r.blocks_eos]
    if not (penalised or ngram or min_new):
        return scores
    scores = scores.contiguous() if inplace else scores.clone()
    # Flat (row * vocab + token) indices: index_select / index_copy_ / index_fill_ on the flat view
    # stay single-threaded for a few thousand pairs on CPU, where 2-D advanced indexing spins up
    # the thread pool (milliseconds on a loaded machine); on GPU they are one kernel each.
    flat_scores = scores.view(-1)
    vocab = scores.shape[-1]
    if penalised:
        _repetition_penalty(flat_scores, vocab, [rows[i] for i in penalised], penalised)
    banned: list[int] = []
    for i in ngram:
        tokens = banned_ngram_tokens(rows[i].token_ids, rows[i].no_repeat_ngram_size)
        banned += [i * vocab + t for t in tokens if 0 <= t < vocab]
    for i in min_new:
        banned += [i * vocab + t for t in rows[i].eos_token_ids if 0 <= t < vocab]
    if banned:
        flat_scores.index_fill_(0, torch.tensor(banned, device=scores.device), -float("inf"))
    return scores


def _repetition_penalty(flat_scores: torch.Tensor, vocab: int, rows: list[RowContext], index: list[int]) -> None:
    """HF: each distinct token of the history (prompt included) once, score < 0 -> * penalty, else / penalty.

    A token seen several times appears in several pairs; every copy writes the same value, computed
    from the scores before any write, so the penalty still lands exactly once.
    """
    # Built through C buffers (array * count, frombuffer): torch.tensor on a list of Python ints,
    # repeat_interleave and boolean masks cost far more on CPU for a few thousand pairs.
    tokens, owner = array("q"), array("q")
    for j, r in enumerate(rows):
        tokens.extend(r.token_ids)
        owner.extend(array("q", [j]) * len(r.token_ids))
    if not tokens:
        return
    token_t = torch.frombuffer(tokens, dtype=torch.int64)  # [n]
    owner_t = torch.frombuffer(owner, dtype=torch.int64)  # [n], position in `rows`
    lowest, highest = token_t.aminmax()  # on the CPU copy: no device sync
    if lowest < 0 or highest >= vocab:
        keep = (token_t >= 0) & (token_t < vocab)
        token_t, owner_t = token_t[keep], owner_t[keep]
    dev = flat_scores.device
    token_t, owner_t = token_t.to(dev), owner_t.to(dev)
    flat = torch.tensor(index, device=dev).index_select(0, owner_t) * vocab + token_t
    penalty = torch.tensor([r.repetition_penalty for r in rows], dtype=flat_scores.dtype, device=dev)
    penalty = penalty.index_select(0, owner_t)
    old = flat_scores.index_select(0, flat)
    flat_scores.index_copy_(0, flat, torch.where(old < 0, old * penalty, old / penalty))
