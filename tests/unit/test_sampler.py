"""Logits -> tokens: greedy, HF's temperature/top-k/top-p semantics, seeded draws that ignore the batch,
n draws from one row, top-N alternatives, beam candidates and scoring log-probabilities.

HF's own logits warpers and processors are the reference for which tokens may be drawn and with what
probability; log-probabilities reported to the user are always the model's own (log_softmax of the
logits), whatever temperature or penalty shaped the draw.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from sampler_oracle import Stream, cut_offs_are_clear, draw, greedy, hf_kept, hf_warped, sampling, spec
from tokenloom.executor.sampler import Sampler
from tokenloom.request import SamplingParams

VOCAB = 97


# Greedy


def test_greedy_rows_take_the_argmax_with_its_log_probability():
    torch.manual_seed(0)
    logits = torch.randn(16, VOCAB) * 3
    tokens, logprobs = draw(Sampler(), logits, [greedy()] * 16, [None] * 16)
    assert tokens == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).gather(1, logits.argmax(-1)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(logprobs), expected)


def test_greedy_ignores_temperature_top_k_and_top_p():
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB)
    params = [SamplingParams(max_new_tokens=1, temperature=0.0),
              SamplingParams(max_new_tokens=1, temperature=5.0, top_k=3, top_p=0.1),
              SamplingParams(max_new_tokens=1, top_k=0)]
    tokens, _ = draw(Sampler(), logits, params, [None, Stream(1), None])
    assert tokens == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
def test_sampling_with_top_k_one_is_greedy(temperature):
    torch.manual_seed(2)
    logits = torch.randn(32, VOCAB)
    params = [sampling(temperature=temperature, top_k=1)] * 32
    for step in range(5):
        tokens, _ = draw(Sampler(), logits, params, [Stream(1000 * step + i) for i in range(32)])
        assert tokens == logits.argmax(-1).tolist()


def test_sampling_with_a_tiny_top_p_is_greedy():
    torch.manual_seed(3)
    logits = torch.randn(32, VOCAB)
    tokens, _ = draw(Sampler(), logits, [sampling(top_p=1e-6, top_k=0)] * 32, [Stream(i) for i in range(32)])
    assert tokens == logits.argmax(-1).tolist()


def test_sampled_logprobs_are_under_the_model_distribution():
    torch.manual_seed(4)
    logits = torch.randn(8, VOCAB)
    tokens, logprobs = draw(Sampler(), logits, [sampling(temperature=0.5, top_k=10, top_p=0.8)] * 8,
                            [Stream(i) for i in range(8)])
    expected = torch.log_softmax(logits, -1)[torch.arange(8), torch.tensor(tokens)]
    torch.testing.assert_close(torch.tensor(logprobs), expected)


def test_a_penalised_draw_reports_the_raw_model_log_probability():
    # The penalty pushes the argmax down so another token wins; its log-prob is still the model's.
    torch.manual_seed(12)
    logits = torch.randn(2, VOCAB) * 2
    top = logits.argmax(-1).tolist()
    penalised = greedy(repetition_penalty=100.0)
    results = Sampler()(logits, [spec(penalised, history=top, prompt_len=2)] * 2)
    raw = torch.log_softmax(logits, -1)
    for i, result in enumerate(results):
        [token] = result.token_ids
        assert token != top[i], "the penalty applies to the draw"
        assert result.logprobs == pytest.approx([raw[i, token].item()], abs=1e-6)


# Only tokens HF would keep


PARAM_GRID = [
    sampling(temperature=1.0, top_k=5),
    sampling(temperature=0.7, top_k=50, top_p=0.9),
    sampling(temperature=1.3, top_k=0, top_p=0.5),
    sampling(temperature=2.0, top_k=0, top_p=0.95),
    sampling(temperature=0.3, top_k=20, top_p=0.3),
    sampling(temperature=1.0, top_k=3, top_p=0.99),
    sampling(temperature=5.0, top_k=VOCAB + 10),
]


@pytest.mark.parametrize("window", [None, 10], ids=["full-sort", "window-10"])
def test_sampled_tokens_stay_inside_hf_top_k_and_top_p_sets(window):
    gen = torch.Generator().manual_seed(5)
    rows, params = [], []
    while len(rows) < 140:
        logits = torch.randn(VOCAB, generator=gen) * 2
        p = PARAM_GRID[len(rows) % len(PARAM_GRID)]
        if cut_offs_are_clear(logits, p):
            rows.append(logits)
            params.append(p)
    logits = torch.stack(rows)
    kept = [hf_kept(row, p) for row, p in zip(rows, params)]
    assert all(len(k) >= 1 for k in kept)
    assert any(len(k) < VOCAB for k in kept)
    sampler = Sampler() if window is None else Sampler(window=window)
    randoms = [Stream(i) for i in range(len(rows))]
    drawn = [set() for _ in rows]
    for _ in range(60):
        tokens, _ = draw(sampler, logits, params, randoms)
        for i, token in enumerate(tokens):
            assert token in kept[i], f"row {i} ({params[i]}) drew {token}, which HF filters out"
            drawn[i].add(token)
    # The filter is not so tight that sampling collapses to greedy.
    assert sum(len(d) > 1 for d in drawn) > len(rows) // 2


@pytest.mark.parametrize(
    "params",
    [
        sampling(temperature=1.0, top_k=0),
        sampling(temperature=0.6, top_k=0),
        sampling(temperature=1.5, top_k=4),
        sampling(temperature=1.0, top_k=0, top_p=0.8),
        sampling(temperature=0.8, top_k=5, top_p=0.7),
        sampling(temperature=1.0, top_k=1000),
    ],
    ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}",
)
@pytest.mark.parametrize("window", [None, 3], ids=["full-sort", "window-3"])
def test_draws_follow_the_hf_distribution(params, window):
    # window 3 of 8 tokens: rows without top-k are drawn from their 3 most likely tokens, or from
    # the full sort when the draw goes past them or a top-p cut lies past them.
    logits = torch.tensor([2.0, 1.5, 1.0, 0.4, 0.0, -0.3, -1.0, -2.5])
    expected = torch.softmax(hf_warped(logits, params).double(), -1)
    n = 20_000
    sampler = Sampler() if window is None else Sampler(window=window)
    tokens, _ = draw(sampler, logits.expand(n, -1).contiguous(), [params] * n, [Stream(10_000 + i) for i in range(n)])
    counts = torch.bincount(torch.tensor(tokens), minlength=len(logits)).double()
    assert (counts[expected == 0] == 0).all(), "a token HF filters out was drawn"
    support = expected > 0
    exp_counts = expected[support] * n
    chi2 = float(((counts[support] - exp_counts) ** 2 / exp_counts).sum())
    df = int(support.sum()) - 1
    # Mean df, standard deviation sqrt(2 df): eight of them is far out in the tail, yet a wrong
    # temperature or cut-off moves chi2 into the hundreds with 20k draws.
    assert chi2 < df + 8 * math.sqrt(2 * max(df, 1)), (counts.tolist(), (expected * n).tolist())
    # And each token on its own is within 5 standard errors.
    sd = (n * expected[support] * (1 - expected[support])).sqrt()
    assert ((counts[support] - exp_counts).abs() <= 5 * sd + 1).all()


def test_one_seeded_stream_follows_the_distribution_over_steps():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    params = sampling(temperature=1.0, top_k=0)
    expected = torch.softmax(logits[0].double(), -1)
    rng = Stream(123)
    sampler = Sampler()
    n = 4000
    counts = torch.zeros(4, dtype=torch.float64)
    for _ in range(n):
        counts[draw(sampler, logits, [params], [rng])[0][0]] += 1
    sd = (n * expected * (1 - expected)).sqrt()
    assert ((counts - n * expected).abs() <= 5 * sd).all(), counts.tolist()


# Seeds and batch invariance


def _run_steps(step_logits: list[torch.Tensor], params: list[SamplingParams], seeds: list[int | None]):
    """(token ids, log-probs) per step, each row drawing once per step from its own stream."""
    return _run_steps_with(Sampler(), step_logits, params, seeds)


def test_a_seeded_row_draws_the_same_tokens_alone_or_in_any_batch():
    gen = torch.Generator().manual_seed(6)
    vocab = 500
    target = sampling(temperature=0.9, top_k=40, top_p=0.92, seed=1234)
    target_logits = [torch.randn(vocab, generator=gen) * 2 for _ in range(40)]

    alone = _run_steps([row[None] for row in target_logits], [target], [1234])
    alone_tokens = [tokens[0] for tokens, _ in alone]
    assert len(set(alone_tokens)) > 1

    companions = [
        greedy(),
        sampling(temperature=1.7, top_k=0, top_p=1.0),  # disables top-k: a full-vocabulary sort
        sampling(temperature=0.2, top_k=400, top_p=0.5),
        greedy(),
        sampling(temperature=1.0, top_k=1),
        sampling(temperature=3.0, top_k=5, top_p=0.99),
    ]
    for position in (0, 3, len(companions)):
        params = companions[:position] + [target] + companions[position:]
        seeds = [77 + i for i in range(len(companions))]
        seeds = seeds[:position] + [1234] + seeds[position:]
        steps = []
        for row in target_logits:
            others = torch.randn(len(companions), vocab, generator=gen) * 2
            steps.append(torch.cat([others[:position], row[None], others[position:]]))
        batched = _run_steps(steps, params, seeds)
        assert [tokens[position] for tokens, _ in batched] == alone_tokens, f"target at row {position}"
        torch.testing.assert_close(
            torch.tensor([logprobs[position] for _, logprobs in batched]),
            torch.tensor([logprobs[0] for _, logprobs in alone]),
        )


@pytest.mark.parametrize("companion_top_k", [0, 200])
def test_a_seeded_row_with_tied_logits_draws_the_same_tokens_whatever_top_k_its_neighbours_use(companion_top_k):
    # What a bfloat16 model produces: logits on a coarse grid, cast to float32 by the runner.
    gen = torch.Generator().manual_seed(10)
    vocab = 4096
    target = sampling(temperature=1.0, top_k=50, top_p=1.0, seed=2024)
    neighbour = sampling(temperature=1.0, top_k=companion_top_k, top_p=1.0)
    steps = [(torch.randn(1, vocab, generator=gen) * 3 + 10).to(torch.bfloat16).float() for _ in range(40)]
    assert any(len(set(row[0].topk(50).values.tolist())) < 50 for row in steps), "the logits have ties"
    alone = [tokens[0] for tokens, _ in _run_steps(steps, [target], [2024])]
    batched = _run_steps([torch.cat([row, torch.randn(1, vocab, generator=gen)]) for row in steps],
                         [target, neighbour], [2024, 7])
    assert [tokens[0] for tokens, _ in batched] == alone


def test_a_seeded_row_without_top_k_draws_the_same_tokens_alone_or_beside_any_rows():
    # A small window over bfloat16-tied logits: the window path, its fallback to the full sort, and
    # neighbours that take either path or another top-k must not move the target's draws.
    gen = torch.Generator().manual_seed(14)
    vocab = 4096
    sampler = Sampler(window=64)
    target = sampling(temperature=0.8, top_k=0, seed=2025)
    steps = [(torch.randn(1, vocab, generator=gen) * 3 + 10).to(torch.bfloat16).float() for _ in range(60)]
    alone = [tokens[0] for tokens, _ in _run_steps_with(sampler, steps, [target], [2025])]
    assert len(set(alone)) > 5
    neighbours = [sampling(temperature=1.0, top_k=0), sampling(temperature=0.3, top_k=0, top_p=0.5),
                  sampling(temperature=1.0, top_k=50), greedy(), sampling(temperature=1.2, top_k=0, min_p=0.1)]
    batched = _run_steps_with(sampler, [torch.cat([torch.randn(2, vocab, generator=gen), row,
                                                   torch.randn(3, vocab, generator=gen)]) for row in steps],
                              neighbours[:2] + [target] + neighbours[2:], [1, 2, 2025, 3, None, 4])
    assert [tokens[2] for tokens, _ in batched] == alone


def _run_steps_with(sampler: Sampler, step_logits: list[torch.Tensor], params: list[SamplingParams],
                    seeds: list[int | None]):
    """As _run_steps, with the given sampler."""
    randoms = [Stream(s) if p.do_sample else None for p, s in zip(params, seeds)]
    return [draw(sampler, logits, params, randoms) for logits in step_logits]


class _CountingSampler(Sampler):
    """Counts the rows drawn from a full sort of the vocabulary."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sorted_rows = 0

    def _sample_window(self, logits, k, params, uniforms):
        if k == logits.shape[-1]:
            self.sorted_rows += len(params)
        return Sampler._sample_window(logits, k, params, uniforms)


