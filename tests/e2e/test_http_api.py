"""The OpenAI-compatible HTTP front, driven by the real `openai` package and by raw HTTP (httpx),
against servers started as a user starts them; its answers checked against the gRPC front's."""

from __future__ import annotations

import json
import math
import signal
import time

import httpx
import openai
import pytest

from conftest import own_server
from held_stream import HEAVY, first_event, holding_client, read_freely
from metrics_scrape import Scrape, poll
from tokenloom_client import Client

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    with own_server(tiny_dirs["llama"], "http", tmp_path_factory) as server:
        yield server


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def model(oai) -> str:
    return oai.models.list().data[0].id


@pytest.fixture(scope="module")
def grpc_client(server):
    with Client(server.address, timeout=60) as client:
        yield client


def test_health_and_models(server, model):
    assert httpx.get(server.http_url + "/health").json() == {"status": "ok"}
    models = httpx.get(server.http_url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [model] and models["data"][0]["max_model_len"] == 512


def test_greedy_completion_equals_grpc_token_for_token(oai, model, grpc_client):
    out = oai.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                 extra_body={"return_token_ids": True, "ignore_eos": True})
    ref = grpc_client.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    choice = out.choices[0]
    assert choice.token_ids == ref.token_ids and choice.text == ref.text
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == ref.usage.prompt_tokens and out.usage.completion_tokens == 12


def test_greedy_chat_streamed_equals_unary_and_grpc(oai, model, grpc_client):
    ref = grpc_client.generate(messages=MESSAGES, max_new_tokens=10, ignore_eos=True)
    whole = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True})
    chunks = list(oai.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=10,
                                              temperature=0, stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True, "return_token_ids": True}))
    assert whole.choices[0].message.content == ref.text and whole.choices[0].message.role == "assistant"
    streamed = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == ref.text
    assert [t for c in streamed for t in c.choices[0].token_ids] == ref.token_ids
    assert streamed[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in streamed][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in streamed[:-1])
    usage = chunks[-1].usage  # include_usage: a last chunk without choices
    assert not chunks[-1].choices and usage.completion_tokens == 10 and usage.prompt_tokens == ref.usage.prompt_tokens


def test_seeded_samples_repeat_and_equal_grpc(oai, model, grpc_client):
    kw = dict(model=model, prompt=PROMPT, max_tokens=8, temperature=0.8, top_p=0.95, n=2, seed=7,
              extra_body={"return_token_ids": True, "ignore_eos": True})
    first, second = oai.completions.create(**kw), oai.completions.create(**kw)
    streamed: dict[int, list[int]] = {}
    for chunk in oai.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed.setdefault(c.index, []).extend(c.token_ids)
    ref = grpc_client.generate(PROMPT, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.95, top_k=0,
                               num_return_sequences=2, seed=7, ignore_eos=True)
    ids = [c.token_ids for c in sorted(first.choices, key=lambda c: c.index)]
    assert ids == [c.token_ids for c in sorted(second.choices, key=lambda c: c.index)]
    assert ids == [streamed[0], streamed[1]] == [h.token_ids for h in ref.hypotheses]
    assert ids[0] != ids[1]  # two samples, not one twice


def test_logprobs_are_the_grpc_top_n(oai, model, grpc_client):
    out = oai.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                 extra_body={"ignore_eos": True})
    ref = grpc_client.generate(PROMPT, max_new_tokens=6, top_n=3, ignore_eos=True)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    for step, alternatives in zip(lp.top_logprobs, ref.top_tokens):
        assert step == pytest.approx({t.text: t.logprob for t in alternatives}, abs=1e-5)
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]

    chat = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=4, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        probs = [t.logprob for t in entry.top_logprobs]
        assert len(probs) == 4 and probs == sorted(probs, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the top one
        assert entry.logprob == pytest.approx(probs[0], abs=1e-5) and bytes(entry.bytes).decode() == entry.token


def test_a_stop_string_ends_the_text_before_it(oai, model):
    full = oai.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = oai.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                 extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.startswith(cut.text)
    assert full[len(cut.text):].startswith(stop)
    streamed = oai.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop,
                                      stream=True, extra_body={"ignore_eos": True})
    chunks = [c.choices[0] for c in streamed]
    assert "".join(c.text for c in chunks) == cut.text and chunks[-1].finish_reason == "stop"


