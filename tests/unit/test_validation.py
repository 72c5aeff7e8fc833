"""Parameter validation: each bad value is refused naming the field to change, good ones get HF's defaults."""

from __future__ import annotations

import json

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenloom.front.validation import (
    InvalidArgument,
    Limits,
    RawParams,
    check_exactly_one_input,
    check_prompt_ids,
    resolve_params,
)

LIMITS = Limits(context_length=100, max_new_tokens=50, default_max_new_tokens=20,
                max_stop_strings=4, max_stop_string_length=8)
PROMPT = 10


def rejected(raw: RawParams, prompt_len: int = PROMPT, limits: Limits = LIMITS) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        resolve_params(raw, prompt_len, limits)
    return info.value


def test_invalid_argument_is_a_value_error_whose_message_starts_with_the_field():
    err = rejected(RawParams(top_k=-1))
    assert isinstance(err, ValueError)
    assert err.field == "top_k"
    assert str(err).startswith("top_k: ")


# HF defaults


def test_unset_parameters_take_hf_generate_defaults():
    params = resolve_params(RawParams(), PROMPT, LIMITS)
    assert params.do_sample is False
    assert params.temperature == 1.0
    assert params.top_k == 50
    assert params.top_p == 1.0
    assert params.seed is None
    assert params.stop_strings == ()


def test_set_parameters_are_kept():
    raw = RawParams(max_new_tokens=7, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, seed=42,
                    stop_strings=("###",))
    params = resolve_params(raw, PROMPT, LIMITS)
    assert (params.max_new_tokens, params.do_sample, params.temperature, params.top_k, params.top_p,
            params.seed, params.stop_strings) == (7, True, 0.7, 5, 0.9, 42, ("###",))


# temperature


@pytest.mark.parametrize("temperature", [-1.0, -1e-9, 0.0])
def test_non_positive_temperature_is_rejected_when_sampling(temperature):
    err = rejected(RawParams(do_sample=True, temperature=temperature))
    assert err.field == "temperature"
    assert "> 0" in str(err)
    assert str(temperature) in str(err), "the message echoes the value sent"


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("do_sample", [True, False])
def test_non_finite_temperature_is_rejected(temperature, do_sample):
    err = rejected(RawParams(do_sample=do_sample, temperature=temperature))
    assert err.field == "temperature"
    assert "finite" in str(err)


def test_temperature_zero_is_allowed_for_greedy_decoding():
    assert resolve_params(RawParams(do_sample=False, temperature=0.0), PROMPT, LIMITS).temperature == 0.0


def test_negative_temperature_is_rejected_even_for_greedy_decoding():
    assert rejected(RawParams(do_sample=False, temperature=-0.5)).field == "temperature"


def test_very_large_temperature_is_rejected():
    err = rejected(RawParams(do_sample=True, temperature=1e6))
    assert err.field == "temperature" and "100" in str(err)


def test_small_positive_temperature_is_allowed_when_sampling():
    assert resolve_params(RawParams(do_sample=True, temperature=0.01), PROMPT, LIMITS).temperature == 0.01


# top_p / top_k


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.0001, 2.0, math.nan, math.inf, -math.inf])
def test_top_p_outside_zero_one_is_rejected(top_p):
    err = rejected(RawParams(do_sample=True, top_p=top_p))
    assert err.field == "top_p"
    assert "(0, 1]" in str(err)


@pytest.mark.parametrize("top_p", [1e-6, 0.5, 1.0])
def test_top_p_inside_zero_one_is_allowed(top_p):
    assert resolve_params(RawParams(do_sample=True, top_p=top_p), PROMPT, LIMITS).top_p == top_p


@pytest.mark.parametrize("top_k", [-1, -100])
def test_negative_top_k_is_rejected(top_k):
    err = rejected(RawParams(do_sample=True, top_k=top_k))
    assert err.field == "top_k"
    assert "0 disables" in str(err), "the message tells the user how to turn top-k off"


def test_top_k_zero_disables_it_and_is_allowed():
    assert resolve_params(RawParams(do_sample=True, top_k=0), PROMPT, LIMITS).top_k == 0


