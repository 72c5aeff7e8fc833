"""Prefix caching over real gRPC: a prompt the server has seen is not computed twice, and what the
client gets is what a server without the cache answers.

Two servers on the same tiny model: one with the prefix cache (the default), one with
--no-prefix-caching. Each test sends the same requests, in the same order, to both.
"""

from __future__ import annotations

import math

import pytest

from conftest import own_server
from metrics_scrape import Scrape
from tokenloom_client import Client

BLOCK = 16  # the servers' --block-size (the default)
SYSTEM = list(range(400, 400 + 7 * BLOCK + 5))  # a "system prompt" of 117 tokens: 7 full blocks and 5 more


@pytest.fixture(scope="module")
def servers(tiny_dirs, tmp_path_factory):
    with own_server(tiny_dirs["llama"], "prefix-on", tmp_path_factory) as on, \
            own_server(tiny_dirs["llama"], "prefix-off", tmp_path_factory, "--no-prefix-caching") as off:
        yield on, off


def generate(address: str, prompt: list[int], **params):
    with Client(address) as client:
        return client.generate(input_ids=prompt, max_new_tokens=12, **params)


def test_a_conversation_takes_its_earlier_turns_from_the_cache_and_the_tokens_are_unchanged(servers):
    on, off = servers
    before = Scrape(on.metrics_url)
    prompts, cached = [], []

    def turn(prompt: list[int]):
        got, want = generate(on.address, prompt, top_n=3), generate(off.address, prompt, top_n=3)
        assert got.token_ids == want.token_ids, "the cache changed the output"
        for a, b in zip(got.top_tokens, want.top_tokens):
            assert [t.token_id for t in a] == [t.token_id for t in b]
            assert all(math.isclose(x.logprob, y.logprob, abs_tol=1e-4) for x, y in zip(a, b))
        assert want.usage.cached_tokens == 0
        prompts.append(prompt)
        cached.append(got.usage.cached_tokens)
        return got

    first = turn(SYSTEM + [7, 8, 9])  # 120 tokens; with its 12 new ones, KV for 131
    turn(SYSTEM + [7, 8, 9] + first.token_ids + [10, 11] + list(range(600, 640)))  # the chat resent
    turn(SYSTEM + [50])  # another user, the same system prompt
    # Nothing before turn one (this module's server has seen nothing); turn two finds 8 full blocks,
    # the last one holding turn one's first generated tokens; the third the system prompt's 7.
    assert cached == [0, 8 * BLOCK, 7 * BLOCK]
    after = Scrape(on.metrics_url)
    hits = after.get("prefix_cache_hits_total") - before.get("prefix_cache_hits_total")
    queries = after.get("prefix_cache_queries_total") - before.get("prefix_cache_queries_total")
    assert hits == sum(cached)
    assert queries == sum(len(p) - 1 for p in prompts)
    assert Scrape(off.metrics_url).get("prefix_cache_hits_total") == 0


def test_scoring_answers_to_one_question_computes_the_question_once(servers):
    on, off = servers
    question = list(range(1000, 1000 + 20 * BLOCK + 3))  # 323 tokens
    answers = [[5, 6, 7], [5, 6, 8, 9], [11], [12, 13, 14, 15, 16]]
    with Client(on.address) as c_on, Client(off.address) as c_off:
        results = [(c_on.score(prompt_ids=question, continuation_ids=a),
                    c_off.score(prompt_ids=question, continuation_ids=a)) for a in answers]
    for i, (got, want) in enumerate(results):
        assert len(got.logprobs) == len(want.logprobs)
        assert all(math.isclose(x, y, abs_tol=1e-4) for x, y in zip(got.logprobs, want.logprobs))
        expected = 0 if i == 0 else 20 * BLOCK  # every full block before the first scored position
        assert got.usage.cached_tokens == expected and want.usage.cached_tokens == 0
        assert got.usage.prompt_tokens == len(question) + len(answers[i])


def test_sampled_and_beam_requests_give_the_same_output_from_a_cached_prefix(servers):
    on, off = servers
    prompt = SYSTEM + list(range(700, 720))
    for params in (dict(do_sample=True, seed=11, temperature=0.8), dict(num_beams=3, num_return_sequences=2)):
        for _ in range(2):  # the second time, from the cache
            got, want = generate(on.address, prompt, **params), generate(off.address, prompt, **params)
            assert got.token_ids == want.token_ids
            assert [h.token_ids for h in got.hypotheses] == [h.token_ids for h in want.hypotheses]
        assert got.usage.cached_tokens >= 7 * BLOCK
