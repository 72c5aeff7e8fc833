"""Constrained decoding from outside: the SDK, the CLI and the OpenAI HTTP front against a live server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import grpc
import jsonschema
import openai
import pytest

from tokenloom_client import Client

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "population": {"type": "integer", "minimum": 0, "maximum": 10**8},
        "capital": {"type": "boolean"},
        "districts": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 10}, "area": {"type": "number", "minimum": 0, "maximum": 100,
                                                                 "multipleOf": 0.5}},
            "required": ["name", "area"], "additionalProperties": False}, "minItems": 1, "maxItems": 2},
        "kind": {"enum": ["town", "city", "village"]},
    },
    "required": ["city", "population", "capital", "districts", "kind"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]


@pytest.fixture(scope="module")
def server(tiny_servers):
    return tiny_servers["llama"]


def test_the_sdk_streams_samples_that_validate(server):
    with Client(server.address, timeout=120) as client:
        whole = client.generate(messages=MESSAGES, max_new_tokens=300, constraint={"json_schema": SCHEMA})
        texts: dict[int, str] = {}
        for chunk in client.stream(messages=MESSAGES, max_new_tokens=300, do_sample=True, seed=5,
                                   num_return_sequences=2, constraint={"json_schema": json.dumps(SCHEMA)}):
            texts[chunk.index] = texts.get(chunk.index, "") + chunk.text
        regex = client.generate("Code:", max_new_tokens=20, do_sample=True, seed=1, constraint={"regex": r"[A-F]{3}-\d{2}"})
        choice = client.generate("Answer:", max_new_tokens=8, constraint={"choice": ["yes", "no"]})
    jsonschema.validate(json.loads(whole.text), SCHEMA)
    assert whole.finish_reason == "eos"
    assert len(texts) == 2
    for text in texts.values():
        jsonschema.validate(json.loads(text), SCHEMA)
    assert re.fullmatch(r"[A-F]{3}-\d{2}", regex.text) and choice.text in ("yes", "no")


def test_beam_search_under_a_schema_returns_n_best_that_validate(server):
    with Client(server.address, timeout=120) as client:
        result = client.generate(messages=MESSAGES, max_new_tokens=300, num_beams=3, num_return_sequences=3,
                                 constraint={"json_schema": SCHEMA})
    assert len(result.hypotheses) == 3
    assert [h.score for h in result.hypotheses] == sorted((h.score for h in result.hypotheses), reverse=True)
    for h in result.hypotheses:
        jsonschema.validate(json.loads(h.text), SCHEMA)
        assert h.finish_reason == "eos"


@pytest.mark.parametrize("constraint, params, words", [
    ({"json_schema": '{"type": "strng"}'}, {}, "does not compile"),
    ({"regex": "(ab"}, {}, "regex does not compile"),
])
def test_bad_constraints_are_invalid_argument_naming_the_field(server, constraint, params, words):
    with Client(server.address, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate("x", max_new_tokens=4, constraint=constraint, **params)
        assert client.generate("x", max_new_tokens=2).usage.generated_tokens == 2  # the server goes on
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("constraint:") and words in err.value.details()


def test_openai_response_format_and_guided_fields(server):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="x", max_retries=0, timeout=120) as oai:
        model = oai.models.list().data[0].id
        reply = oai.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=300, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}})
        obj = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=200, seed=3,
                                          response_format={"type": "json_object"})
        choice = oai.completions.create(model=model, prompt="Answer:", max_tokens=5, temperature=0,
                                        extra_body={"guided_choice": ["left", "right"]})
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5,
                                        response_format={"type": "json_schema",
                                                         "json_schema": {"name": "x", "schema": {"type": "strng"}}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    assert choice.choices[0].text in ("left", "right")
    assert err.value.body["param"] == "response_format" and "does not compile" in err.value.body["message"]


def test_the_cli_constrains_its_reply(server):
    out = subprocess.run([sys.executable, "-m", "tokenloom_client", "--target", server.address, "--raw",
                          "--max-new-tokens", "8", "--choice", "red", "--choice", "blue", "Pick a colour:"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT / "client"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("red", "blue")
