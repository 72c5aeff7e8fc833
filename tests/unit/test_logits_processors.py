"""History-dependent processors and the min-p / typical-p warpers, against transformers' own classes.

HF's processors, applied one row at a time, are the oracle: a batch whose rows all differ must come
out as if each row had gone through `generate` on its own, on raw logits and on log-probabilities
(what beam search processes).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    _get_generated_ngrams,
    _get_ngrams,
)

from sampler_oracle import Stream, cut_offs_are_clear, draw, hf_kept, hf_warped, sampling
from tokenloom.executor.logits_processors import RowContext, apply_penalties, banned_ngram_tokens
from tokenloom.executor.sampler import Sampler

VOCAB = 257


def hf_penalised(scores: torch.Tensor, row: RowContext) -> torch.Tensor:
    """One row through the processors `generate` builds for it, in `_get_logits_processor`'s order."""
    input_ids = torch.tensor([list(row.token_ids)], dtype=torch.long)  # [1, len]
    out = scores[None].clone()
    if row.repetition_penalty != 1.0:
        out = RepetitionPenaltyLogitsProcessor(float(row.repetition_penalty))(input_ids, out)
    if row.no_repeat_ngram_size > 0:
        out = NoRepeatNGramLogitsProcessor(row.no_repeat_ngram_size)(input_ids, out)
    if row.min_new_tokens > 0 and row.eos_token_ids:
        out = MinNewTokensLengthLogitsProcessor(row.prompt_len, row.min_new_tokens, sorted(row.eos_token_ids))(
            input_ids, out
        )
    return out[0]


def random_row(rng: random.Random, vocab: int) -> RowContext:
    # A small alphabet makes repeated n-grams common; a few ids lie past the LM head, as when the
    # embedding table is larger than the output vocabulary (HF ignores those).
    alphabet = rng.choice([4, 12, vocab, vocab + 8])
    length = rng.randint(1, 60)
    token_ids = [rng.randrange(alphabet) for _ in range(length)]
    container = rng.choice([list, tuple])
    return RowContext(
        token_ids=container(token_ids),
        prompt_len=rng.randint(0, length),
        repetition_penalty=rng.choice([1.0, 1.0, 0.5, 0.9, 1.2, 1.7]),
        no_repeat_ngram_size=rng.choice([0, 0, 1, 2, 3, 4]),
        min_new_tokens=rng.choice([0, 0, 1, 3, 10, 100]),
        eos_token_ids=frozenset(rng.sample(range(vocab + 2), rng.choice([0, 1, 1, 3]))),
    )


def assert_same_scores(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), "banned tokens differ"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], atol=1e-6, rtol=0)


# apply_penalties


@pytest.mark.parametrize("log_probs", [False, True], ids=["logits", "log_softmax"])
@pytest.mark.parametrize("seed", range(5))
def test_a_mixed_batch_matches_hf_processors_row_by_row(seed, log_probs):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    rows = [random_row(rng, VOCAB) for _ in range(48)]
    scores = torch.randn(len(rows), VOCAB, generator=gen) * 4
    if log_probs:
        scores = torch.log_softmax(scores, dim=-1)
    expected = torch.stack([hf_penalised(s, r) for s, r in zip(scores, rows)])
    assert not torch.equal(expected, scores), "the batch exercises no processor"
    assert_same_scores(apply_penalties(scores.clone(), rows), expected)


def test_every_processor_changes_something_in_the_random_batches():
    # Guards the test above against a generator that never triggers one of the three processors.
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    touched = {"penalty": 0, "ngram": 0, "eos": 0}
    for _ in range(100):
        row = random_row(rng, VOCAB)
        scores = torch.randn(VOCAB, generator=gen)
        neutral = replace(row, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0)
        for name, ctx in [
            ("penalty", replace(neutral, repetition_penalty=row.repetition_penalty)),
            ("ngram", replace(neutral, no_repeat_ngram_size=row.no_repeat_ngram_size)),
            ("eos", replace(neutral, min_new_tokens=row.min_new_tokens)),
        ]:
            touched[name] += not torch.equal(apply_penalties(scores[None].clone(), [ctx])[0], scores)
    assert all(count >= 10 for count in touched.values()), touched


