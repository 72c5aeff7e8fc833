"""Beam search bookkeeping: parity with HF `generate(num_beams=...)` on a tiny model, then hand-worked steps.

The parity driver plays the engine: it runs the model on every running beam, applies log_softmax and
the logits processors (HF's order in beam search), gives `BeamSearch.step` each beam's top
`beams_to_keep`, and compares the hypotheses, their scores and their beam ancestry with HF's
`sequences`, `sequences_scores` and `beam_indices`.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor
from transformers.utils import logging as hf_logging

from tokenloom.engine.beam_search import BeamParams, BeamSearch, Hypothesis

VOCAB = 96
PAD = VOCAB - 1


class TinyLM:
    """A seeded random Llama whose next-token log-probs are cached per token sequence."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        # initializer_range 0.5: peaked distributions, so near-ties (where fp32 kernels may disagree) are rare.
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                             initializer_range=0.5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        self.model = LlamaForCausalLM(config).eval()
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.bos_token_id = None
        self._logprobs: dict[tuple[int, ...], torch.Tensor] = {}

    def log_softmax(self, rows: list[tuple[int, ...]]) -> torch.Tensor:
        """[len(rows), vocab] log_softmax of the last logits; rows have equal length (running beams do)."""
        missing = [r for r in rows if r not in self._logprobs]
        if missing:
            with torch.no_grad():
                logits = self.model(torch.tensor(missing), use_cache=False).logits[:, -1, :].float()  # [rows, vocab]
            for row, lp in zip(missing, torch.log_softmax(logits, dim=-1)):
                self._logprobs[row] = lp
        return torch.stack([self._logprobs[r] for r in rows])

    def greedy(self, prompt: tuple[int, ...], n: int) -> list[int]:
        ids = prompt
        for _ in range(n):
            ids += (int(self.log_softmax([ids])[0].argmax()),)
        return list(ids[len(prompt):])


@pytest.fixture(scope="module")
def lm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model is all overhead; more threads only contend
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # generate warns about flags that have no effect for some combinations
    try:
        yield TinyLM()
    finally:
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)


def run_beam_search(lm: TinyLM, prompt: tuple[int, ...], params: BeamParams, ngram: int = 0):
    """Drive BeamSearch as the engine would; return its results and each sequence's HF-style beam indices."""
    search = BeamSearch(params)
    processor = NoRepeatNGramLogitsProcessor(ngram) if ngram else None
    ancestry: dict[tuple[int, ...], tuple[int, ...]] = {(): ()}
    while not search.done:
        running = search.running
        rows = [prompt + b.token_ids for b in running]
        logprobs = lm.log_softmax(rows)
        if processor is not None:
            logprobs = processor(torch.tensor(rows), logprobs.clone())
        values, indices = logprobs.topk(params.beams_to_keep, dim=-1)
        candidates = [list(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]
        for parent, (beam, cands) in enumerate(zip(running, candidates)):
            for token, _ in cands:
                ancestry[beam.token_ids + (token,)] = ancestry[beam.token_ids] + (parent,)
        step = search.step(candidates)
        search.check_invariants()
        for j, (parent, token) in enumerate(zip(step.parents, step.tokens)):
            assert search.running[j].token_ids == running[parent].token_ids + (token,)
    return search.results(), ancestry


def hf_beam_search(lm: TinyLM, prompt, params: BeamParams, ngram: int, eos: list[int]):
    """HF's hypotheses as (generated tokens, score, beam indices), stripped of prompt and padding."""
    kwargs = {"eos_token_id": eos} if eos else {}
    out = lm.model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        num_beams=params.num_beams, do_sample=False, max_new_tokens=params.max_length - params.prompt_len,
        length_penalty=params.length_penalty, early_stopping=params.early_stopping,
        num_return_sequences=params.num_return_sequences, no_repeat_ngram_size=ngram or None,
        output_scores=True, return_dict_in_generate=True, pad_token_id=PAD, **kwargs)
    hyps = []
    for row, score, beam_indices in zip(out.sequences, out.sequences_scores, out.beam_indices):
        n = int((beam_indices != -1).sum())  # HF fills beam indices of unused positions with -1
        assert (row[len(prompt) + n:] == PAD).all()
        hyps.append((tuple(row[len(prompt):len(prompt) + n].tolist()), float(score), tuple(beam_indices[:n].tolist())))
    return hyps