@pytest.mark.parametrize("params", [sampling(temperature=1.0, top_k=0), sampling(temperature=1.0, top_k=0, top_p=0.9),
                                    sampling(temperature=0.7, top_k=0, min_p=0.02)],
                         ids=["T1", "top-p-0.9", "min-p-0.02"])
def test_a_row_without_top_k_over_a_real_vocabulary_draws_what_the_full_sort_draws_and_seldom_sorts(params):
    # A language model's shape: probabilities falling as a power of their rank (about 5 % of the
    # mass past the 256 likeliest at temperature 1, as the default model has), over 49,152 tokens.
    gen = torch.Generator().manual_seed(15)
    vocab, rows = 49_152, 64
    rank = torch.arange(1, vocab + 1, dtype=torch.float32)
    logits = torch.stack([(-1.5 * rank.log() + 0.05 * torch.randn(vocab, generator=gen))[torch.randperm(vocab, generator=gen)]
                          for _ in range(rows)])
    windowed, full = _CountingSampler(), _CountingSampler(window=vocab)
    streams = [[Stream(900 + i) for i in range(rows)] for _ in range(2)]
    for _ in range(3):
        fast = draw(windowed, logits, [params] * rows, streams[0])[0]
        assert fast == draw(full, logits, [params] * rows, streams[1])[0]
    assert full.sorted_rows == 3 * rows
    assert windowed.sorted_rows < 3 * rows * 0.2, f"{windowed.sorted_rows} of {3 * rows} draws sorted the vocabulary"


