"""Constrained decoding on the engine: outputs parse and validate, free rows in the same batch are untouched."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from hf_reference import hf_beam_search
from test_engine import Harness
from tokenloom.front.preprocessor import UserInput
from tokenloom.front.validation import InvalidArgument, RawParams
from tokenloom.request import Constraint, FinishReason, GenerationOutput

PROMPT = list(range(300, 330))

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer",
     "minimum": 0, "maximum": 120}, "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1,
     "maxItems": 3}, "score": {"type": "number", "minimum": -1, "maximum": 1}}, "required": ["tags"],
     "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer"},
     "y": {"type": "integer"}}, "required": ["x", "y"], "additionalProperties": False},
     "label": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]}},
     "required": ["point", "label"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
]


@pytest.fixture(scope="module")
def harness(tiny_dirs):
    return Harness(tiny_dirs["llama"], kv_tokens=8192, budget=256, max_seqs=48)


def _submit(h: Harness, constraint: Constraint | None = None, **params) -> str:
    request = h.runtime.preprocessor(UserInput(input_ids=tuple(PROMPT)), RawParams(constraint=constraint, **params))
    h.outputs[request.request_id] = GenerationOutput(request.request_id)
    h.engine.submit(request)
    return request.request_id


def _texts(out: GenerationOutput) -> list[str]:
    return [hyp.text for hyp in out.hypotheses] or [out.text]


def test_constrained_rows_among_free_ones_parse_and_the_free_ones_are_unchanged(harness):
    free_params = [dict(max_new_tokens=20, ignore_eos=True), dict(max_new_tokens=20, do_sample=True, seed=3)]
    alone = [_submit(harness, **p) for p in free_params]
    harness.run_until_idle()
    alone_tokens = [harness.outputs[r].token_ids for r in alone]

    free = [_submit(harness, **p) for p in free_params]
    constrained = []
    for i, schema in enumerate(SCHEMAS):
        c = Constraint("json_schema", json.dumps(schema))
        constrained.append((schema, _submit(harness, c, max_new_tokens=200)))
        constrained.append((schema, _submit(harness, c, max_new_tokens=200, do_sample=True, seed=i,
                                            num_return_sequences=2, temperature=1.5)))
    regex = _submit(harness, Constraint("regex", r"[A-Z][a-z]{2,6}-\d{3}"), max_new_tokens=30, do_sample=True, seed=1)
    choice = _submit(harness, Constraint("choice", json.dumps(["yes", "no", "maybe later"])), max_new_tokens=10)
    obj = _submit(harness, Constraint("json_object"), max_new_tokens=120, do_sample=True, seed=2)
    lark = _submit(harness, Constraint("grammar", 'start: expr\nexpr: NUM | expr OP expr | "(" expr ")"\n'
                                                  'NUM: /[0-9]{1,3}/\nOP: "+" | "-" | "*"\n'),
                   max_new_tokens=40, do_sample=True, seed=4)
    harness.run_until_idle()

    # Free rows: token for token what they are alone (greedy and seeded).
    assert [harness.outputs[r].token_ids for r in free] == alone_tokens
    for schema, rid in constrained:
        out = harness.outputs[rid]
        for text in _texts(out):
            jsonschema.validate(json.loads(text), schema)
        assert out.finish_reason is FinishReason.EOS
    assert re.fullmatch(r"[A-Z][a-z]{2,6}-\d{3}", harness.outputs[regex].text)
    assert harness.outputs[choice].text in ("yes", "no", "maybe later")
    assert isinstance(json.loads(harness.outputs[obj].text), dict)
    assert re.fullmatch(r"[0-9()+\-*]+", harness.outputs[lark].text)
    assert harness.runtime.blocks.num_used == 0


def _hf_allowed_tokens(grammars, constraint: Constraint, prompt_len: int, eos: set[int]):
    """HF's `prefix_allowed_tokens_fn` from the same grammar engine: a fresh matcher past the beam's
    tokens. A beam that took a forbidden token (scored -inf, as our dead beams) may take anything."""
    every = list(range(grammars.vocab_size))

    def allowed(batch_id, input_ids) -> list[int]:
        matcher = grammars.matcher(constraint)
        try:
            matcher.replay(t for t in input_ids[prompt_len:].tolist() if t not in eos)
        except RuntimeError:
            return every
        words = matcher.mask().result()
        bits = ((words[:, None] >> np.arange(32, dtype=np.int32)) & 1).reshape(-1)[: grammars.vocab_size]
        return np.flatnonzero(bits).tolist()

    return allowed


@pytest.mark.parametrize("constraint", [
    Constraint("regex", r"[a-z]{3,8}( [a-z]{2,8}){1,3}\."),
    Constraint("json_schema", json.dumps(SCHEMAS[0])),
], ids=["regex", "json_schema"])
def test_constrained_beams_equal_hf_beam_search_with_the_same_mask(harness, hf_models, tiny_dirs, constraint):
    """Beam search under a constraint is HF's beam search with a `prefix_allowed_tokens_fn` giving the
    grammar's allowed tokens: the same hypotheses and scores, every one valid, beside free rows."""
    model, _ = hf_models(tiny_dirs["llama"])
    eos = set(harness.runtime.eos_token_ids)
    free = _submit(harness, max_new_tokens=20, ignore_eos=True)
    harness.run_until_idle()
    alone = harness.outputs[free].token_ids
    free = _submit(harness, max_new_tokens=20, ignore_eos=True)
    rid = _submit(harness, constraint, max_new_tokens=40, num_beams=3, num_return_sequences=2)
    harness.run_until_idle()

    expected, scores = hf_beam_search(
        model, PROMPT, eos, num_beams=3, num_return_sequences=2, max_new_tokens=40,
        prefix_allowed_tokens_fn=_hf_allowed_tokens(harness.runtime.grammars, constraint, len(PROMPT), eos))
    out = harness.outputs[rid]
    assert [list(h.token_ids) for h in out.hypotheses] == expected
    assert [h.score for h in out.hypotheses] == pytest.approx(scores, abs=1e-4)
    for h in out.hypotheses:
        assert h.finish_reason is FinishReason.EOS
        if constraint.kind == "regex":
            assert re.fullmatch(constraint.text, h.text)
        else:
            jsonschema.validate(json.loads(h.text), SCHEMAS[0])
    assert harness.outputs[free].token_ids == alone


