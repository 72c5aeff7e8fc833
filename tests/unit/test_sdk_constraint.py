"""The SDK's `constraint` argument -> the Constraint message, checked before any call."""

import json

import pytest

from tokenloom_client import convert


def test_each_kind_becomes_its_field():
    assert json.loads(convert.constraint({"json_schema": {"type": "object"}}).json_schema) == {"type": "object"}
    assert convert.constraint({"json_schema": '{"type": "array"}'}).json_schema == '{"type": "array"}'
    assert convert.constraint({"json_object": True}).json_object
    assert convert.constraint({"regex": "a+"}).regex == "a+"
    assert convert.constraint({"grammar": "start: A"}).grammar == "start: A"
    assert list(convert.constraint({"choice": ["x", "y"]}).choice.options) == ["x", "y"]
    params = convert.build_parameters({"constraint": {"regex": "b"}, "max_new_tokens": 3})
    assert params.constraint.WhichOneof("kind") == "regex" and params.max_new_tokens == 3


@pytest.mark.parametrize("bad", ["a+", {"regex": "a", "choice": ["b"]}, {"xml": "<a/>"}, {}])
def test_anything_else_is_refused_before_a_call(bad):
    with pytest.raises(ValueError, match="constraint must be a dict with one key"):
        convert.constraint(bad)
