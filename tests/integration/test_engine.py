"""The engine without gRPC, stepped by hand: joins at chosen steps, chunked prefill, aborts."""

from __future__ import annotations

import random

import pytest

from hf_reference import hf_generate
from tiny_models import KINDS
from tokenloom.executor.models import ModelSpec
from tokenloom.request import GenerationOutput
from tokenloom.engine.scheduler import SchedulerConfig
from tokenloom.runtime import CacheConfig, load_runtime
from tokenloom.front.validation import Limits, RawParams
from tokenloom.front.preprocessor import UserInput


class Harness:
    def __init__(self, path, *, kv_tokens=4096, budget=64, max_seqs=16, prefix_caching=True, **spec):
        """`path` None: the embedded default model; `spec`: more ModelSpec fields (e.g. quantization)."""
        self.runtime = load_runtime(
            ModelSpec(path=None if path is None else str(path), **spec),
            CacheConfig(kv_cache_tokens=kv_tokens, block_size=16, prefix_caching=prefix_caching),
            SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), Limits(),
        )
        self.outputs: dict[str, GenerationOutput] = {}
        self.engine = self.runtime.engine(self._publish)

    def _publish(self, events):
        for e in events:
            self.outputs[e.request_id].add(e)

    def submit(self, ids, **params):
        request = self.runtime.preprocessor(UserInput(input_ids=tuple(ids)), RawParams(**params))
        self.outputs[request.request_id] = GenerationOutput(request.request_id)
        self.engine.submit(request)
        return request.request_id

    def score(self, prompt_ids, continuation_ids):
        request = self.runtime.preprocessor.score(UserInput(input_ids=tuple(prompt_ids)), "", tuple(continuation_ids))
        self.outputs[request.request_id] = GenerationOutput(request.request_id)
        self.engine.submit(request)
        return request.request_id

    def step(self):
        self.engine.run_once()
        self.runtime.scheduler.check_invariants()

    def run_until_idle(self, limit: int = 1000) -> None:
        """Step (checking invariants) until nothing is queued or running."""
        for _ in range(limit):
            self.step()
            if not self.runtime.scheduler.has_work():
                return
        raise AssertionError(f"still busy after {limit} steps")


@pytest.mark.parametrize("kind", KINDS)
def test_requests_joining_at_chosen_steps_match_hf(kind, tiny_dirs, hf_models):
    """Long prompts (chunked over several steps with a 64-token budget) join decoding rows mid-flight."""
    model, tok = hf_models(tiny_dirs[kind])
    h = Harness(tiny_dirs[kind])
    rng = random.Random(1)
    plan = {0: [(5, 20)], 1: [(140, 12)], 3: [(2, 30), (70, 8)], 6: [(33, 25)], 9: [(200, 10), (1, 15)], 15: [(90, 5)]}
    prompts = {}
    for step in range(200):
        for length, new in plan.get(step, []):
            ids = [rng.randrange(len(tok)) for _ in range(length)]
            prompts[h.submit(ids, max_new_tokens=new)] = (ids, new)
        h.step()
        if step > max(plan) and not h.runtime.scheduler.has_work():
            break
    assert h.runtime.blocks.num_used == 0, "finished requests must free every block"
    for rid, (ids, new) in prompts.items():
        out = h.outputs[rid]
        assert out.finish_reason is not None
        assert out.token_ids == hf_generate(model, ids, do_sample=False, max_new_tokens=new)


def test_abort_frees_the_rows_blocks_within_one_step(tiny_dirs):
    h = Harness(tiny_dirs["llama"])
    keep = h.submit(list(range(10, 60)), max_new_tokens=40)
    drop = h.submit(list(range(100, 300)), max_new_tokens=40)
    for _ in range(6):
        h.step()
    used_both = h.runtime.blocks.num_used
    h.engine.abort(drop)
    h.step()
    assert h.outputs[drop].finish_reason.value == "cancelled"
    keep_seq = h.runtime.scheduler.running[0].seqs[0]
    assert h.runtime.blocks.num_used == len(keep_seq.block_table) < used_both
    while h.runtime.scheduler.has_work():
        h.step()
    assert h.outputs[keep].generated_tokens == 40
    assert h.runtime.blocks.num_used == 0


def test_a_full_kv_store_preempts_and_recomputes_without_changing_tokens(tiny_dirs, hf_models):
    """8 requests that cannot all fit: some are preempted and recomputed; all finish with HF's tokens."""
    model, tok = hf_models(tiny_dirs["qwen2"])
    h = Harness(tiny_dirs["qwen2"], kv_tokens=320, budget=128, max_seqs=8)
    prompts = {}
    for i in range(8):
        ids = list(range(20 * i + 5, 20 * i + 45))
        prompts[h.submit(ids, max_new_tokens=30)] = ids
    h.run_until_idle()
    assert h.runtime.scheduler.num_preemptions > 0, "the store was meant to be too small for all 8"
    assert h.runtime.blocks.num_used == 0
    for rid, ids in prompts.items():
        assert h.outputs[rid].token_ids == hf_generate(model, ids, do_sample=False, max_new_tokens=30)
