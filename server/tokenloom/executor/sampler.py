"""Logits -> token ids for every row, vectorised (one pass per distinct top-k).

Greedy rows take the argmax. Sampled rows apply temperature, top-k and top-p
(HF's order and semantics) inside a top-k window, then draw by inverse CDF
with the uniform the row's spec carries (engine/draws.py: a function of the
request's seed and the token's place), so a seeded request draws the same
tokens whatever else shares the batch. No `torch.multinomial`, and no full
vocabulary sort unless a row without top-k draws past its most likely
`Sampler.window` tokens (see `Sampler._sample_wide`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.batch import RowOutput, SampleSpec
from ..request import SamplingParams
from .logits_processors import RowContext, apply_penalties


def penalty_context(spec: SampleSpec) -> RowContext:
    p = spec.params
    return RowContext(
        token_ids=spec.token_ids, prompt_len=spec.prompt_len, repetition_penalty=p.repetition_penalty,
        no_repeat_ngram_size=p.no_repeat_ngram_size, min_new_tokens=p.min_new_tokens,
        eos_token_ids=spec.eos_token_ids,
    )


# The logit bias of the 8 tokens an octet of a mask stands for, by the octet's value: 0 where its bit
# is set (allowed: the logit stays), -inf where not. [256, 8] float32.
_BIAS_OF_OCTET = torch.tensor(np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1,
                                                     bitorder="little"), 0.0, -np.inf), dtype=torch.float32)


def _mask_bias(masks: list, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[rows, vocab] float32 on `device` from int32 bitmasks (bit t of word t // 32 set: token t
    allowed): 0 where a token is allowed, -inf where not. One gather from a table of octets: a
    third of the time of shifting the bits out with torch ops, and only the packed mask travels."""
    octets = torch.from_numpy(np.stack(masks).astype("<i4", copy=False).view(np.uint8))  # bit t: octet t // 8
    bias = _BIAS_OF_OCTET.to(device)[octets.to(device, torch.int64)]  # [rows, words * 4, 8]
    return bias.reshape(len(masks), -1)[:, :vocab]


def _constrain(processed: torch.Tensor, allowed: list, rows: list[int], fallback: torch.Tensor | None = None,
               sources: list[int] = ()) -> torch.Tensor:
    """Constrained rows (`rows` of `processed`) keep only their allowed tokens (the grammar thread's
    bitmasks, waited for here, after the forward): -inf is added where a token is not allowed, so the
    mask commutes with the penalties applied before it. With `fallback` (sampling), a row whose
    penalties left no allowed token finite (n-gram blocking can ban the only one) draws from its
    allowed tokens' unpenalised logits (`fallback[sources[i]]`); without (beams, as in HF), it stays
    at -inf. A row whose mask failed (None) is left as it is: its request fails after the step
    (grammar.Matcher.check). Rows are masked in place, one by one: gathering them into a copy and
    scattering it back cost twice as much."""
    masks = [f.result() for f in allowed]
    kept = [j for j, m in enumerate(masks) if m is not None]
    if not kept:
        return processed
    if processed is fallback:
        processed = processed.clone()
    bias = _mask_bias([masks[j] for j in kept], processed.shape[-1], processed.device)
    for b, j in enumerate(kept):
        processed[rows[j]].add_(bias[b])
    if fallback is not None:
        dead = (~torch.isfinite(torch.stack([processed[rows[j]].max() for j in kept]))).tolist()
        for b, j in enumerate(kept):
            if dead[b]:
                processed[rows[j]] = fallback[sources[j]] + bias[b]
    return processed