def test_beams_equal_grpc_hypotheses(oai, model, grpc_client):
    out = oai.completions.create(model=model, prompt=PROMPT, max_tokens=6, n=2,
                                 extra_body={"num_beams": 3, "no_repeat_ngram_size": 2, "return_token_ids": True})
    ref = grpc_client.generate(PROMPT, max_new_tokens=6, num_beams=3, num_return_sequences=2, no_repeat_ngram_size=2)
    got = [(c.token_ids, c.text, c.score) for c in out.choices]
    assert [(i, t) for i, t, _ in got] == [(h.token_ids, h.text) for h in ref.hypotheses]
    assert [s for *_, s in got] == pytest.approx([h.score for h in ref.hypotheses])

    progress, final = [], []
    for chunk in oai.completions.create(model=model, prompt=PROMPT, max_tokens=6, n=2, stream=True,
                                        extra_body={"num_beams": 3, "no_repeat_ngram_size": 2}):
        extra = chunk.model_extra or {}
        if "best_so_far" in extra:
            progress.append(extra["best_so_far"]["text"])
        final.extend((c.index, c.text) for c in chunk.choices)
    assert progress and final == [(0, ref.hypotheses[0].text), (1, ref.hypotheses[1].text)]


def test_score_equals_grpc_score(server, model, grpc_client):
    body = {"model": model, "prompt": PROMPT, "continuation": " jumps over the lazy dog"}
    got = httpx.post(server.http_url + "/v1/score", json=body).json()
    ref = grpc_client.score(PROMPT, " jumps over the lazy dog")
    assert got["continuation_ids"] == ref.continuation_ids and got["prompt_ids"] == ref.prompt_ids
    assert got["logprobs"] == pytest.approx(ref.logprobs, abs=1e-5)
    assert got["total_logprob"] == pytest.approx(ref.total_logprob, abs=1e-4) and got["total_logprob"] < 0


@pytest.mark.parametrize("kwargs, param, words", [
    (dict(max_tokens=100000), "max_tokens", "server limit"),
    (dict(n=2, temperature=0), "n", "sampling"),
    (dict(frequency_penalty=0.5), "frequency_penalty", "repetition_penalty"),
    (dict(top_p=1.5), "top_p", "(0, 1]"),
    (dict(extra_body={"no_such_field": 1}), "no_such_field", "unknown field"),
    (dict(extra_body={"num_beams": 2}, logprobs=2), "logprobs", "beam"),
    (dict(stop=[""]), "stop", "empty"),
])
def test_bad_parameters_are_400_naming_the_body_field(oai, model, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=model, prompt=PROMPT, **kwargs)
    body = err.value.body
    assert err.value.status_code == 400 and body["param"] == param and words in body["message"]
    assert body["message"].startswith(param + ":") and body["type"] == "invalid_request_error"


def test_a_chat_error_names_the_chat_field(oai, model):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=model, messages=MESSAGES, logprobs=True, top_logprobs=50, max_tokens=2)
    assert err.value.body["param"] == "top_logprobs" and err.value.body["message"].startswith("top_logprobs: ")


def test_other_refusals_have_fitting_codes_and_count(server, oai, model):
    before = Scrape(server.metrics_url)
    with pytest.raises(openai.NotFoundError, match="this server serves") as missing:
        oai.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="context length"):
        oai.completions.create(model=model, prompt=[5] * 600, max_tokens=2)
    raw = httpx.post(server.http_url + "/v1/chat/completions", content=b'{"messages": [', timeout=30)
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    ok = httpx.post(server.http_url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).json()
    assert ok["usage"]["completion_tokens"] == 2  # the server goes on serving
    after = Scrape(server.metrics_url)
    assert after.get("malformed_requests_total") - before.get("malformed_requests_total") == 1
    http = {k: after.get("requests_finished_total", outcome=k, front="http")
            - before.get("requests_finished_total", outcome=k, front="http") for k in ("NOT_FOUND", "INVALID_ARGUMENT")}
    assert http == {"NOT_FOUND": 1, "INVALID_ARGUMENT": 1}