def test_a_seeded_row_is_unaffected_by_greedy_rows_around_it():
    # Greedy rows draw no random numbers, so adding them must not shift the seeded stream.
    gen = torch.Generator().manual_seed(7)
    target = sampling(temperature=1.0, top_k=0, seed=99)
    logits = [torch.randn(1, 50, generator=gen) for _ in range(30)]
    alone = [tokens[0] for tokens, _ in _run_steps(logits, [target], [99])]
    padded = [torch.cat([torch.randn(2, 50, generator=gen), row]) for row in logits]
    mixed = [tokens[2] for tokens, _ in _run_steps(padded, [greedy(), greedy(), target], [None, None, 99])]
    assert mixed == alone


def test_the_same_seed_repeats_and_a_different_seed_differs():
    gen = torch.Generator().manual_seed(8)
    logits = [torch.randn(1, 200, generator=gen) for _ in range(30)]
    p = sampling(temperature=1.5, top_k=0)
    first = [tokens[0] for tokens, _ in _run_steps(logits, [p], [5])]
    again = [tokens[0] for tokens, _ in _run_steps(logits, [p], [5])]
    other = [tokens[0] for tokens, _ in _run_steps(logits, [p], [6])]
    assert first == again
    assert first != other


def test_rows_with_different_parameters_in_one_call_each_use_their_own():
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.0, -1.0]).expand(4, -1).contiguous()
    params = [
        sampling(temperature=1.0, top_k=1),  # always token 0
        sampling(temperature=1.0, top_k=2),  # only tokens 0 and 1
        sampling(temperature=100.0, top_k=0),  # nearly uniform over all six
        greedy(),
    ]
    randoms = [Stream(i) for i in range(3)] + [None]
    seen: list[set[int]] = [set() for _ in params]
    sampler = Sampler()
    for _ in range(400):
        tokens, _ = draw(sampler, logits, params, randoms)
        for i, token in enumerate(tokens):
            seen[i].add(token)
    assert seen[0] == {0}
    assert seen[1] == {0, 1}
    assert seen[2] == set(range(6))
    assert seen[3] == {0}