def test_constrained_beams_with_fewer_valid_endings_than_slots_return_only_valid_ones(harness, hf_models, tiny_dirs):
    """Two one-letter choices, six beams: HF's search fills its other slots with beams that ran on
    past their EOS (penalised by -1e9). Only hypotheses that keep to the constraint come back; the
    best is HF's."""
    model, _ = hf_models(tiny_dirs["llama"])
    eos = set(harness.runtime.eos_token_ids)
    choice = Constraint("choice", json.dumps(["a", "b"]))
    rid = _submit(harness, choice, max_new_tokens=8, num_beams=6, num_return_sequences=6)
    harness.run_until_idle()
    out = harness.outputs[rid]
    assert out.finish_reason is FinishReason.EOS and 1 <= len(out.hypotheses) < 6
    for h in out.hypotheses:
        assert h.text in ("a", "b") and h.finish_reason is FinishReason.EOS
        assert h.token_ids[-1] in eos and not eos & set(h.token_ids[:-1])
    expected, _ = hf_beam_search(
        model, PROMPT, eos, num_beams=6, num_return_sequences=6, max_new_tokens=8,
        prefix_allowed_tokens_fn=_hf_allowed_tokens(harness.runtime.grammars, choice, len(PROMPT), eos))
    assert list(out.hypotheses[0].token_ids) == expected[0]


def test_an_output_cut_by_max_new_tokens_ends_with_length_and_is_a_valid_prefix(harness):
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"},
              "minItems": 50}}, "required": ["items"]}
    rid = _submit(harness, Constraint("json_schema", json.dumps(schema)), max_new_tokens=12)
    harness.run_until_idle()
    out = harness.outputs[rid]
    assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 12
    assert out.text.startswith('{"items":[')  # compact JSON: the only way such an object begins


