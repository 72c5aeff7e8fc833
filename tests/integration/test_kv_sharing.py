"""Beams and samples share their prompt's KV: visible in the KV store's own accounting."""

from __future__ import annotations

import pytest
from test_engine import Harness

from hf_reference import hf_beam_search


def _step_until_forked(h: Harness, width: int, limit: int = 100) -> None:
    for _ in range(limit):
        h.step()
        groups = h.runtime.scheduler.running
        if groups and len(groups[0].seqs) == width:
            return
    raise AssertionError("the request never forked")


def test_beam_4_over_a_200_token_prompt_holds_the_prompt_once_and_frees_all_on_cancel(tiny_dirs):
    h = Harness(tiny_dirs["llama"])
    blocks = h.runtime.blocks
    rid = h.submit(list(range(1000, 1200)), max_new_tokens=20, num_beams=4)
    _step_until_forked(h, 4)
    h.step()  # each beam has written its own next token
    beams = h.runtime.scheduler.running[0].seqs
    full_prompt_blocks = 200 // blocks.block_size
    shared = beams[0].block_table[:full_prompt_blocks]
    assert all(b.block_table[:full_prompt_blocks] == shared for b in beams)
    assert all(blocks.refcount(block) == 4 for block in shared)
    # The prompt once, plus the partial tail blocks (one per distinct parent beam, at most 4):
    # not four copies of the prompt.
    tails = {b.block_table[full_prompt_blocks] for b in beams}
    assert blocks.num_used == full_prompt_blocks + len(tails) <= full_prompt_blocks + 4
    assert blocks.num_used < 2 * blocks.blocks_for(200)
    h.engine.abort(rid)
    h.step()
    assert blocks.num_used == 0
    assert h.outputs[rid].finish_reason.value == "cancelled"


def test_n_samples_share_the_prompt_and_finish_with_every_block_free(tiny_dirs):
    h = Harness(tiny_dirs["qwen2"])
    blocks = h.runtime.blocks
    rid = h.submit(list(range(300, 400)), max_new_tokens=12, num_return_sequences=3, do_sample=True, seed=3)
    _step_until_forked(h, 3)
    samples = h.runtime.scheduler.running[0].seqs
    full = 100 // blocks.block_size
    assert all(blocks.refcount(b) == 3 for b in samples[0].block_table[:full])
    while h.runtime.scheduler.has_work():
        h.step()
    assert blocks.num_used == 0
    assert len(h.outputs[rid].hypotheses) == 3


def test_beams_preempted_by_a_full_store_restart_and_still_match_hf(tiny_dirs, hf_models):
    model, _ = hf_models(tiny_dirs["gpt2"])
    h = Harness(tiny_dirs["gpt2"], kv_tokens=320, budget=128, max_seqs=16)
    prompts = [list(range(20 * i + 7, 20 * i + 47)) for i in range(5)]
    rids = [h.submit(p, max_new_tokens=24, num_beams=3, num_return_sequences=2) for p in prompts]
    h.run_until_idle()
    assert h.runtime.scheduler.num_preemptions > 0, "the store was meant to be too small"
    assert h.runtime.blocks.num_used == 0
    eos = {model.generation_config.eos_token_id}
    for rid, prompt in zip(rids, prompts):
        expected, scores = hf_beam_search(model, prompt, eos, num_beams=3, num_return_sequences=2, max_new_tokens=24)
        out = h.outputs[rid]
        assert [list(x.token_ids) for x in out.hypotheses] == expected
        assert [x.score for x in out.hypotheses] == pytest.approx(scores, abs=1e-4)


def test_a_beam_4_request_among_16_sampled_streams_takes_4_rows_per_step(tiny_dirs):
    h = Harness(tiny_dirs["llama"], budget=128, max_seqs=32)
    for i in range(16):
        h.submit(list(range(10 * i, 10 * i + 12)), max_new_tokens=30, do_sample=True, seed=i)
    beam = h.submit(list(range(2000, 2030)), max_new_tokens=12, num_beams=4)
    rows_per_step = []
    scheduler = h.runtime.scheduler
    original = scheduler.schedule

    def counting_schedule():
        out = original()
        rows_per_step.append(sum(1 for c in out.chunks if c.seq.request_id == beam))
        return out

    scheduler.schedule = counting_schedule
    while h.outputs[beam].finish_reason is None:
        h.step()
    active = [n for n in rows_per_step if n]
    assert active[0] == 1  # the prompt, prefilled once
    assert len(active) > 1 and all(n == 4 for n in active[1:])


def test_scoring_rows_preempted_by_a_full_store_still_give_the_formula(tiny_dirs, hf_models):
    from hf_reference import sequence_logprob
    from tokenloom.front.preprocessor import UserInput
    from tokenloom.request import GenerationOutput

    model, _ = hf_models(tiny_dirs["llama"])
    h = Harness(tiny_dirs["llama"], kv_tokens=320, budget=8, max_seqs=4)
    decoders = [h.submit(list(range(40 * i, 40 * i + 20)), max_new_tokens=60) for i in range(2)]
    prompt, continuation = list(range(500, 540)), list(range(600, 800))
    request = h.runtime.preprocessor.score(UserInput(input_ids=tuple(prompt)), "", tuple(continuation))
    h.outputs[request.request_id] = GenerationOutput(request.request_id)
    h.engine.submit(request)
    h.run_until_idle()
    assert h.runtime.scheduler.num_preemptions > 0, "the scoring row was meant to be preempted"
    assert all(h.outputs[d].generated_tokens == 60 for d in decoders)
    per_token, _ = sequence_logprob(model, prompt + continuation, len(prompt))
    assert h.outputs[request.request_id].logprobs == pytest.approx(per_token, abs=1e-4)