# n draws from one row (num_return_sequences)


def test_each_of_n_draws_from_one_row_equals_that_random_drawing_alone():
    # The prompt's row draws its n samples' first tokens at once; each must be what its own stream
    # would draw in a row of its own, wherever the row sits in the batch, step after step.
    gen = torch.Generator().manual_seed(13)
    vocab = 300
    p = sampling(temperature=1.2, top_k=60, top_p=0.95)
    seeds = [31, 32, 33]
    target_logits = [torch.randn(vocab, generator=gen) * 2 for _ in range(25)]
    alone = [[tokens[0] for tokens, _ in _run_steps([row[None] for row in target_logits], [p], [s])] for s in seeds]
    assert len({tuple(a) for a in alone}) == 3, "the three streams differ"

    companions = [greedy(), sampling(temperature=0.7, top_k=0, seed=5), sampling(temperature=1.0, top_k=3, seed=6)]
    for position in (0, 2, len(companions)):
        sampler = Sampler()
        streams = [Stream(s) for s in seeds]
        companion_randoms = [None, Stream(5), Stream(6)]
        draws: list[list[int]] = [[] for _ in seeds]
        for row in target_logits:
            others = torch.randn(len(companions), vocab, generator=gen) * 2
            logits = torch.cat([others[:position], row[None], others[position:]])
            rows = [spec(c, [r]) for c, r in zip(companions, companion_randoms)]
            rows.insert(position, spec(p, streams))
            results = sampler(logits, rows)
            target = results[position]
            assert len(target.token_ids) == len(target.logprobs) == 3
            raw = torch.log_softmax(row, -1)
            assert target.logprobs == pytest.approx([raw[t].item() for t in target.token_ids], abs=1e-6)
            assert all(len(r.token_ids) == 1 for i, r in enumerate(results) if i != position)
            for d, token in zip(draws, target.token_ids):
                d.append(token)
        assert draws == alone, f"n-sample row at position {position}"


