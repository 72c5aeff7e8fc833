"""The test-only fault plan: parsed from `--inject-fault KIND=SEED`, aimed by seed alone."""

import pytest

from tokenloom.fault import FaultPlan, InjectedFault


def test_parse_and_aim_by_seed():
    plan = FaultPlan.parse(["sample-error=7", "engine-death=-3"])
    assert plan.active and plan.sample_error_seed == 7 and plan.engine_death_seed == -3
    plan.on_sampling(7, 1, "r")  # not yet: two tokens first
    plan.on_sampling(8, 5, "r")
    plan.on_sampling(None, 5, "r")
    with pytest.raises(InjectedFault, match="sampling of request r"):
        plan.on_sampling(7, 2, "r")
    plan.on_admit(7, "r")
    with pytest.raises(InjectedFault, match="engine death"):
        plan.on_admit(-3, "r")


def test_off_by_default_and_bad_specs_name_the_flag():
    assert not FaultPlan.parse(None).active
    FaultPlan().on_sampling(0, 100, "r")
    for bad in ("sample-error", "crash=1", "sample-error=x"):
        with pytest.raises(ValueError, match="--inject-fault"):
            FaultPlan.parse([bad])