def test_a_batch_that_needs_no_processor_is_returned_untouched():
    scores = torch.randn(3, VOCAB)
    before = scores.clone()
    rows = [
        RowContext(token_ids=[1, 2, 1, 2, 1], prompt_len=2),
        RowContext(token_ids=(5, 5, 5), prompt_len=1, min_new_tokens=2, eos_token_ids=frozenset({7})),  # 2 new: done
        RowContext(token_ids=[9], prompt_len=1, min_new_tokens=3),  # no EOS to hold back
    ]
    assert apply_penalties(scores, rows) is scores
    assert torch.equal(scores, before)


def test_neutral_rows_are_left_alone_beside_rows_that_are_processed():
    scores = torch.randn(3, VOCAB)
    history = [3, 4, 3, 4, 3]
    rows = [
        RowContext(token_ids=history, prompt_len=2),
        RowContext(token_ids=history, prompt_len=2, repetition_penalty=1.3, no_repeat_ngram_size=2),
        RowContext(token_ids=history, prompt_len=2, min_new_tokens=9, eos_token_ids=frozenset({0})),
    ]
    out = apply_penalties(scores.clone(), rows)
    assert torch.equal(out[0], scores[0])
    assert out[1, 4] == -math.inf  # (3, 4) was seen and the history ends in 3
    assert out[2, 0] == -math.inf


def test_the_repetition_penalty_applies_once_per_distinct_token():
    scores = torch.tensor([[2.0, -2.0, 1.0, 0.0]])
    row = RowContext(token_ids=[0, 0, 0, 1, 1, 3], prompt_len=6, repetition_penalty=2.0)
    out = apply_penalties(scores, [row])
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.0]]


def test_min_new_tokens_holds_eos_until_exactly_that_many_tokens_are_generated():
    prompt = [1, 2, 3]
    eos = frozenset({0, 5})
    for generated in range(5):
        row = RowContext(token_ids=prompt + [4] * generated, prompt_len=3, min_new_tokens=3, eos_token_ids=eos)
        out = apply_penalties(torch.zeros(1, 8), [row])[0]
        banned = set(torch.isneginf(out).nonzero()[:, 0].tolist())
        assert banned == (set(eos) if generated < 3 else set()), generated


def test_penalties_run_on_the_scores_device_and_dtype():
    scores = torch.randn(2, VOCAB, dtype=torch.float64)
    rows = [RowContext(token_ids=[1, 2, 1], prompt_len=1, repetition_penalty=1.5, no_repeat_ngram_size=2)] * 2
    expected = torch.stack([hf_penalised(s, r) for s, r in zip(scores, rows)])
    assert_same_scores(apply_penalties(scores, rows), expected)


def test_a_non_contiguous_slice_of_the_model_output_is_processed_into_the_returned_tensor():
    logits = torch.randn(2, 5, VOCAB)  # [rows, positions, vocab]: the runner keeps the last position
    last = logits[:, -1, :]
    rows = [RowContext(token_ids=[1, 2, 1], prompt_len=1, repetition_penalty=1.5, no_repeat_ngram_size=2)] * 2
    expected = torch.stack([hf_penalised(s, r) for s, r in zip(last, rows)])
    assert_same_scores(apply_penalties(last, rows), expected)


def test_timing_of_apply_penalties_for_64_rows_over_a_49k_vocabulary():
    rng = random.Random(0)
    vocab, history = 49152, 300
    rows = []
    for i in range(64):
        tokens = [rng.randrange(2000) for _ in range(history)]
        if i % 2:
            rows.append(RowContext(tokens, prompt_len=100, repetition_penalty=1.2, no_repeat_ngram_size=3))
        else:
            rows.append(RowContext(tokens, prompt_len=100))
    scores = torch.randn(64, vocab)
    copies = [scores.clone() for _ in range(21)]
    apply_penalties(copies.pop(), rows)  # warm-up
    times = []
    for copy in copies:
        start = time.perf_counter()
        apply_penalties(copy, rows)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    expected = torch.stack([hf_penalised(s, r) for s, r in zip(scores, rows)])
    hf_ms = (time.perf_counter() - start) * 1e3
    assert_same_scores(copies[0], expected)
    print(f"\napply_penalties, 64 rows x {vocab} vocab, {history}-token histories, half with "
          f"repetition_penalty + no_repeat_ngram_size=3: median {sorted(times)[len(times) // 2] * 1e3:.2f} ms "
          f"(HF processors row by row: {hf_ms:.1f} ms)")