# max_new_tokens / max_length


@pytest.mark.parametrize("n", [0, -1])
def test_max_new_tokens_below_one_is_rejected(n):
    err = rejected(RawParams(max_new_tokens=n))
    assert err.field == "max_new_tokens" and ">= 1" in str(err)


def test_max_new_tokens_above_the_server_limit_is_rejected_naming_the_limit():
    err = rejected(RawParams(max_new_tokens=LIMITS.max_new_tokens + 1))
    assert err.field == "max_new_tokens"
    assert str(LIMITS.max_new_tokens) in str(err)


def test_max_new_tokens_at_the_server_limit_is_allowed():
    assert resolve_params(RawParams(max_new_tokens=50), PROMPT, LIMITS).max_new_tokens == 50


def test_max_new_tokens_past_the_context_is_rejected_saying_how_many_fit():
    err = rejected(RawParams(max_new_tokens=11), prompt_len=90)
    assert err.field == "max_new_tokens"
    assert "at most 10" in str(err) and "100" in str(err)
    assert resolve_params(RawParams(max_new_tokens=10), 90, LIMITS).max_new_tokens == 10


def test_max_length_counts_the_prompt():
    assert resolve_params(RawParams(max_length=30), 10, LIMITS).max_new_tokens == 20
    assert resolve_params(RawParams(max_length=11), 10, LIMITS).max_new_tokens == 1


@pytest.mark.parametrize("max_length", [10, 5, 0, -1])
def test_max_length_that_leaves_no_room_after_the_prompt_is_rejected(max_length):
    err = rejected(RawParams(max_length=max_length), prompt_len=10)
    assert err.field == "max_length"
    assert "max_new_tokens" in str(err), "the message points to the alternative"


def test_max_length_past_the_context_is_rejected():
    err = rejected(RawParams(max_length=101))
    assert err.field == "max_length" and "100" in str(err)


def test_max_length_past_the_server_limit_is_rejected_not_clamped():
    err = rejected(RawParams(max_length=10 + LIMITS.max_new_tokens + 1))
    assert err.field == "max_length" and str(LIMITS.max_new_tokens) in str(err)
    assert resolve_params(RawParams(max_length=10 + LIMITS.max_new_tokens), 10, LIMITS).max_new_tokens == LIMITS.max_new_tokens


def test_max_new_tokens_wins_over_max_length_as_in_hf_generate():
    assert resolve_params(RawParams(max_new_tokens=5, max_length=40), 10, LIMITS).max_new_tokens == 5
    # A max_length that would be refused on its own is ignored, as HF ignores it.
    assert resolve_params(RawParams(max_new_tokens=5, max_length=3), 10, LIMITS).max_new_tokens == 5
    # And the max_new_tokens rules still apply.
    assert rejected(RawParams(max_new_tokens=0, max_length=40)).field == "max_new_tokens"


def test_without_a_length_the_server_default_applies():
    assert resolve_params(RawParams(), 10, LIMITS).max_new_tokens == LIMITS.default_max_new_tokens


def test_without_a_length_the_default_is_clamped_to_the_context_left():
    assert resolve_params(RawParams(), 95, LIMITS).max_new_tokens == 5
    assert resolve_params(RawParams(), 99, LIMITS).max_new_tokens == 1


@settings(max_examples=300, deadline=None)
@given(
    prompt_len=st.integers(1, 120),
    max_new_tokens=st.one_of(st.none(), st.integers(-5, 120)),
    max_length=st.one_of(st.none(), st.integers(-5, 130)),
)
def test_accepted_lengths_always_fit_the_context_and_the_server_limit(prompt_len, max_new_tokens, max_length):
    try:
        check_prompt_ids([1] * prompt_len, vocab_size=10, limits=LIMITS)
        params = resolve_params(RawParams(max_new_tokens=max_new_tokens, max_length=max_length), prompt_len, LIMITS)
    except InvalidArgument as err:
        assert err.field in {"prompt", "max_new_tokens", "max_length"}
        return
    assert 1 <= params.max_new_tokens <= LIMITS.max_new_tokens
    assert prompt_len + params.max_new_tokens <= LIMITS.context_length
    if max_new_tokens is not None:
        assert params.max_new_tokens == max_new_tokens