# (prompt, max_new_tokens, EOS choice, no_repeat_ngram_size). EOS ids come from the greedy continuation, so
# beams do reach them: "one" is greedy token 3, "two" greedy token 2 and the next other one from token 5 on;
# "none" runs without EOS (beams_to_keep is then 2 * num_beams, as HF).
SCENARIOS = {
    "no-eos": ((5, 17, 33, 2), 6, "none", 0),
    "one-eos": ((40, 41, 7, 9, 60, 12), 9, "one", 0),
    "two-eos-ngram2": ((71, 3), 7, "two", 2),
    "one-eos-ngram3": ((5, 17, 33, 2), 8, "one", 3),
}


def eos_ids(lm: TinyLM, prompt, choice: str) -> list[int]:
    greedy = lm.greedy(prompt, 8)
    if choice == "none":
        return []
    if choice == "one":
        return [greedy[2]]
    second = next(t for t in greedy[4:] if t != greedy[1])
    return sorted({greedy[1], second})


@pytest.mark.parametrize("early_stopping", [False, True, "never"], ids=lambda e: f"es={e}")
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -0.5], ids=lambda lp: f"lp={lp}")
@pytest.mark.parametrize("num_beams", [2, 4, 5], ids=lambda b: f"beams={b}")
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_matches_hf_generate(lm, scenario, num_beams, length_penalty, early_stopping):
    prompt, max_new, choice, ngram = SCENARIOS[scenario]
    eos = eos_ids(lm, prompt, choice)
    for num_return in sorted({1, num_beams}):
        params = BeamParams(num_beams=num_beams, prompt_len=len(prompt), max_length=len(prompt) + max_new,
                            eos_token_ids=frozenset(eos), length_penalty=length_penalty,
                            early_stopping=early_stopping, num_return_sequences=num_return)
        expected = hf_beam_search(lm, prompt, params, ngram, eos)
        results, ancestry = run_beam_search(lm, prompt, params, ngram)
        assert [h.token_ids for h in results] == [tokens for tokens, _, _ in expected]
        assert [h.score for h in results] == pytest.approx([score for _, score, _ in expected], abs=1e-4)
        # HF's beam_indices[t] is the running beam the token at step t extended: our BeamStep.parents.
        assert [ancestry[h.token_ids] for h in results] == [indices for _, _, indices in expected]
        for h in results:
            assert h.finished_by_eos == (bool(eos) and h.token_ids[-1] in eos)


@pytest.mark.parametrize("scenario", [s for s, spec in SCENARIOS.items() if spec[2] != "none"])
def test_parity_scenarios_end_both_ways(lm, scenario):
    """The EOS scenarios are not vacuous: some hypotheses end on EOS, some run to max_length."""
    prompt, max_new, choice, ngram = SCENARIOS[scenario]
    eos = eos_ids(lm, prompt, choice)
    endings = set()
    for num_beams, length_penalty in itertools.product([2, 4, 5], [1.0, 2.0]):
        params = BeamParams(num_beams, len(prompt), len(prompt) + max_new, frozenset(eos), length_penalty,
                            num_return_sequences=num_beams)
        results, _ = run_beam_search(lm, prompt, params, ngram)
        endings |= {(h.finished_by_eos, len(h.token_ids) == max_new) for h in results}
    assert (True, False) in endings and (False, True) in endings


# Hand-worked searches. Log-probs are dyadic fractions so sums are exact.
EOS = 9


def params(**overrides) -> BeamParams:
    base = {"num_beams": 2, "prompt_len": 3, "max_length": 3 + 5, "eos_token_ids": frozenset({EOS})}
    return BeamParams(**{**base, **overrides})


def test_beams_to_keep_as_hf():
    assert params().beams_to_keep == 4
    assert params(eos_token_ids=frozenset()).beams_to_keep == 4
    assert params(num_beams=3, eos_token_ids=frozenset({1, 2, 3})).beams_to_keep == 12


