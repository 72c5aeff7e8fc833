"""The test-only fault plan: parsed from `--inject-fault KIND=SEED`, aimed by seed alone, and wrapped
around the engine's choice of a request's mode (no hook in the engine's step)."""

import itertools

import pytest

from tokenloom.engine import generation
from tokenloom.engine.generation import GenerationContext, TokenText
from tokenloom.engine.scheduler import ScheduledChunk
from tokenloom.engine.sequence import SequenceGroup
from tokenloom.fault import FaultPlan, InjectedEngineDeath, InjectedFault
from tokenloom.request import GenerationRequest, SamplingParams

CONTEXT = GenerationContext(TokenText(tokenizer=None), frozenset(), itertools.count())


def group(seed: int | None) -> SequenceGroup:
    params = SamplingParams(max_new_tokens=8, do_sample=seed is not None, seed=seed)
    return SequenceGroup.from_request(0, GenerationRequest("r", (1, 2, 3), params))


def decode_chunk(g: SequenceGroup, generated: int) -> ScheduledChunk:
    seq = g.seqs[0]
    seq.token_ids.extend(range(10, 10 + generated))
    seq.num_computed = len(seq.token_ids) - 1
    return ScheduledChunk(seq, seq.num_computed, 1)


def test_parse_and_aim_by_seed():
    plan = FaultPlan.parse(["sample-error=7", "engine-death=13"])
    assert plan.active and plan.sample_error_seed == 7 and plan.engine_death_seed == 13
    start = plan.wrap(generation.start)
    for seed in (8, None):
        g = group(seed)
        start(g, CONTEXT).row(decode_chunk(g, 5))  # other requests are untouched
    g = group(7)
    victim = start(g, CONTEXT)
    victim.row(decode_chunk(g, 1))  # not yet: two tokens first
    with pytest.raises(InjectedFault, match="sampling of request r"):
        victim.row(decode_chunk(g, 1))
    with pytest.raises(InjectedEngineDeath, match="engine death"):
        start(group(13), CONTEXT)
    assert not issubclass(InjectedEngineDeath, Exception), "per-request handling must not catch it"


def test_off_by_default_and_bad_specs_name_the_flag():
    assert not FaultPlan.parse(None).active
    assert FaultPlan().wrap(generation.start) is generation.start
    for bad in ("sample-error", "crash=1", "sample-error=x", "engine-death=-3"):
        with pytest.raises(ValueError, match="--inject-fault"):
            FaultPlan.parse([bad])
