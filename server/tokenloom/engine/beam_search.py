"""Beam search bookkeeping for one request: which beams continue, which hypotheses finish. Pure Python.

This is HF transformers 5.x `GenerationMixin._beam_search` (greedy, decoder-only, batch size 1),
step for step, with the tensors replaced by small lists. The engine runs the model on every running
beam, applies log_softmax and then the logits processors (HF's order in beam search), and hands
`BeamSearch.step` each beam's top `beams_to_keep` (token, processed logprob) pairs; `step` answers
with the parent and token of every new running beam (the engine forks KV rows accordingly).

Where this departs from HF's tensors, and why the results are the same:
- HF starts with `num_beams` copies of the prompt, scored [0, -1e9, -1e9, ...], so that the first
  step draws only from the first copy. We start with ONE running beam scored 0. The copies' candidates
  (about -1e9) could only enter the top `beams_to_keep` if the first copy had fewer than
  `beams_to_keep` finite candidates, i.e. a vocabulary smaller than `beams_to_keep` or processors that
  mask nearly all of it to -inf; `step` rejects too few candidates instead.
- HF computes in float32; we use Python floats. Scores agree to ~1e-6 relative, and rankings agree
  unless two hypotheses tie within float32 rounding. In float32, `score - 1e9` collapses to about
  -1e9, so HF orders the penalised entries by torch.topk's tie order; here they keep their order by
  score. That only decides which unfinished placeholders fill the finished slots, and every slot
  holds a real finished hypothesis by the time the search is done (see `results`), unless
  processors drove scores to -inf.
- Ties are broken by the lower flat index, beam-major then token id, as torch.topk does in practice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

_T = TypeVar("_T")

# HF's "never choose this" penalty. It is added, not assigned, so penalised entries still rank by score.
_PENALTY = -1.0e9


@dataclass(frozen=True)
class BeamParams:
    num_beams: int
    prompt_len: int
    max_length: int  # prompt_len + max_new_tokens (HF max_length)
    eos_token_ids: frozenset[int]
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # False, True or "never" (HF semantics)
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError(
                f"num_return_sequences must be in [1, num_beams={self.num_beams}], got {self.num_return_sequences}")
        if self.max_length <= self.prompt_len:
            raise ValueError(f"max_length ({self.max_length}) must exceed prompt_len ({self.prompt_len})")
        if self.early_stopping not in (False, True, "never") or not isinstance(self.early_stopping, (bool, str)):
            raise ValueError(f"early_stopping must be False, True or 'never', got {self.early_stopping!r}")

    @property
    def beams_to_keep(self) -> int:
        """Candidates kept per step: enough that `num_beams` survive even if every beam's best are EOS."""
        return max(2, 1 + len(self.eos_token_ids)) * self.num_beams


@dataclass(frozen=True)
class Beam:
    """A running beam: its generated tokens and the sum of their processed logprobs."""

    token_ids: tuple[int, ...]
    score: float  # includes a -1e9 penalty if it already stopped (kept only when nothing live is left)


@dataclass(frozen=True)
class Hypothesis:
    token_ids: tuple[int, ...]  # generated tokens only, EOS included when it ended with EOS
    score: float  # HF's sequences_scores: sum of processed logprobs / (generated_len ** length_penalty)
    finished_by_eos: bool


@dataclass(frozen=True)
class BeamStep:
    parents: tuple[int, ...]  # per new running beam (best first): index of its parent in the previous `running`
    tokens: tuple[int, ...]  # the token appended to that parent
    done: bool  # HF's loop would stop after this step


@dataclass(frozen=True)
class _Candidate:
    parent: int
    token_ids: tuple[int, ...]  # parent's tokens + the new token
    score: float  # accumulated, unnormalised
    stopped: bool  # the new token hits a stopping criterion (EOS or max_length)

    @property
    def live_score(self) -> float:
        """Score as a running beam: a stopped candidate is kept only if fewer than num_beams are live."""
        return self.score + (_PENALTY if self.stopped else 0.0)


@dataclass(frozen=True)
class _Slot:
    """One of HF's `num_beams` finished-hypothesis slots (`sequences`, `beam_scores`, `is_sent_finished`)."""

    token_ids: tuple[int, ...]
    score: float  # length-normalised, penalties included
    finished: bool


def _top(items: list[_T], key: Callable[[_T], float], k: int) -> list[_T]:
    """The k items with the highest key, best first; ties keep input order (lower index first)."""
    return sorted(items, key=lambda item: -key(item))[:k]


