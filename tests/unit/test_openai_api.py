"""OpenAI bodies -> our parameters, and our events -> OpenAI JSON: pure, no server."""

from __future__ import annotations

import pytest

from tokenloom.front import openai_request as oa
from tokenloom.front import openai_response as reply
from tokenloom.front.validation import InvalidArgument
from tokenloom.request import FinishReason, Hypothesis, TokenEvent, TopToken

MODEL = "m"


def test_openai_semantics_sample_by_default_and_temperature_zero_is_greedy():
    sampled = oa.parse_completion({"prompt": "hi"}, MODEL).raw
    assert sampled.do_sample and sampled.temperature is None and sampled.top_k == 0  # OpenAI has no top_k
    assert sampled.max_new_tokens == oa.COMPLETIONS_DEFAULT_MAX_TOKENS
    greedy = oa.parse_completion({"prompt": "hi", "temperature": 0, "max_tokens": 7, "top_k": 5}, MODEL).raw
    assert not greedy.do_sample and greedy.max_new_tokens == 7 and greedy.top_k == 5
    beams = oa.parse_chat({"messages": [{"role": "user", "content": "hi"}], "num_beams": 4, "n": 2}, MODEL)
    assert not beams.raw.do_sample and beams.raw.num_beams == 4 and beams.raw.num_return_sequences == 2
    assert beams.options.beams and beams.raw.max_new_tokens is None  # chat: the server's default


def test_fields_map_onto_ours():
    p = oa.parse_chat({"model": MODEL, "messages": [{"role": "system", "content": [{"type": "text", "text": "a"},
                                                                                    {"type": "text", "text": "b"}]}],
                       "max_completion_tokens": 9, "stop": "x", "seed": 3, "logprobs": True, "top_logprobs": 4,
                       "min_tokens": 2, "repetition_penalty": 1.2, "stream": True,
                       "stream_options": {"include_usage": True}, "user": "ignored"}, MODEL)
    assert p.user.messages == (("system", "ab"),)
    assert (p.raw.max_new_tokens, p.raw.stop_strings, p.raw.seed, p.raw.top_n, p.raw.min_new_tokens,
            p.raw.repetition_penalty) == (9, ("x",), 3, 4, 2, 1.2)
    assert p.options.stream and p.options.include_usage and p.options.logprobs and p.options.stop == ("x",)
    assert oa.parse_completion({"prompt": [1, 2, 3]}, MODEL).user.input_ids == (1, 2, 3)
    assert oa.parse_completion({"prompt": ["one"]}, MODEL).user.prompt == "one"