# banned_ngram_tokens


def hf_banned(token_ids: list[int], n: int) -> set[int]:
    """HF's n-gram table (`_get_ngrams` / `_get_generated_ngrams`) and the processor `generate` runs."""
    input_ids = torch.tensor([token_ids], dtype=torch.long).reshape(1, len(token_ids))
    table = _get_ngrams(n, input_ids, 1)[0]
    from_table = set(_get_generated_ngrams(table, input_ids[0], n, len(token_ids))) if len(token_ids) >= n else set()
    scores = NoRepeatNGramLogitsProcessor(n)(input_ids, torch.zeros(1, 16))
    from_processor = set(torch.isneginf(scores[0]).nonzero()[:, 0].tolist())
    assert from_table == from_processor
    return from_processor


@settings(max_examples=400, deadline=None)
@given(token_ids=st.lists(st.integers(0, 3), max_size=24), n=st.integers(1, 5))
def test_banned_ngram_tokens_match_hf(token_ids, n):
    banned = banned_ngram_tokens(token_ids, n)
    assert len(banned) == len(set(banned))
    assert set(banned) == hf_banned(token_ids, n)
    assert banned_ngram_tokens(tuple(token_ids), n) == banned


def test_banned_ngram_tokens_edge_cases():
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert banned_ngram_tokens([1, 2, 3, 1, 2], 0) == []
    assert banned_ngram_tokens([1, 2], 3) == []  # no complete 3-gram yet
    assert banned_ngram_tokens([7, 7], 2) == [7]  # the suffix overlaps its own earlier occurrence
    assert banned_ngram_tokens([4, 5, 4, 6, 4], 2) == [5, 6]
    assert banned_ngram_tokens([4, 5, 4], 1) == [4, 5]


# min-p and typical-p in the sampler


WARPER_GRID = [
    sampling(min_p=0.1, top_k=0),
    sampling(min_p=0.3, temperature=0.7, top_k=20),
    sampling(min_p=0.05, temperature=1.5, top_k=0, top_p=0.9),
    sampling(typical_p=0.5, top_k=0),
    sampling(typical_p=0.9, temperature=0.8, top_k=30),
    sampling(typical_p=0.2, temperature=2.0, top_k=0, top_p=0.95),
    sampling(min_p=0.1, typical_p=0.7, temperature=1.2, top_k=40, top_p=0.9),
    sampling(min_p=0.02, typical_p=0.95, top_k=0),
    sampling(temperature=0.9, top_k=10),  # neither: shares a window size with the rows that use them
]


@pytest.mark.parametrize("window", [None, 10], ids=["full-sort", "window-10"])
def test_sampled_tokens_stay_inside_what_hf_min_p_and_typical_p_keep(window):
    vocab = 97
    gen = torch.Generator().manual_seed(11)
    rows, params = [], []
    while len(rows) < 180:
        logits = torch.randn(vocab, generator=gen) * 2
        p = WARPER_GRID[len(rows) % len(WARPER_GRID)]
        if cut_offs_are_clear(logits, p):
            rows.append(logits)
            params.append(p)
    kept = [hf_kept(row, p) for row, p in zip(rows, params)]
    # Each warper cuts on its own, beyond what temperature / top-k / top-p already removed.
    without = [hf_kept(row, sampling(p.temperature, p.top_k, p.top_p)) for row, p in zip(rows, params)]
    assert sum(k < w for k, w, p in zip(kept, without, params) if p.min_p > 0 and p.typical_p == 1) > 20
    assert sum(k < w for k, w, p in zip(kept, without, params) if p.typical_p < 1 and p.min_p == 0) > 20
    logits = torch.stack(rows)
    sampler = Sampler() if window is None else Sampler(window=window)
    randoms = [Stream(i) for i in range(len(rows))]
    drawn: list[set[int]] = [set() for _ in rows]
    for _ in range(100):
        for i, token in enumerate(draw(sampler, logits, params, randoms)[0]):
            assert token in kept[i], f"row {i} ({params[i]}) drew {token}, which HF filters out"
            drawn[i].add(token)
    assert sum(len(d) > 1 for d in drawn) > len(rows) // 2