# stop strings


def test_too_many_stop_strings_are_rejected_naming_the_limit():
    err = rejected(RawParams(stop_strings=("a", "b", "c", "d", "e")))
    assert err.field == "stop_strings"
    assert "5" in str(err) and "4" in str(err)


def test_stop_strings_up_to_the_limit_are_kept():
    stops = ("a", "b", "c", "12345678")
    assert resolve_params(RawParams(stop_strings=stops), PROMPT, LIMITS).stop_strings == stops


def test_an_empty_stop_string_is_rejected():
    err = rejected(RawParams(stop_strings=("ok", "")))
    assert err.field == "stop_strings" and "empty" in str(err)


def test_a_too_long_stop_string_is_rejected():
    err = rejected(RawParams(stop_strings=("123456789",)))
    assert err.field == "stop_strings"
    assert "9" in str(err) and "8" in str(err)


# inputs


@pytest.mark.parametrize("given_inputs", [(True, False, False), (False, True, False), (False, False, True)])
def test_exactly_one_input_is_accepted(given_inputs):
    check_exactly_one_input(*given_inputs)


def test_no_input_is_rejected():
    with pytest.raises(InvalidArgument) as info:
        check_exactly_one_input(False, False, False)
    assert info.value.field == "prompt"
    assert "prompt" in str(info.value) and "messages" in str(info.value) and "input_ids" in str(info.value)


@pytest.mark.parametrize(
    "given_inputs", [(True, True, False), (True, False, True), (False, True, True), (True, True, True)]
)
def test_several_inputs_are_rejected(given_inputs):
    with pytest.raises(InvalidArgument, match="only one"):
        check_exactly_one_input(*given_inputs)


def test_an_empty_prompt_is_rejected():
    with pytest.raises(InvalidArgument) as info:
        check_prompt_ids([], vocab_size=10, limits=LIMITS)
    assert info.value.field == "prompt" and "zero tokens" in str(info.value)


@pytest.mark.parametrize("bad", [-1, 10, 10**9])
def test_a_token_id_outside_the_vocabulary_is_rejected_naming_it(bad):
    with pytest.raises(InvalidArgument) as info:
        check_prompt_ids([0, 5, bad, 3], vocab_size=10, limits=LIMITS)
    assert info.value.field == "input_ids"
    assert str(bad) in str(info.value) and "10" in str(info.value)


def test_ids_at_the_vocabulary_edges_are_accepted():
    check_prompt_ids([0, 9], vocab_size=10, limits=LIMITS)


def test_a_prompt_filling_the_context_is_rejected():
    with pytest.raises(InvalidArgument) as info:
        check_prompt_ids([1] * 100, vocab_size=10, limits=LIMITS)
    assert info.value.field == "prompt"
    assert "100" in str(info.value)
    with pytest.raises(InvalidArgument):
        check_prompt_ids([1] * 150, vocab_size=10, limits=LIMITS)


def test_a_prompt_leaving_one_token_of_room_is_accepted():
    check_prompt_ids([1] * 99, vocab_size=10, limits=LIMITS)


# Limits: built from flags, resolved once against the model

def test_limits_resolve_the_context_to_the_model_capped_by_max_model_len():
    assert Limits().resolved(2048, max_num_seqs=64).context_length == 2048
    assert Limits(max_model_len=512).resolved(2048, max_num_seqs=64).context_length == 512
    assert Limits(max_model_len=4096).resolved(2048, max_num_seqs=64).context_length == 2048  # never above the model
    assert Limits(max_model_len=0).resolved(2048, max_num_seqs=64).context_length == 2048  # 0: no cap, as before


def test_limits_resolve_beams_and_samples_to_at_most_one_step_of_rows():
    flags = Limits(max_new_tokens=77, max_num_beams=8, max_num_return_sequences=6)
    narrow = flags.resolved(1024, max_num_seqs=4)
    assert (narrow.max_num_beams, narrow.max_num_return_sequences) == (4, 4)
    wide = flags.resolved(1024, max_num_seqs=64)
    assert (wide.max_num_beams, wide.max_num_return_sequences) == (8, 6)
    assert wide.max_new_tokens == 77 and flags.context_length is None  # the flags' copy is left as it was