class BeamSearch:
    """Beam search state for one request; call `step` once per decoding step until `done`."""

    def __init__(self, params: BeamParams):
        self.params = params
        self._running: list[Beam] = [Beam((), 0.0)]
        self._slots: list[_Slot] = [_Slot((), _PENALTY, False)] * params.num_beams
        self._done = False

    @property
    def running(self) -> tuple[Beam, ...]:
        """Running beams, best first: one before the first step, `num_beams` after."""
        return tuple(self._running)

    @property
    def done(self) -> bool:
        return self._done

    @property
    def num_generated(self) -> int:
        return len(self._running[0].token_ids)

    def best_running(self) -> tuple[int, ...]:
        """Tokens of the best running beam, for provisional streaming (the final winner may differ)."""
        return self._running[0].token_ids

    def step(self, candidates: list[list[tuple[int, float]]]) -> BeamStep:
        """Advance one token. `candidates[i]` holds running beam i's top `beams_to_keep` (token, logprob), best first.

        Mirrors one iteration of HF's loop: top-k continuations, stopping criteria, next running beams,
        finished-beam update, early-stop heuristic and the loop condition.
        """
        if self._done:
            raise RuntimeError("beam search is done; step() must not be called again")
        if len(candidates) != len(self._running):
            raise ValueError(f"expected candidates for {len(self._running)} running beams, got {len(candidates)}")
        p = self.params
        top = self._top_k_continuations(candidates)
        # HF's _get_running_beams_for_next_iteration
        chosen = _top(top, lambda c: c.live_score, p.num_beams)
        self._running = [Beam(c.token_ids, c.live_score) for c in chosen]
        new_len = self.num_generated
        self._update_finished(top, new_len)
        # HF's _beam_search_has_unfinished_sequences. Its early-stop flag is sticky across steps, but with one
        # request the loop ends the first time it clears, so it needs no state here.
        all_full = all(s.finished for s in self._slots) and p.early_stopping is True
        self._done = not self._improvement_possible(new_len) or all_full or all(c.stopped for c in top)
        return BeamStep(parents=tuple(c.parent for c in chosen), tokens=tuple(c.token_ids[-1] for c in chosen),
                        done=self._done)

    def results(self) -> list[Hypothesis]:
        """The best `num_return_sequences` finished slots, best first (HF's `sequences[:, :num_return_sequences]`).

        Once `done`, every slot holds a finished hypothesis: the search ends either on the early-stop
        heuristic or early_stopping=True (both need all slots finished) or on max_length, whose last
        step finishes the top `num_beams` candidates. An unfinished slot (asked early, or scores at
        -inf) comes back as HF would return it: score about -1e9, finished_by_eos False.
        """
        eos = self.params.eos_token_ids
        return [
            Hypothesis(s.token_ids, s.score, s.finished and bool(s.token_ids) and s.token_ids[-1] in eos)
            for s in self._slots[: self.params.num_return_sequences]
        ]

    def check_invariants(self) -> None:
        p = self.params
        n = self.num_generated
        expected_running = 1 if n == 0 else p.num_beams
        if len(self._running) != expected_running:
            raise AssertionError(f"{len(self._running)} running beams, expected {expected_running}")
        if any(len(b.token_ids) != n for b in self._running):
            raise AssertionError("running beams differ in length")
        if len({b.token_ids for b in self._running}) != len(self._running):
            raise AssertionError("two running beams hold the same tokens")
        if p.prompt_len + n > p.max_length:
            raise AssertionError("generated past max_length")
        if len(self._slots) != p.num_beams:
            raise AssertionError(f"{len(self._slots)} finished slots, expected {p.num_beams}")
        for beams, score in ((self._running, lambda b: b.score), (self._slots, lambda s: s.score)):
            scores = [score(b) for b in beams]
            if scores != sorted(scores, reverse=True):
                raise AssertionError("beams are not sorted best first")
        for s in self._slots:
            if s.finished and not (0 < len(s.token_ids) <= n):
                raise AssertionError(f"finished slot of length {len(s.token_ids)} after {n} steps")

    # HF's _get_top_k_continuations (+ the stopping criteria of step d)
    def _top_k_continuations(self, candidates: list[list[tuple[int, float]]]) -> list[_Candidate]:
        p = self.params
        k = p.beams_to_keep
        pool = []
        for parent, (beam, cands) in enumerate(zip(self._running, candidates)):
            for token, logprob in cands[:k]:
                pool.append((beam.score + logprob, parent, token))
        if len(pool) < k:
            raise ValueError(f"need at least beams_to_keep={k} candidates in all, got {len(pool)}")
        # Flat index order (beam-major, then token id) breaks ties, as in HF's topk over [num_beams * vocab].
        pool.sort(key=lambda c: (-c[0], c[1], c[2]))
        reaches_max = p.prompt_len + self.num_generated + 1 >= p.max_length
        return [
            _Candidate(parent, self._running[parent].token_ids + (token,), score,
                       reaches_max or token in p.eos_token_ids)
            for score, parent, token in pool[:k]
        ]

    # HF's _update_finished_beams
    def _update_finished(self, top: list[_Candidate], new_len: int) -> None:
        p = self.params
        divisor = new_len ** p.length_penalty
        # HF also adds -1e9 when a row's slots are all finished under early_stopping=True, or when its early-stop
        # heuristic has given up. Either ends HF's loop for a one-request batch before the next step, and `step`
        # refuses to run once done, so neither can apply here.
        fresh = []
        for rank, c in enumerate(top):
            # Only the top num_beams candidates may finish; the rest exist so num_beams stay live.
            just_finished = c.stopped and rank < p.num_beams
            score = c.score / divisor + (0.0 if just_finished else _PENALTY)
            fresh.append(_Slot(c.token_ids, score, just_finished))
        self._slots = _top(self._slots + fresh, lambda s: s.score, p.num_beams)

    # HF's _check_early_stop_heuristic, with cur_len already incremented
    def _improvement_possible(self, new_len: int) -> bool:
        p = self.params
        if p.early_stopping == "never" and p.length_penalty > 0.0:
            best_length = p.max_length - p.prompt_len
        else:
            best_length = new_len
        best_possible = self._running[0].score / (best_length ** p.length_penalty)
        worst_finished = min(s.score for s in self._slots)
        return any(best_possible > (worst_finished if s.finished else _PENALTY) for s in self._slots)