def test_a_preempted_or_resumed_constrained_request_stays_valid(tiny_dirs):
    h = Harness(tiny_dirs["llama"], kv_tokens=256, budget=64, max_seqs=8)  # a 16-block store: preemptions
    c = Constraint("json_schema", json.dumps(SCHEMAS[0]))
    rids = [_submit(h, c, max_new_tokens=120, do_sample=True, seed=s) for s in range(8)]
    h.run_until_idle()
    assert h.runtime.scheduler.num_preemptions > 0
    for rid in rids:
        jsonschema.validate(json.loads(h.outputs[rid].text), SCHEMAS[0])
    first = h.outputs[rids[0]]
    request = h.runtime.preprocessor(UserInput(input_ids=tuple(PROMPT), resume=(tuple(first.token_ids[:5]),)),
                                     RawParams(constraint=c, max_new_tokens=120, do_sample=True, seed=0))
    h.outputs[request.request_id] = GenerationOutput(request.request_id)
    h.engine.submit(request)
    h.run_until_idle()
    assert first.token_ids[:5] + h.outputs[request.request_id].token_ids == first.token_ids


def test_a_mask_that_fails_fails_its_request_alone(harness, monkeypatch):
    victim = Constraint("regex", "[a-z]{40}")
    real_matcher = harness.runtime.grammars.matcher

    def matcher(constraint):
        m = real_matcher(constraint)
        if constraint == victim:  # its fourth mask raises, as a grammar engine's bug would
            fills, real_fill = iter(range(1000)), m._fill
            m._fill = lambda: real_fill() if next(fills) < 3 else (_ for _ in ()).throw(ValueError("mask broke"))
        return m

    monkeypatch.setattr(harness.runtime.grammars, "matcher", matcher)
    free_params = [dict(max_new_tokens=16, ignore_eos=True), dict(max_new_tokens=16, do_sample=True, seed=5)]
    alone = [_submit(harness, **p) for p in free_params]
    harness.run_until_idle()
    good = Constraint("json_schema", json.dumps(SCHEMAS[0]))
    free = [_submit(harness, **p) for p in free_params]
    kept = _submit(harness, good, max_new_tokens=200, do_sample=True, seed=9)
    broken = _submit(harness, victim, max_new_tokens=60, do_sample=True, seed=9)
    harness.run_until_idle()

    out = harness.outputs[broken]
    assert out.finish_reason is FinishReason.ERROR and "mask broke" in out.error
    assert len(out.token_ids) == 3  # the three tokens drawn under a mask; nothing unconstrained reached it
    assert [harness.outputs[r].token_ids for r in free] == [harness.outputs[r].token_ids for r in alone]
    jsonschema.validate(json.loads(harness.outputs[kept].text), SCHEMAS[0])


def test_the_engine_never_compiles_even_a_constraint_the_cache_let_go(harness, monkeypatch):
    """The front compiles a request's constraint and the request carries it: when the cache has let
    it go by the time the engine takes the request, nothing is compiled on the engine's thread."""
    grammars = harness.runtime.grammars
    monkeypatch.setattr(grammars, "_cache_size", 1)
    first = _submit(harness, Constraint("regex", "[a-c]{4}"), max_new_tokens=8, do_sample=True, seed=1)
    second = _submit(harness, Constraint("regex", "[x-z]{3}"), max_new_tokens=8, do_sample=True, seed=1)
    assert Constraint("regex", "[a-c]{4}") not in grammars._cache  # let go when the second was compiled

    def compiles(constraint):
        raise AssertionError(f"the engine compiled {constraint}")

    monkeypatch.setattr(grammars, "_compiled", compiles)
    harness.run_until_idle()
    assert re.fullmatch("[a-c]{4}", harness.outputs[first].text), harness.outputs[first].error
    assert re.fullmatch("[x-z]{3}", harness.outputs[second].text), harness.outputs[second].error


def test_resumed_tokens_the_constraint_forbids_are_invalid_argument(harness):
    letters = tuple(harness.runtime.loaded.tokenizer.encode("abc", add_special_tokens=False))
    with pytest.raises(InvalidArgument, match="not allowed by the constraint") as err:
        harness.runtime.preprocessor(UserInput(input_ids=tuple(PROMPT), resume=(letters,)),
                                     RawParams(constraint=Constraint("regex", "[0-9]+"), max_new_tokens=8))
    assert err.value.field == "resume"


