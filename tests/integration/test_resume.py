"""Resumable generation on the engine: prompt + the first k tokens resumed equals the uninterrupted output."""

from __future__ import annotations

import random

import pytest

from test_engine import Harness
from tokenloom.front.preprocessor import UserInput
from tokenloom.front.validation import InvalidArgument, RawParams
from tokenloom.request import FinishReason, GenerationOutput

PROMPT = list(range(300, 340))


class Run:
    """One request's events, per sample index: tokens, logprobs, top-N, text deltas, finish reason."""

    def __init__(self):
        self.tokens, self.logprobs, self.top, self.deltas = {}, {}, {}, {}
        self.finish, self.final = {}, None

    def add(self, event):
        if not event.provisional:
            i = event.index
            self.tokens.setdefault(i, []).extend(event.token_ids)
            self.logprobs.setdefault(i, []).extend(event.logprobs)
            self.top.setdefault(i, []).extend(event.top_tokens)
            self.deltas.setdefault(i, []).append((len(event.token_ids), event.text))
            if event.finish_reason is not None:
                self.finish[i] = event.finish_reason
        if event.final:
            self.final = event

    def text_after(self, i: int, k: int) -> str:
        """What a client had read of sample i once it had k tokens (the deltas of the events up to them)."""
        n, text = 0, ""
        for count, delta in self.deltas.get(i, []):
            if n + count > k:
                break
            n, text = n + count, text + delta
        assert n == k
        return text


def _run(h: Harness, resume=(), **params) -> Run:
    request = h.runtime.preprocessor(UserInput(input_ids=tuple(PROMPT), resume=tuple(map(tuple, resume))),
                                     RawParams(**params))
    run = Run()
    h.outputs[request.request_id] = GenerationOutput(request.request_id)
    original = h.engine.publish

    def publish(events):
        for e in events:
            if e.request_id == request.request_id:
                run.add(e)

    h.engine.publish = publish
    try:
        h.engine.submit(request)
        h.run_until_idle()
        for _ in range(3):  # a request that ends at admission publishes from the inbox
            h.step()
    finally:
        h.engine.publish = original
    assert run.final is not None
    return run


@pytest.fixture(scope="module")
def harness(tiny_dirs):
    return Harness(tiny_dirs["llama"], kv_tokens=4096, budget=64)


SETTINGS = {
    "greedy": dict(max_new_tokens=24, top_n=3, no_repeat_ngram_size=2, repetition_penalty=1.3),
    # top_k: not all of a random model's near-equal probabilities (a recomputed row may round a draw over one
    # of their boundaries: docs/api.md#seeds).
    "sampled": dict(max_new_tokens=24, do_sample=True, temperature=1.3, top_k=8, seed=11, num_return_sequences=2,
                    top_n=2, no_repeat_ngram_size=3),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_resuming_at_random_cuts_continues_exactly(harness, name):
    params = SETTINGS[name]
    full = _run(harness, **params)
    rng = random.Random(5)
    for _ in range(4):
        cuts = {i: rng.randrange(0, len(t) + 1) for i, t in full.tokens.items()}
        resume = [full.tokens[i][:cuts[i]] for i in sorted(full.tokens)]
        again = _run(harness, resume=resume, **params)
        for i, tokens in full.tokens.items():
            k = cuts[i]
            assert full.tokens[i][:k] + again.tokens.get(i, []) == tokens, (i, k)
            assert again.logprobs.get(i, []) == pytest.approx(full.logprobs[i][k:], abs=1e-5)
            assert [[t.token_id for t in top] for top in again.top.get(i, [])] == \
                [[t.token_id for t in top] for top in full.top[i][k:]]
            # The client's text so far + the resumed stream's text = the uninterrupted text.
            text = full.text_after(i, k) + "".join(d for _, d in again.deltas.get(i, []))
            assert text == "".join(d for _, d in full.deltas[i])
            assert again.finish.get(i, full.finish[i]) == full.finish[i]
        assert [h.token_ids for h in again.final.hypotheses] == [h.token_ids for h in full.final.hypotheses]
        assert [h.text for h in again.final.hypotheses] == [h.text for h in full.final.hypotheses]
        assert again.final.generated_tokens == full.final.generated_tokens
    assert harness.runtime.blocks.num_used == 0


def test_a_stop_string_that_spans_the_cut_still_stops(harness):
    params = dict(max_new_tokens=30, no_repeat_ngram_size=2)
    free = _run(harness, **params)
    deltas = [d for _, d in free.deltas[0]]
    j = next(j for j in range(3, len(deltas) - 1) if deltas[j] and deltas[j + 1])
    stop = deltas[j][-1] + deltas[j + 1][0]  # its first character in token j, its last in token j + 1
    assert stop not in "".join(deltas[:j + 1])[:-1]
    stopped = _run(harness, stop_strings=(stop,), **params)
    k = len(stopped.tokens[0])
    assert stopped.finish[0] is FinishReason.STOP_STRING and k == j + 2
    resumed = _run(harness, resume=[stopped.tokens[0][:k - 1]], stop_strings=(stop,), **params)
    assert resumed.tokens[0] == stopped.tokens[0][k - 1:] and resumed.finish[0] is FinishReason.STOP_STRING


def test_samples_already_ended_are_finished_at_once(harness):
    params = SETTINGS["sampled"]
    full = _run(harness, **params)
    # Sample 0 whole (it ended by length), sample 1 cut: only sample 1 goes on.
    again = _run(harness, resume=[full.tokens[0], full.tokens[1][:5]], **params)
    assert 0 not in again.tokens and again.tokens[1] == full.tokens[1][5:]
    assert [h.token_ids for h in again.final.hypotheses] == [h.token_ids for h in full.final.hypotheses]
    # Every sample whole: the request ends at admission, with its hypotheses.
    done = _run(harness, resume=[full.tokens[0], full.tokens[1]], **params)
    assert not any(done.tokens.values()) and [h.text for h in done.final.hypotheses] == [h.text for h in full.final.hypotheses]
    assert done.final.finish_reason is FinishReason.LENGTH and harness.runtime.blocks.num_used == 0


@pytest.mark.parametrize("resume, params, words", [
    ([[1, 2]], dict(num_beams=2, max_new_tokens=4), "beam search is not resumable"),
    ([[1], [2]], dict(max_new_tokens=4), "2 sequences given"),
    ([[1] * 5], dict(max_new_tokens=4), "more than max_new_tokens"),
    ([[10**7]], dict(max_new_tokens=4), "outside the vocabulary"),
])
def test_bad_resumes_name_the_field(harness, resume, params, words):
    with pytest.raises(InvalidArgument, match=words) as err:
        harness.runtime.preprocessor(UserInput(input_ids=tuple(PROMPT), resume=tuple(map(tuple, resume))),
                                     RawParams(**params))
    assert err.value.field == "resume"