# Top-N alternatives


def test_top_n_lists_the_model_probabilities_best_first():
    torch.manual_seed(11)
    logits = torch.randn(7, VOCAB) * 3
    rows = [
        spec(greedy()),  # top_n 0: none
        spec(greedy(top_n=1)),
        spec(sampling(temperature=0.3, top_k=3, top_n=5), [Stream(1)]),
        spec(greedy(top_n=20)),
        # Penalties shape the draw, not the list.
        spec(greedy(top_n=5, repetition_penalty=5.0), history=logits[4].topk(3).indices.tolist()),
        spec(greedy(top_n=4), streams=(), beam_width=2),
        spec(sampling(top_n=3), [Stream(2), Stream(3), Stream(4)]),
    ]
    results = Sampler()(logits, rows)
    probs = torch.softmax(logits, -1)
    assert results[0].top_tokens == []
    for row, result, p in zip(rows[1:], results[1:], probs[1:]):
        n = row.params.top_n
        expected = p.topk(n)
        assert [t for t, _ in result.top_tokens] == expected.indices.tolist()
        got = torch.tensor([lp for _, lp in result.top_tokens]).exp()
        torch.testing.assert_close(got, expected.values, atol=1e-6, rtol=0)
        logprobs = [lp for _, lp in result.top_tokens]
        assert logprobs == sorted(logprobs, reverse=True), "best first"
    assert results[4].token_ids[0] not in logits[4].topk(3).indices.tolist(), "the penalty did shape the draw"


# Beam candidates


def test_beam_candidates_are_the_top_log_probabilities_of_each_row():
    torch.manual_seed(14)
    logits = torch.randn(4, VOCAB) * 2
    ks = [2, 4, 0, 7]  # row 2 is a plain greedy row between beam rows
    rows = [spec(greedy(), streams=() if k else (None,), beam_width=k) for k in ks]
    results = Sampler()(logits, rows)
    log_probs = torch.log_softmax(logits, -1)
    for i, (k, result) in enumerate(zip(ks, results)):
        if not k:
            assert result.candidates == [] and result.token_ids == [logits[i].argmax().item()]
            continue
        assert result.token_ids == [] and result.logprobs == [], "a beam row draws nothing itself"
        expected = log_probs[i].topk(k)
        assert [t for t, _ in result.candidates] == expected.indices.tolist()
        torch.testing.assert_close(torch.tensor([s for _, s in result.candidates]), expected.values,
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("penalty", [1.6, 0.6])
def test_beam_candidates_reflect_the_repetition_penalty_as_hf_beam_search_applies_it(penalty):
    # HF's beam search runs its processors on log_softmax scores, so the penalty multiplies (never
    # divides) them. The history holds each row's top tokens (1.6 pushes them down) or middling ones
    # (0.6 pulls them up), so the candidates differ from the neutral ones. Row 1 is a neutral beam row.
    torch.manual_seed(15)
    logits = torch.randn(4, VOCAB) * 2
    k = 6
    order = logits.argsort(-1, descending=True)
    histories = {i: tuple((order[i, :4] if penalty > 1 else order[i, 10:14]).tolist()) + (0,) for i in (0, 2, 3)}
    rows = [spec(greedy(repetition_penalty=penalty), streams=(), history=histories[i], prompt_len=2, beam_width=k)
            if i in histories else spec(greedy(), streams=(), beam_width=k) for i in range(4)]
    results = Sampler()(logits, rows)
    log_probs = torch.log_softmax(logits, -1)
    for i, history in histories.items():
        input_ids = torch.tensor([list(history)])
        expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, log_probs[i][None].clone())[0].topk(k)
        assert [t for t, _ in results[i].candidates] == expected.indices.tolist()
        torch.testing.assert_close(torch.tensor([s for _, s in results[i].candidates]), expected.values,
                                   atol=1e-6, rtol=0)
        assert expected.indices.tolist() != log_probs[i].topk(k).indices.tolist(), "the penalty matters here"
    neutral = log_probs[1].topk(k)
    assert [t for t, _ in results[1].candidates] == neutral.indices.tolist(), "a neighbour's penalty leaked"
    torch.testing.assert_close(torch.tensor([s for _, s in results[1].candidates]), neutral.values,
                               atol=1e-6, rtol=0)