def test_two_beam_example_by_hand():
    search = BeamSearch(params(num_return_sequences=2))
    assert search.running[0].token_ids == () and search.running[0].score == 0.0

    # One running beam at first. EOS is 3rd of the top 4: outside the top num_beams, so it does not finish.
    step = search.step([[(1, -0.5), (2, -1.0), (EOS, -1.5), (3, -2.0)]])
    assert (step.parents, step.tokens, step.done) == ((0, 0), (1, 2), False)
    assert [(b.token_ids, b.score) for b in search.running] == [((1,), -0.5), ((2,), -1.0)]
    assert search.results() == [Hypothesis((), -1e9, False)] * 2  # HF's empty slots

    # Totals: (1,EOS) -0.625, (1,4) -1.25, (2,7) -1.25, (2,8) -1.5, ... The tie keeps beam 0 first (HF's flat
    # index order). (1,EOS) is in the top num_beams, so it finishes at -0.625 / 2 tokens; the next two run.
    step = search.step([[(EOS, -0.125), (4, -0.75), (5, -3.0), (6, -4.0)],
                        [(7, -0.25), (8, -0.5), (EOS, -2.0), (4, -5.0)]])
    assert (step.parents, step.tokens, step.done) == ((0, 1), (4, 7), False)
    assert [(b.token_ids, b.score) for b in search.running] == [((1, 4), -1.25), ((2, 7), -1.25)]
    assert search.results() == [Hypothesis((1, EOS), -0.3125, True), Hypothesis((), -1e9, False)]

    # Totals: (2,7,EOS) -1.5, (1,4,3) -1.75, (2,7,8) -2.0, (1,4,EOS) -2.25. (2,7,EOS) finishes at -1.5 / 3;
    # (1,4,EOS) ranks 3rd and is dropped. Best running -1.75 / 3 cannot beat the worst finished -0.5
    # (early_stopping=False judges the current length), so the search stops.
    step = search.step([[(3, -0.5), (EOS, -1.0), (5, -2.0), (6, -3.0)],
                        [(EOS, -0.25), (8, -0.75), (5, -2.0), (6, -3.0)]])
    assert (step.parents, step.tokens, step.done) == ((0, 1), (3, 8), True)
    search.check_invariants()
    assert search.results() == [Hypothesis((1, EOS), -0.3125, True), Hypothesis((2, 7, EOS), -0.5, True)]


def run_steps(search: BeamSearch, steps: list[list[list[tuple[int, float]]]]) -> list:
    out = []
    for candidates in steps:
        out.append(search.step(candidates))
        search.check_invariants()
    return out


def test_eos_outside_top_num_beams_never_finishes():
    search = BeamSearch(params(max_length=3 + 2, num_return_sequences=2))
    run_steps(search, [
        [[(1, -0.5), (2, -1.0), (EOS, -1.5), (3, -2.0)]],  # (EOS) ranks 3rd
        # Last step, all stop. Totals: (1,4) -0.75, (1,5) -1.0, (2,EOS) -1.125, (2,6) -1.25: (2,EOS) ranks 3rd.
        [[(4, -0.25), (5, -0.5), (EOS, -4.0), (6, -5.0)], [(EOS, -0.125), (6, -0.25), (7, -4.0), (8, -5.0)]],
    ])
    assert search.done
    assert [(h.token_ids, h.score, h.finished_by_eos) for h in search.results()] == [
        ((1, 4), -0.375, False), ((1, 5), -0.5, False)]


def test_max_length_forces_done_and_finishes_top_beams():
    steps = [[[(1, -0.5), (2, -1.0), (3, -1.5), (4, -2.0)]],
             [[(5, -0.25), (6, -0.5), (7, -4.0), (8, -5.0)], [(5, -0.125), (6, -4.0), (7, -4.5), (8, -5.0)]]]
    search = BeamSearch(params(max_length=3 + 2, length_penalty=0.0, num_return_sequences=2))
    assert [s.done for s in run_steps(search, steps)] == [False, True]
    assert search.done
    # length_penalty 0: scores are plain sums. (2,5) at -1.125 ranks 3rd of the top 4, so it does not finish.
    assert [(h.token_ids, h.score, h.finished_by_eos) for h in search.results()] == [
        ((1, 5), -0.75, False), ((1, 6), -1.0, False)]
    with pytest.raises(RuntimeError, match="done"):
        search.step([[(1, -1.0)] * 4] * 2)


