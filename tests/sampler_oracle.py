"""The sampler called as the executor calls it, and HF's warpers as the oracle of what it may draw:
shared by the sampler and the logits-processor tests."""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from tokenloom.engine import draws
from tokenloom.engine.batch import SampleSpec
from tokenloom.executor.sampler import Sampler
from tokenloom.request import SamplingParams


def greedy(**changes) -> SamplingParams:
    return replace(SamplingParams(max_new_tokens=1), **changes)


def sampling(temperature=1.0, top_k=50, top_p=1.0, min_p=0.0, typical_p=1.0, seed=None, **changes) -> SamplingParams:
    return replace(SamplingParams(max_new_tokens=1, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                                  min_p=min_p, typical_p=typical_p, seed=seed), **changes)


class Stream:
    """A seeded sample's uniforms, one per generated token, as the engine hands them to the sampler."""

    def __init__(self, seed: int, index: int = 0):
        self.seed, self.index, self.k = seed, index, 0

    def next(self) -> float:
        self.k += 1
        return draws.uniform(self.seed, self.index, self.k - 1)


def spec(params: SamplingParams, streams=(None,), history=(), prompt_len: int = 0, eos=frozenset(),
         beam_width: int = 0) -> SampleSpec:
    """One row's spec; each stream in `streams` is one draw (None: the argmax)."""
    uniforms = tuple(None if s is None else s.next() for s in streams)
    return SampleSpec(params, tuple(history), prompt_len, frozenset(eos), uniforms, beam_width)


def draw(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams], streams: list[Stream | None]):
    """One draw per row, each row with its own stream (None: greedy): (token ids, log-probs)."""
    results = sampler(logits, [spec(p, [s]) for p, s in zip(params, streams)])
    assert len(results) == len(params)
    assert all(len(r.token_ids) == len(r.logprobs) == 1 and r.candidates == [] for r in results)
    return [r.token_ids[0] for r in results], [r.logprobs[0] for r in results]


def hf_warped(logits: torch.Tensor, p: SamplingParams, nudge: float = 0.0) -> torch.Tensor:
    """HF's sampling warpers for one row in `_get_logits_processor`'s order: [vocab], -inf where a
    token is removed; `nudge` shifts every cut-off (top-p, min-p, typical-p)."""
    scores = logits[None].clone()
    dummy = torch.zeros((1, 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(p.temperature)(dummy, scores)
    if p.top_k:  # HF adds no top-k warper for top_k=0
        scores = TopKLogitsWarper(p.top_k)(dummy, scores)
    if p.top_p < 1.0:  # nor a top-p warper for top_p=1
        scores = TopPLogitsWarper(p.top_p + nudge)(dummy, scores)
    if p.min_p > 0.0:
        scores = MinPLogitsWarper(p.min_p + nudge)(dummy, scores)
    if p.typical_p < 1.0:
        scores = TypicalLogitsWarper(p.typical_p + nudge)(dummy, scores)
    return scores[0]


def hf_kept(logits: torch.Tensor, p: SamplingParams, nudge: float = 0.0) -> set[int]:
    return set(torch.isfinite(hf_warped(logits, p, nudge)).nonzero()[:, 0].tolist())


def cut_offs_are_clear(logits: torch.Tensor, p: SamplingParams, margin: float = 1e-4) -> bool:
    """Moving every cut-off a little, or computing in double, keeps the same tokens: rounding cannot decide."""
    kept = hf_kept(logits, p)
    return all(hf_kept(x, p, nudge) == kept for x in (logits, logits.double()) for nudge in (-margin, 0.0, margin))