def _canonical_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row, by value (descending) then token id: topk orders ties arbitrarily,
    and a canonical order lets the same uniform pick the same token in any batch."""
    values, index = x.topk(k, dim=-1)
    by_id = index.argsort(dim=-1, stable=True)
    values, index = values.gather(1, by_id), index.gather(1, by_id)
    by_value = values.argsort(dim=-1, descending=True, stable=True)
    return values.gather(1, by_value), index.gather(1, by_value)


# A row without top-k is drawn first from its most likely WINDOW tokens: the default model at
# temperature 1 leaves 4 % of its mass past them on average (1.6 % median), and sorting its 49,152
# tokens costs 4.3 ms a row on a 2-core AVX2 machine against 0.14 ms for the window.
WINDOW = 256


class Sampler:
    def __init__(self, window: int = WINDOW):
        self.window = window

    def __call__(self, logits: torch.Tensor, specs: list[SampleSpec]) -> list[RowOutput]:
        # logits: [rows, vocab] float32, row i drawn as specs[i] says
        raw = torch.log_softmax(logits, dim=-1)  # the model's own distribution
        results = [RowOutput() for _ in specs]
        self._top_n(raw, specs, results)
        beam = [i for i, s in enumerate(specs) if s.beam_width]
        if beam:
            self._beam_candidates(raw, beam, specs, results)
        drawn = [i for i, s in enumerate(specs) if not s.beam_width]
        if drawn:
            self._draw(logits, raw, drawn, specs, results)
        return results

    @staticmethod
    def label_logprobs(logits: torch.Tensor, labels: list[int]) -> list[float]:
        """log p(label_i) under row i of `logits` ([rows, vocab]): scoring."""
        index = torch.tensor(labels, device=logits.device)[:, None]
        return torch.log_softmax(logits, dim=-1).gather(1, index)[:, 0].tolist()

    @staticmethod
    def _top_n(raw: torch.Tensor, specs: list[SampleSpec], results: list[RowOutput]) -> None:
        wanted = [i for i, s in enumerate(specs) if s.params.top_n]
        if not wanted:
            return
        n = max(specs[i].params.top_n for i in wanted)
        values, index = raw[wanted].topk(n, dim=-1)  # [wanted, n], best first
        for i, vals, ids in zip(wanted, values.tolist(), index.tolist()):
            k = specs[i].params.top_n
            results[i].top_tokens = list(zip(ids[:k], vals[:k]))

    @staticmethod
    def _beam_candidates(raw: torch.Tensor, beam: list[int], specs: list[SampleSpec], results: list[RowOutput]) -> None:
        # HF beam search applies the processors to log-softmax scores.
        scores = apply_penalties(raw[beam], [penalty_context(specs[i]) for i in beam])
        constrained = [pos for pos, i in enumerate(beam) if specs[i].allowed is not None]
        if constrained:
            scores = _constrain(scores, [specs[beam[pos]].allowed for pos in constrained], constrained)
        k = max(specs[i].beam_width for i in beam)
        values, index = scores.topk(k, dim=-1)
        for i, vals, ids in zip(beam, values.tolist(), index.tolist()):
            k_i = specs[i].beam_width
            results[i].candidates = list(zip(ids[:k_i], vals[:k_i]))

    def _draw(self, logits, raw, drawn: list[int], specs: list[SampleSpec], results: list[RowOutput]) -> None:
        contexts = [penalty_context(specs[i]) for i in drawn]
        if len(drawn) == len(logits):  # no beam rows: every row draws, in order; copied only to penalise
            processed = apply_penalties(logits, contexts, inplace=False)  # [drawn, vocab]
        else:
            processed = apply_penalties(logits[drawn], contexts)
        constrained = [pos for pos, i in enumerate(drawn) if specs[i].allowed is not None]
        if constrained:
            processed = _constrain(processed, [specs[drawn[pos]].allowed for pos in constrained], constrained,
                                   fallback=logits, sources=[drawn[pos] for pos in constrained])
        # One line per draw: a prompt with n samples is drawn n times from its one row.
        line_row = [pos for pos, i in enumerate(drawn) for _ in specs[i].uniforms]
        line_uniform = [u for i in drawn for u in specs[i].uniforms]
        lines = processed if len(line_row) == len(drawn) else processed[line_row]  # [draws, vocab]
        tokens = lines.argmax(dim=-1)
        sampled = [j for j, u in enumerate(line_uniform) if u is not None]
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            params = [specs[drawn[line_row[j]]].params for j in sampled]
            tokens[index] = self._sample(lines[index], params, [line_uniform[j] for j in sampled])
        source = torch.tensor([drawn[pos] for pos in line_row], device=logits.device)
        chosen = raw[source, tokens]  # each draw's raw log-prob, one element per line
        for pos, token, logprob in zip(line_row, tokens.tolist(), chosen.tolist()):
            result = results[drawn[pos]]
            result.token_ids.append(token)
            result.logprobs.append(logprob)

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams], uniforms: list[float]) -> torch.Tensor:
        """Rows are grouped by their own top-k, so a row's window never depends on its neighbours'.
        Rows without top-k go through `_sample_wide`, except with typical-p, which ranks the whole
        distribution and so needs the full sort anyway."""
        vocab = logits.shape[-1]
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, p in enumerate(params):
            k = p.top_k if 0 < p.top_k < vocab else vocab
            groups.setdefault((k, k == vocab and self.window < vocab and p.typical_p >= 1.0), []).append(i)
        tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
        for (k, wide), rows in groups.items():
            index = torch.tensor(rows, device=logits.device)
            sample = self._sample_wide if wide else self._sample_window
            tokens[index] = sample(logits[index], k, [params[i] for i in rows], [uniforms[i] for i in rows])
        return tokens

    def _sample_wide(self, logits: torch.Tensor, k: int, params: list[SamplingParams],
                     uniforms: list[float]) -> torch.Tensor:
        """Rows without top-k, drawn by the same inverse CDF without sorting the vocabulary. Each row's
        `window` most likely tokens are taken in the canonical order, with their probabilities over
        the whole row (one log-softmax), so the mass of the rest is known without sorting it. Top-p
        and min-p apply inside the window as in `_sample_window`; they drop every token past it
        when the window's mass reaches top-p, or when its last token is below the min-p floor. A
        row has its token here when its rest is dropped, or when nothing filters the rest and its
        uniform falls inside the window's mass. The others (a draw past the window, about as often
        as the rest's mass; a top-p or min-p cut past the window) are drawn again from the full
        sort with the same uniform."""
        dev, w = logits.device, self.window
        temperature = torch.tensor([p.temperature for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
        values, index = _canonical_topk(torch.log_softmax(logits / temperature[:, None], dim=-1), w)
        probs = values.exp()  # [rows, w], each a probability under the whole row
        mass = probs.cumsum(dim=-1)
        probs = probs.masked_fill(mass - probs >= top_p, 0.0)
        rest_dropped = mass[:, -1:] >= top_p  # every token past the window has that mass ranked above it
        min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=probs.dtype)[:, None]
        if (min_p > 0.0).any():
            floor = min_p * probs[:, :1]
            probs = probs.masked_fill(probs < floor, 0.0)
            rest_dropped |= values[:, -1:].exp() < floor  # the rest is no likelier than the window's last
        # Where no filter reaches past the window, the rest keeps all its mass: 1 - the window's. Where
        # top-p or min-p cut inside the rest, how much it keeps is known only from the full sort.
        rest_whole = (top_p >= 1.0) & (min_p <= 0.0)
        cdf = probs.cumsum(dim=-1)
        kept = cdf[:, -1:]
        total = kept + torch.where(rest_dropped, 0.0, (1.0 - mass[:, -1:]).clamp(min=0.0))
        u = torch.tensor(uniforms, device=dev, dtype=cdf.dtype)[:, None] * total
        past = (~rest_dropped & (~rest_whole | (u >= kept)))[:, 0]
        u = torch.minimum(u, torch.nextafter(kept, torch.zeros_like(kept)))  # as in _sample_window
        tokens = index.gather(1, torch.searchsorted(cdf, u, right=True).clamp_(max=w - 1))[:, 0]
        again = past.nonzero()[:, 0].tolist()
        if again:
            tokens[again] = self._sample_window(logits[again], k, [params[i] for i in again],
                                                [uniforms[i] for i in again])
        return tokens

    @staticmethod
    def _sample_window(logits: torch.Tensor, k: int, params: list[SamplingParams], uniforms: list[float]) -> torch.Tensor:
        dev = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev)
        scaled = logits / temperature[:, None]
        if k < logits.shape[-1]:
            values, index = _canonical_topk(scaled, k)
        else:
            values, index = scaled.sort(dim=-1, descending=True, stable=True)
        probs = torch.softmax(values, dim=-1)  # [rows, k]
        # HF top-p: drop a token when the mass ranked strictly above it already reaches top_p
        # (the most likely token always stays).
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= top_p[:, None], 0.0)
        min_p = [p.min_p for p in params]
        if any(m > 0.0 for m in min_p):
            # HF min-p on the top-p-filtered distribution; renormalising it would not change p / p_max,
            # and column 0 holds p_max, so that token (the one HF's min_tokens_to_keep=1 saves) stays.
            floor = torch.tensor(min_p, device=dev, dtype=probs.dtype)[:, None] * probs[:, :1]
            probs = probs.masked_fill(probs < floor, 0.0)
        typical_p = [p.typical_p for p in params]
        if any(t < 1.0 for t in typical_p):
            # HF typical-p on what min-p left: rank tokens by |-log p - entropy| and keep the least
            # surprising ones until their mass reaches typical_p, plus every token tied with the last.
            # Removed tokens have p = 0, hence an infinite shift, and rank last.
            mass = torch.tensor(typical_p, device=dev, dtype=probs.dtype)[:, None]
            dist = probs / probs.sum(dim=-1, keepdim=True)
            log_p = dist.log()
            entropy = -(dist * log_p).nansum(dim=-1, keepdim=True)
            shift = (-log_p - entropy).abs()  # [rows, k]
            ranked, order = shift.sort(dim=-1, stable=True)
            last = (dist.gather(1, order).cumsum(dim=-1) < mass).sum(dim=-1, keepdim=True).clamp_(max=k - 1)
            # The least shifted token never exceeds the threshold, so at least one token always stays.
            atypical = (shift > ranked.gather(1, last)) & (mass < 1.0)
            probs = probs.masked_fill(atypical, 0.0)
        cdf = probs.cumsum(dim=-1)
        total = cdf[:, -1:]
        u = torch.tensor(uniforms, device=dev, dtype=cdf.dtype)[:, None] * total
        # A 53-bit uniform within 2**-25 of 1 rounds to 1.0 in float32: kept below the total mass, so the
        # pick is the last token with any probability, never a filtered (or constraint-banned) one after it.
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
        pick = torch.searchsorted(cdf, u, right=True).clamp_(max=k - 1)
        return index.gather(1, pick)[:, 0]