# The contract (proto/tokenloom/v1/generation.proto) and these dataclasses name the same things

def _fields(cls) -> dict:
    import dataclasses

    return {f.name: f for f in dataclasses.fields(cls)}


def _optional_in_proto() -> list[str]:
    """The scalar parameters with explicit presence (proto3 `optional`), read from the contract itself
    (the one message field, `constraint`, has a test of its own)."""
    from tokenloom_client.pb.tokenloom.v1 import generation_pb2 as pb

    return [f.name for f in pb.GenerationParameters.DESCRIPTOR.fields if f.has_presence and f.message_type is None]


def test_every_optional_parameter_of_the_proto_is_a_raw_param_that_defaults_to_unset():
    from tokenloom_client.pb.tokenloom.v1 import generation_pb2 as pb

    optional = _optional_in_proto()
    assert "temperature" in optional and "do_sample" not in optional
    raw = _fields(RawParams)
    missing = [name for name in optional if name not in raw or raw[name].default is not None]
    assert not missing, f"RawParams lacks these optional proto fields (or does not default them to None): {missing}"
    assert set(raw) == {f.name for f in pb.GenerationParameters.DESCRIPTOR.fields}


def test_the_servicer_passes_each_optional_parameter_on_as_set_or_unset():
    from tokenloom.front.servicer import _raw_params
    from tokenloom_client.pb.tokenloom.v1 import generation_pb2 as pb

    optional = _optional_in_proto()
    unset = _raw_params(pb.GenerationParameters())
    assert {name: getattr(unset, name) for name in optional} == dict.fromkeys(optional)
    zeros = _raw_params(pb.GenerationParameters(**dict.fromkeys(optional, 0)))  # zero is set, not unset
    assert {name: getattr(zeros, name) for name in optional} == dict.fromkeys(optional, 0)


def test_model_info_reports_every_request_ceiling_under_its_own_name():
    from tokenloom.front.servicer import _REQUEST_LIMITS, _SERVER_LIMITS
    from tokenloom_client.pb.tokenloom.v1 import generation_pb2 as pb

    reported = [f.name for f in pb.Limits.DESCRIPTOR.fields]
    assert set(_SERVER_LIMITS) <= set(reported)
    unknown = [name for name in _REQUEST_LIMITS if name not in _fields(Limits)]
    assert not unknown, f"pb.Limits fields that validation.Limits lacks: {unknown}"
    assert sorted((*_REQUEST_LIMITS, *_SERVER_LIMITS)) == sorted(reported)


def test_the_servicer_maps_each_constraint_kind():
    from tokenloom.front.servicer import _raw_params
    from tokenloom.request import Constraint
    from tokenloom_client.pb.tokenloom.v1 import generation_pb2 as pb

    def raw(**kind):
        return _raw_params(pb.GenerationParameters(constraint=pb.Constraint(**kind))).constraint

    assert _raw_params(pb.GenerationParameters()).constraint is None
    assert raw(json_schema='{"type": "object"}') == Constraint("json_schema", '{"type": "object"}')
    assert raw(json_object=True) == Constraint("json_object")
    assert raw(regex="a+") == Constraint("regex", "a+")
    assert raw(grammar="start: A") == Constraint("grammar", "start: A")
    assert raw(choice=pb.Choice(options=["a", "b"])) == Constraint("choice", '["a", "b"]')
    for bad in ({}, {"json_object": False}):
        with pytest.raises(InvalidArgument, match="constraint"):
            raw(**bad)


@pytest.mark.parametrize("options", [[], ["a", ""]])
def test_a_choice_needs_options_none_empty(options):
    from tokenloom.request import Constraint

    with pytest.raises(InvalidArgument, match="choice needs at least one option"):
        resolve_params(RawParams(constraint=Constraint("choice", json.dumps(options))), 4, LIMITS)