@pytest.mark.parametrize(
    "params",
    [
        sampling(min_p=0.1, top_k=0),
        sampling(min_p=0.25, temperature=0.7, top_k=6),
        sampling(typical_p=0.5, top_k=0),
        sampling(typical_p=0.8, temperature=1.5, top_k=0, top_p=0.95),
        sampling(min_p=0.05, typical_p=0.9, top_k=7),
    ],
    ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-min{p.min_p}-typ{p.typical_p}",
)
@pytest.mark.parametrize("window", [None, 3], ids=["full-sort", "window-3"])
def test_draws_follow_the_hf_min_p_and_typical_p_distribution(params, window):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.4, 0.0, -0.3, -1.0, -2.5])
    assert cut_offs_are_clear(logits, params)
    expected = torch.softmax(hf_warped(logits, params).double(), -1)
    assert 1 < int((expected > 0).sum()) < len(logits)
    n = 20_000
    sampler = Sampler() if window is None else Sampler(window=window)
    tokens, _ = draw(sampler, logits.expand(n, -1).contiguous(), [params] * n, [Stream(50_000 + i) for i in range(n)])
    counts = torch.bincount(torch.tensor(tokens), minlength=len(logits)).double()
    assert (counts[expected == 0] == 0).all(), "a token HF filters out was drawn"
    support = expected > 0
    sd = (n * expected[support] * (1 - expected[support])).sqrt()
    assert ((counts[support] - n * expected[support]).abs() <= 5 * sd + 1).all(), (counts, expected * n)


def test_rows_with_min_p_and_typical_p_off_draw_as_if_the_warpers_did_not_exist():
    # Alone, the warper code is skipped; beside rows that use it (same top-k, so the same window
    # pass), it runs over them too and must leave their distribution bit for bit as it was.
    gen = torch.Generator().manual_seed(12)
    vocab = 300
    targets = [sampling(temperature=0.9, top_k=40, top_p=0.9), sampling(temperature=1.3, top_k=0)]
    steps = [torch.randn(2, vocab, generator=gen) * 2 for _ in range(50)]
    sampler = Sampler()
    alone_randoms = [Stream(1), Stream(2)]
    alone = [draw(sampler, s, targets, alone_randoms)[0] for s in steps]
    neighbours = [sampling(min_p=0.2, top_k=40, top_p=0.9), sampling(typical_p=0.3, top_k=0)]
    mixed_randoms = [Stream(1), Stream(2), Stream(3), Stream(4)]
    mixed = [
        draw(sampler, torch.cat([s, torch.randn(2, vocab, generator=gen)]), targets + neighbours, mixed_randoms)[0][:2]
        for s in steps
    ]
    assert mixed == alone


def test_a_seeded_row_with_min_p_and_typical_p_ignores_its_neighbours():
    gen = torch.Generator().manual_seed(13)
    vocab = 400
    target = sampling(temperature=1.1, top_k=60, top_p=0.95, min_p=0.05, typical_p=0.8, seed=31)
    steps = [torch.randn(1, vocab, generator=gen) * 2 for _ in range(40)]
    alone_random = Stream(31)
    alone = [draw(Sampler(), s, [target], [alone_random])[0][0] for s in steps]
    assert len(set(alone)) > 1
    neighbours = [sampling(top_k=60, typical_p=0.2), sampling(top_k=60), sampling(top_k=0, min_p=0.5)]
    sampler = Sampler()
    randoms = [Stream(7), Stream(31), Stream(8), Stream(9)]
    params = neighbours[:1] + [target] + neighbours[1:]
    batched = []
    for s in steps:
        others = torch.randn(3, vocab, generator=gen) * 2
        batched.append(draw(sampler, torch.cat([others[:1], s, others[1:]]), params, randoms)[0][1])
    assert batched == alone