@pytest.mark.parametrize("body, field", [
    ({"prompt": "a", "bogus": 1}, "bogus"),
    ({"prompt": "a", "max_tokens": "9"}, "max_tokens"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens"),
    ({"prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "a", "logit_bias": {"1": 2}}, "logit_bias"),
    ({"prompt": "a", "echo": True}, "echo"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "a", "n": 3, "temperature": 0}, "n"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "a", "best_of": 3}, "best_of"),
    ({"prompt": "a", "stop": [1]}, "stop"),
    ({"prompt": "a", "num_beams": 2, "logprobs": 1}, "logprobs"),
    ([1, 2], "body"),
])
def test_bad_bodies_name_the_field(body, field):
    with pytest.raises(InvalidArgument) as err:
        oa.parse_completion(body, MODEL)
    assert err.value.field == field


def test_chat_needs_messages_and_logprobs_for_top_logprobs():
    with pytest.raises(InvalidArgument, match="top_logprobs: needs logprobs"):
        oa.parse_chat({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, MODEL)
    with pytest.raises(InvalidArgument, match="messages"):
        oa.parse_chat({"messages": []}, MODEL)
    with pytest.raises(InvalidArgument, match="only text content"):
        oa.parse_chat({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, MODEL)


def test_another_model_is_not_found():
    with pytest.raises(oa.ModelNotFound, match="serves 'm'"):
        oa.parse_completion({"prompt": "a", "model": "gpt-4"}, MODEL)


def test_our_validation_errors_are_renamed_to_the_body_fields():
    assert [oa.field_name(f) for f in ("max_new_tokens", "num_return_sequences", "stop_strings", "top_k")] == \
        ["max_tokens", "n", "stop", "top_k"]
    assert (oa.field_name("top_n"), oa.field_name("top_n", chat=True)) == ("logprobs", "top_logprobs")


def _events(*pieces, reason=FinishReason.STOP_STRING):
    out = [TokenEvent("r", token_ids=(i,), logprobs=(-0.5,), text=t) for i, t in enumerate(pieces[:-1])]
    out.append(TokenEvent("r", token_ids=(9,), logprobs=(-0.5,), text=pieces[-1], finish_reason=reason, final=True,
                          prompt_tokens=3, generated_tokens=len(pieces)))
    return out


def _streamed_text(options, events):
    r = reply.Responder(options, "r", str)
    return [c["choices"][0]["text"] for e in events for c in r.chunks(e) if c["choices"]]


def test_a_stop_sequence_never_reaches_the_client_even_in_pieces():
    options = oa.Options(chat=False, model=MODEL, stream=True, stop=("END", "zz"))
    pieces = _streamed_text(options, _events("ab", "cE", "N", "D!"))
    assert "".join(pieces) == "abc" and not any("E" in p for p in pieces)
    # Without a stop, the held back text comes out at the end.
    assert "".join(_streamed_text(options, _events("ab", "cE", "N", reason=FinishReason.LENGTH))) == "abcEN"
    unary = reply.Responder(oa.Options(chat=False, model=MODEL, stop=("END",)), "r", str)
    for e in _events("ab", "cE", "N", "D!"):
        unary.add(e)
    body = unary.response()
    assert body["choices"][0]["text"] == "abc" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 4


def test_completion_logprobs_have_offsets_and_alternatives():
    r = reply.Responder(oa.Options(chat=False, model=MODEL, logprobs=True), "r", lambda t: f"<{t}>")
    top = (TopToken(0, "<0>", -0.1), TopToken(5, "<5>", -2.0))
    r.add(TokenEvent("r", token_ids=(0, 1), logprobs=(-0.1, -1.0), text="<0><1>", top_tokens=(top, top)))
    r.add(TokenEvent("r", token_ids=(2,), logprobs=(-3.0,), text="<2>", finish_reason=FinishReason.EOS, final=True))
    lp = r.response()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["<0>", "<1>", "<2>"] and lp["text_offset"] == [0, 3, 6]
    assert lp["token_logprobs"] == [-0.1, -1.0, -3.0] and lp["top_logprobs"][0] == {"<0>": -0.1, "<5>": -2.0}


def test_beams_stream_the_best_so_far_then_each_hypothesis_with_its_score():
    from tokenloom.request import BestUpdate

    r = reply.Responder(oa.Options(chat=True, model=MODEL, stream=True, beams=True, include_usage=True), "r", str)
    first = r.chunks(TokenEvent("r", provisional=True, best_update=BestUpdate(0, (1, 2), 0, "ab")))
    second = r.chunks(TokenEvent("r", provisional=True, best_update=BestUpdate(1, (3,), 1, "c")))
    assert [c["best_so_far"] for c in first + second] == [{"text": "ab", "token_ids": [1, 2]},
                                                          {"text": "ac", "token_ids": [1, 3]}]
    hyps = (Hypothesis((1, 3), "ac", -0.5, FinishReason.EOS), Hypothesis((1, 2), "ab", float("-inf"), FinishReason.LENGTH))
    last = r.chunks(TokenEvent("r", final=True, hypotheses=hyps, finish_reason=FinishReason.EOS, prompt_tokens=2,
                               generated_tokens=2))
    assert [c["choices"][0]["delta"]["content"] for c in last[:2]] == ["ac", "ab"]
    assert [c["choices"][0]["score"] for c in last[:2]] == [-0.5, -1e30]  # JSON has no -inf
    assert last[2]["usage"]["total_tokens"] == 4 and last[2]["choices"] == []


def test_response_format_and_guided_fields_become_our_constraint():
    from tokenloom.request import Constraint

    msgs = [{"role": "user", "content": "hi"}]
    schema = {"type": "object"}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert oa.parse_chat({"messages": msgs, "response_format": fmt}, MODEL).raw.constraint == \
        Constraint("json_schema", '{"type": "object"}')
    assert oa.parse_chat({"messages": msgs, "response_format": {"type": "json_object"}}, MODEL).raw.constraint == \
        Constraint("json_object")
    assert oa.parse_chat({"messages": msgs, "response_format": {"type": "text"}}, MODEL).raw.constraint is None
    assert oa.parse_completion({"prompt": "a", "guided_choice": ["x", "y"]}, MODEL).raw.constraint == \
        Constraint("choice", '["x", "y"]')
    assert oa.parse_completion({"prompt": "a", "guided_regex": "a+"}, MODEL).raw.constraint == Constraint("regex", "a+")
    for bad, field in (({"response_format": {"type": "xml"}}, "response_format"),
                       ({"guided_choice": "yes"}, "guided_choice"),
                       ({"guided_regex": "a", "guided_grammar": "start: A"}, "response_format")):
        with pytest.raises(InvalidArgument) as err:
            oa.parse_completion({"prompt": "a", **bad}, MODEL)
        assert err.value.field == field


def test_streamed_and_unary_text_offsets_agree_when_a_stop_sequence_holds_text_back():
    options = dict(chat=False, model=MODEL, logprobs=True, stop=("zz",))
    events = _events("ab", "cd", "ef", reason=FinishReason.LENGTH)
    streamed = reply.Responder(oa.Options(stream=True, **options), "r", lambda t: "ab cd ef".split()[t] if t < 3 else "ef")
    offsets = [o for e in events for c in streamed.chunks(e) for o in c["choices"][0]["logprobs"]["text_offset"]]
    unary = reply.Responder(oa.Options(**options), "r", lambda t: "ab cd ef".split()[t] if t < 3 else "ef")
    for e in events:
        unary.add(e)
    assert offsets == unary.response()["choices"][0]["logprobs"]["text_offset"] == [0, 2, 4]