@pytest.mark.parametrize("constraint, params, words", [
    (Constraint("json_schema", '{"type": "strng"}'), {}, "does not compile"),
    (Constraint("json_schema", "{not json"), {}, "does not compile"),
    (Constraint("regex", "(ab"), {}, "does not compile"),
    (Constraint("grammar", "start: foo"), {}, "does not compile"),
    (Constraint("json_schema", '{"type": "array", "uniqueItems": true}'), {}, "uniqueItems"),
    (Constraint("regex", ""), {}, "empty"),
])
def test_bad_constraints_are_invalid_argument_before_admission(harness, constraint, params, words):
    with pytest.raises(InvalidArgument, match=re.escape(words)) as err:
        harness.runtime.preprocessor(UserInput(input_ids=tuple(PROMPT)), RawParams(constraint=constraint, **params))
    assert err.value.field == "constraint"


def _schemas():
    """A property-testing strategy for JSON Schemas of the kinds programs ask for: objects (nested), arrays
    with bounds, enums, numbers with ranges, strings with lengths, required and optional fields, anyOf."""
    from hypothesis import strategies as st

    names = st.sampled_from(["id", "name", "age", "tags", "score", "ok", "kind", "items", "note", "x", "y"])
    leaf = st.one_of(
        st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
                  st.integers(-50, 50), st.integers(0, 100)),
        # multipleOf keeps a random model from writing digits for ever (a bounded number has endless fractions)
        st.builds(lambda lo: {"type": "number", "minimum": lo, "maximum": lo + 10, "multipleOf": 0.25},
                  st.integers(-5, 5)),
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 12)),
        st.just({"type": "boolean"}),
        st.builds(lambda vs: {"enum": vs}, st.lists(st.sampled_from(["red", "green", 3, None, True]),
                                                   min_size=1, max_size=4, unique=True)),
    )

    def extend(inner):
        array = st.builds(lambda items, lo, span: {"type": "array", "items": items, "minItems": lo,
                                                   "maxItems": lo + span}, inner, st.integers(0, 2), st.integers(0, 2))
        obj = st.builds(
            lambda props, required: {"type": "object", "properties": props, "additionalProperties": False,
                                     "required": [k for k in props if k in required]},
            st.dictionaries(names, inner, min_size=1, max_size=4), st.sets(names))
        either = st.builds(lambda a, b: {"anyOf": [a, b]}, inner, inner)
        return st.one_of(array, obj, either)

    return st.recursive(leaf, extend, max_leaves=8).filter(lambda s: s.get("type") == "object") | \
        st.builds(lambda props: {"type": "object", "properties": props, "required": sorted(props),
                                 "additionalProperties": False},  # else a random model writes keys for ever
                  st.dictionaries(names, leaf, min_size=1, max_size=6))


def test_fifty_random_schemas_greedy_and_sampled_always_validate(harness):
    """Eight constrained rows among twenty-four free ones per wave; every constrained output validates."""
    from hypothesis import HealthCheck, given, settings

    schemas = []

    @settings(max_examples=50, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(_schemas())
    def collect(schema):
        schemas.append(schema)

    collect()
    assert len(schemas) == 50
    checked = 0
    for wave in range(0, len(schemas), 4):
        rids = []
        for j, schema in enumerate(schemas[wave:wave + 4]):
            c = Constraint("json_schema", json.dumps(schema))
            rids.append((schema, _submit(harness, c, max_new_tokens=160)))
            rids.append((schema, _submit(harness, c, max_new_tokens=160, do_sample=True, seed=wave + j)))
        for k in range(24):
            _submit(harness, max_new_tokens=8, do_sample=bool(k % 2), seed=k, ignore_eos=True)
        harness.run_until_idle()
        for schema, rid in rids:
            out = harness.outputs[rid]
            if out.finish_reason is FinishReason.LENGTH:
                assert out.text.startswith("{")  # ran out of tokens: not a finished value (see the test above)
                continue
            jsonschema.validate(json.loads(out.text), schema)
            checked += 1
    assert checked >= 90  # of 100: almost every output finishes within 160 tokens
