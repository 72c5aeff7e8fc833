"""Prefix caching on real (tiny) models: the same requests, through an engine with the cache and one
without, give the same tokens, for every model kind, with prefixes that end before, at and after
block boundaries, whole prompts seen before, beams and n samples sharing cached blocks, seeded
samples, aborts mid-prefill, and a KV store small enough to evict cached blocks and preempt."""

from __future__ import annotations

import random

import pytest

from test_engine import Harness
from tiny_models import KINDS

BLOCK = 16
# Where a request's prompt leaves the shared prefix: around every block boundary, and all of it.
CUTS = (1, 15, 16, 17, 31, 32, 33, 47, 48, 49, 64, 80, 100)
MODES = (
    dict(),
    dict(),
    dict(do_sample=True, seed=3, temperature=0.9),
    dict(do_sample=True, seed=5, num_return_sequences=2, top_k=20),
    dict(num_beams=2, num_return_sequences=2),
)


def workload(seed: int, vocab: int):
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(100)]
    prompts = []
    for i in range(36):
        if prompts and rng.random() < 0.2:
            prompts.append(list(rng.choice(prompts)))  # a whole prompt seen before
            continue
        cut = rng.choice(CUTS)
        prompts.append(shared[:cut] + [rng.randrange(vocab) for _ in range(rng.choice((0, 1, 5, 17, 40)))] or [1])
    plan = {}  # step -> [(prompt, params, abort_after_steps or None)]
    for i, prompt in enumerate(prompts):
        params = dict(max_new_tokens=rng.randint(3, 60), ignore_eos=True, **rng.choice(MODES))
        abort = 1 if len(prompt) > 70 and rng.random() < 0.25 else None  # mid-prefill: the budget is 64 tokens
        plan.setdefault(rng.randrange(0, 12), []).append((prompt, params, abort))
    return plan


def run(h: Harness, plan) -> dict[int, tuple]:
    ids, aborts, results = {}, {}, {}
    n = 0
    for step in range(2000):
        for prompt, params, abort in plan.get(step, []):
            rid = h.submit(prompt, **params)
            ids[rid] = n
            n += 1
            if abort is not None:
                aborts[step + abort] = aborts.get(step + abort, []) + [rid]
        for rid in aborts.pop(step, []):
            h.engine.abort(rid)
        h.step()
        if step > max(plan) and not aborts and not h.runtime.scheduler.has_work():
            break
    for rid, index in ids.items():
        out = h.outputs[rid]
        results[index] = (tuple(out.token_ids), tuple(tuple(x.token_ids) for x in out.hypotheses), out.finish_reason)
    assert h.runtime.blocks.num_used == 0, "every block is free (or idle in the cache) at the end"
    return results


@pytest.mark.parametrize("kind", KINDS)
def test_the_same_requests_give_the_same_tokens_with_the_cache_on_and_off(kind, tiny_dirs):
    # 26 blocks of 16 tokens for up to 12 rows of up to ~200 tokens: eviction and preemption happen.
    harnesses = {on: Harness(tiny_dirs[kind], kv_tokens=26 * BLOCK, budget=64, max_seqs=12, prefix_caching=on)
                 for on in (True, False)}
    plan = workload(seed=11, vocab=harnesses[True].runtime.served.vocab_size)
    on, off = (run(harnesses[flag], plan) for flag in (True, False))
    assert on == off
    sched = harnesses[True].runtime.scheduler
    assert sched.prefix_hit_tokens >= 20 * BLOCK, "the workload shares prefixes: the cache must be used"
    assert harnesses[False].runtime.scheduler.prefix_hit_tokens == 0
    assert harnesses[True].runtime.blocks.cache.evictions > 0, "the store is small: cached blocks were evicted"
    assert sched.num_preemptions > 0, "and running requests preempted"
    cancelled = sum(1 for tokens, _, reason in on.values() if reason is not None and reason.value == "cancelled")
    assert cancelled >= 1, "some requests were aborted mid-prefill"