def test_early_stopping_true_stops_once_num_beams_hypotheses_exist():
    # EOS finishes at step 1 (-0.25) and step 2 ((1,EOS) -0.75 / 2); the best running beam stays ahead.
    steps = [[[(EOS, -0.25), (1, -0.5), (2, -1.0), (3, -2.0)]],
             [[(4, -0.125), (EOS, -0.25), (5, -1.0), (6, -2.0)], [(7, -4.0), (8, -5.0), (5, -6.0), (6, -7.0)]]]
    eager = BeamSearch(params(early_stopping=True, num_return_sequences=2))
    assert [s.done for s in run_steps(eager, steps)] == [False, True]
    assert eager.results() == [Hypothesis((EOS,), -0.25, True), Hypothesis((1, EOS), -0.375, True)]

    # early_stopping=False: the best running (1,4), -0.625 / 2 tokens, could still beat the worst finished -0.375.
    patient = BeamSearch(params(early_stopping=False, num_return_sequences=2))
    assert [s.done for s in run_steps(patient, steps)] == [False, False]
    assert patient.results() == eager.results()


def test_never_assumes_the_longest_length_with_positive_penalty():
    # length_penalty 2: (EOS) finishes at -0.25 / 1, (1,EOS) at -0.75 / 2**2; the best running (1,4) is at -1.25.
    steps = [[[(EOS, -0.25), (1, -0.5), (2, -1.0), (3, -2.0)]],
             [[(EOS, -0.25), (4, -0.75), (5, -1.0), (6, -2.0)], [(7, -4.0), (8, -5.0), (5, -6.0), (6, -7.0)]]]
    # "never" judges -1.25 / 5**2 (max_new_tokens) > -0.25: keep going. False judges -1.25 / 2**2 < -0.25: stop.
    never = BeamSearch(params(early_stopping="never", length_penalty=2.0))
    assert [s.done for s in run_steps(never, steps)] == [False, False]
    default = BeamSearch(params(early_stopping=False, length_penalty=2.0))
    assert [s.done for s in run_steps(default, steps)] == [False, True]


@pytest.mark.parametrize("early_stopping", [False, "never"])
def test_non_positive_length_penalty_judges_at_the_current_length(early_stopping):
    # length_penalty -0.5: (EOS) finishes at -3.0 * 1**0.5, (1,EOS) at -0.375 * 2**0.5; the best running (1,4)
    # is at -0.5. Both modes judge -0.5 * 2**0.5 > -3.0: keep going (at max_new_tokens, 40**0.5, they would stop).
    search = BeamSearch(params(max_length=3 + 40, length_penalty=-0.5, early_stopping=early_stopping))
    steps = [[[(1, -0.25), (EOS, -3.0), (2, -3.5), (3, -4.0)]],
             [[(EOS, -0.125), (4, -0.25), (5, -4.0), (6, -5.0)], [(7, -0.5), (8, -1.0), (5, -2.0), (6, -3.0)]]]
    assert [s.done for s in run_steps(search, steps)] == [False, False]
    assert search.results()[0].token_ids == (1, EOS)
    assert search.results()[0].score == pytest.approx(-0.375 * 2**0.5)


def test_invalid_input_is_rejected():
    with pytest.raises(ValueError, match="num_return_sequences"):
        params(num_return_sequences=3)
    with pytest.raises(ValueError, match="max_length"):
        params(max_length=3)
    with pytest.raises(ValueError, match="early_stopping"):
        params(early_stopping="always")
    search = BeamSearch(params())
    with pytest.raises(ValueError, match="1 running beams"):
        search.step([[(1, -1.0)] * 4, [(2, -1.0)] * 4])
    with pytest.raises(ValueError, match="beams_to_keep=4"):
        search.step([[(1, -1.0), (2, -2.0)]])