# Scoring


def test_label_logprobs_are_the_model_log_probabilities_of_the_labels():
    torch.manual_seed(16)
    logits = torch.randn(6, VOCAB) * 4
    labels = [0, VOCAB - 1, 5, 5, 42, int(logits[5].argmin())]
    got = Sampler.label_logprobs(logits, labels)
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(labels)[:, None])[:, 0]
    assert len(got) == len(labels)
    torch.testing.assert_close(torch.tensor(got), expected, atol=1e-6, rtol=0)


def test_a_uniform_that_rounds_to_one_still_picks_a_token_with_probability():
    """A 53-bit uniform within 2**-25 of 1 is 1.0 in float32: the pick must stay on the last token with
    any mass, not a filtered one after it (a constraint-banned token would break its constraint)."""
    from tokenloom.engine.batch import SampleSpec

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    params = sampling(top_k=0, top_p=0.8)  # keeps tokens 0 and 1 only (p = 0.61, 0.22, 0.14, 0.03)
    result = Sampler()(logits, [SampleSpec(params, (), 0, frozenset(), (1.0 - 2.0**-40,))])[0]
    assert result.token_ids == [1]


def test_a_constrained_row_draws_only_allowed_tokens_even_when_penalties_ban_them_all():
    import numpy as np
    from concurrent.futures import Future

    from tokenloom.engine.batch import SampleSpec

    def mask(allowed):
        words = np.zeros(1, dtype=np.int32)
        for t in allowed:
            words[0] |= np.int32(1 << t)
        f = Future()
        f.set_result(words)
        return f

    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    greedy_params = SamplingParams(max_new_tokens=1)
    blocked = SamplingParams(max_new_tokens=1, no_repeat_ngram_size=1)  # bans every token already seen
    specs = [SampleSpec(greedy_params, (0, 1), 0, frozenset(), (None,), 0, mask([2, 3])),
             SampleSpec(blocked, (3,), 0, frozenset(), (None,), 0, mask([3]))]
    results = Sampler()(logits, specs)
    assert results[0].token_ids == [2]  # the likeliest allowed token
    assert results[1].token_ids == [3]  # its only allowed token, banned by the penalty: the mask alone decides
    assert results[0].logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[2].item())  # raw log-prob


def test_a_bitmask_becomes_a_bias_of_zero_on_allowed_tokens_and_minus_inf_elsewhere():
    """The grammar engine's bit t of int32 word t // 32 (bit 31 makes a word negative), over a
    vocabulary that ends inside a word."""
    import numpy as np

    from tokenloom.executor.sampler import _mask_bias

    vocab, allowed = 70, [{0, 31, 32, 33, 63, 64, 69}, {5, 40}]
    masks = []
    for tokens in allowed:
        words = np.zeros(3, dtype=np.uint32)
        for t in tokens:
            words[t // 32] |= np.uint32(1 << (t % 32))
        masks.append(words.view(np.int32))
    bias = _mask_bias(masks, vocab)
    assert bias.shape == (2, vocab) and bias.dtype == torch.float32
    for row, tokens in zip(bias, allowed):
        assert {t for t in range(vocab) if row[t] == 0} == tokens
        assert all(row[t] == float("-inf") for t in range(vocab) if t not in tokens)