def test_a_client_that_disconnects_mid_stream_frees_its_rows(server, model):
    before = Scrape(server.metrics_url).get("requests_finished_total", outcome="cancelled", front="http")
    with holding_client(timeout=30) as client:
        body = {"model": model, "prompt": PROMPT, **HEAVY}
        with client.stream("POST", server.http_url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()  # kept: a dropped iterator closes its connection
            first_event(lines)
            holding = poll(server.metrics_url, lambda s: s.running + s.get("paused_sequences") > 0)
            assert holding.running + holding.get("paused_sequences") > 0, "the request is still generating"
    # The connection is closed: within a step or so the rows are gone and the call counts as cancelled.
    scrape = poll(server.metrics_url, lambda s: s.idle and
                  s.get("requests_finished_total", outcome="cancelled", front="http") > before, timeout=10)
    assert scrape.idle and scrape.get("requests_finished_total", outcome="cancelled", front="http") == before + 1
    assert scrape.get("paused_sequences") == 0


@pytest.fixture(scope="module")
def guarded(tiny_dirs, tmp_path_factory):
    with own_server(tiny_dirs["llama"], "http-auth", tmp_path_factory, "--auth-token", "s3cret",
                    "--max-streams-per-client", "1") as server:
        yield server


def test_bearer_token_and_per_client_limits(guarded):
    url = guarded.http_url + "/v1"
    assert httpx.get(guarded.http_url + "/health").status_code == 200  # open, for load balancers
    with openai.OpenAI(base_url=url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError, match="not accepted"):
            bad.models.list()
    assert httpx.post(url + "/completions", json={"prompt": "x"}).status_code == 401
    assert Scrape(guarded.metrics_url).get("auth_failures_total", reason="rejected") == 1
    assert Scrape(guarded.metrics_url).get("auth_failures_total", reason="missing") == 1
    with openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0, timeout=60) as good:
        model = good.models.list().data[0].id
        # One stream open, the client's one allowed (held open: it reads nothing after its first event).
        with holding_client(timeout=60, headers={"Authorization": "Bearer s3cret"}) as holder:
            body = {"model": model, "prompt": PROMPT, **HEAVY}
            with holder.stream("POST", url + "/completions", json=body) as stream:
                assert stream.status_code == 200
                lines = stream.iter_lines()  # kept: a dropped iterator closes its connection
                first_event(lines)
                with pytest.raises(openai.RateLimitError) as err:
                    good.completions.create(model=model, prompt=PROMPT, max_tokens=2)
                assert "max_streams_per_client" in str(err.value.body) and err.value.status_code == 429
        deadline = time.monotonic() + 10
        while True:  # the closed stream's slot comes back
            try:
                out = good.completions.create(model=model, prompt=PROMPT, max_tokens=2)
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert out.usage.completion_tokens == 2
    scrape = Scrape(guarded.metrics_url)
    assert scrape.get("requests_rejected_total", reason="max_streams_per_client", front="http") >= 1
    assert scrape.get("requests_rejected_total", front="grpc") == 0


def test_http_and_grpc_requests_count_under_their_front(server, oai, model, grpc_client):
    before = Scrape(server.metrics_url)
    oai.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    grpc_client.generate(PROMPT, max_new_tokens=3, ignore_eos=True)
    after = Scrape(server.metrics_url)
    for front in ("http", "grpc"):
        delta = (after.get("requests_finished_total", outcome="length", front=front)
                 - before.get("requests_finished_total", outcome="length", front=front))
        assert delta == 1, front
    assert math.isclose(after.finished("length") - before.finished("length"), 2)


def test_sigterm_drains_http_like_grpc(tiny_dirs, tmp_path_factory):
    """Open streams finish, new requests get 503 while the port still answers, and the process exits 0."""
    with own_server(tiny_dirs["llama"], "http-drain", tmp_path_factory, "--grace-seconds", "60") as server:
        body = {"prompt": PROMPT, **HEAVY}
        with holding_client(timeout=60) as client:  # its stream is still open when the signal comes
            with client.stream("POST", server.http_url + "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                first_event(lines)
                server.proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 10
                while (health := httpx.get(server.http_url + "/health", timeout=30)).status_code == 200:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                assert health.status_code == 503
                refused = httpx.post(server.http_url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                                     timeout=30)
                assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
                read_freely(response)
                _t = time.monotonic(); rest = [line for line in lines if line.startswith("data:")]; print("READ", time.monotonic() - _t, len(rest))
            assert rest[-1] == "data: [DONE]"
            events = [json.loads(line[5:]) for line in rest[:-1]]
            ended = {c["index"]: c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]}
            assert ended == {i: "length" for i in range(HEAVY["n"])}  # every sample ran to its end
        assert server.proc.wait(30) == 0
