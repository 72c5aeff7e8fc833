"""Logits -> token ids for every row, vectorised (one pass per distinct top-k).

Greedy rows take the argmax. Sampled rows apply temperature, top-k and top-p
(HF's order and semantics) inside a top-k window, then draw by inverse CDF
with one uniform per row from that request's own generator, so a seeded
request draws the same numbers whatever else shares the batch. No full
vocabulary sort unless some row disables top-k, and no `torch.multinomial`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .request import SamplingParams


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]  # under the model's own distribution (before temperature/top-k/top-p)


class RowRandom:
    """A request's private random stream: one uniform per sampling step."""

    def __init__(self, seed: int | None):
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))


class Sampler:
    def __call__(
        self, logits: torch.Tensor, params: list[SamplingParams], randoms: list[RowRandom | None]
    ) -> SamplerOutput:
        # logits: [rows, vocab] float32
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if p.do_sample]
        if sampled:
            uniforms = [randoms[i].uniform() for i in sampled]
            rows = torch.tensor(sampled, device=logits.device)
            tokens[rows] = self._sample(logits[rows], [params[i] for i in sampled], uniforms)
        chosen = logprobs.gather(1, tokens[:, None])[:, 0]
        return SamplerOutput(token_ids=tokens.tolist(), logprobs=chosen.tolist())

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams], uniforms: list[float]) -> torch.Tensor:
        """Rows are grouped by their own top-k, so a row's window never depends on its neighbours'."""
        vocab = logits.shape[-1]
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(p.top_k if 0 < p.top_k < vocab else vocab, []).append(i)
        tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
        for k, rows in groups.items():
            index = torch.tensor(rows, device=logits.device)
            tokens[index] = self._sample_window(
                logits[index], k, [params[i] for i in rows], [uniforms[i] for i in rows]
            )
        return tokens

    @staticmethod
    def _sample_window(logits: torch.Tensor, k: int, params: list[SamplingParams], uniforms: list[float]) -> torch.Tensor:
        dev = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev)
        scaled = logits / temperature[:, None]
        if k < logits.shape[-1]:
            values, index = scaled.topk(k, dim=-1)
            # topk orders ties arbitrarily: make the order canonical (value desc, then token id)
            # so the same uniform picks the same token in any batch.
            by_id = index.argsort(dim=-1, stable=True)
            values, index = values.gather(1, by_id), index.gather(1, by_id)
            by_value = values.argsort(dim=-1, descending=True, stable=True)
            values, index = values.gather(1, by_value), index.gather(1, by_value)
        else:
            values, index = scaled.sort(dim=-1, descending=True, stable=True)
        probs = torch.softmax(values, dim=-1)  # [rows, k]
        # HF top-p: drop a token when the mass ranked strictly above it already reaches top_p
        # (the most likely token always stays).
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= top_p[:, None], 0.0)
        cdf = probs.cumsum(dim=-1)
        u = torch.tensor(uniforms, device=dev, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u, right=True).clamp_(max=k - 1)
        return index.gather(1, pick)[:, 0]
