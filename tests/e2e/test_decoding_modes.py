"""Every decoding mode inside one continuous batch, over real gRPC, against HF `generate`."""

from __future__ import annotations

import asyncio
import math
import random

import grpc
import pytest
import torch

from hf_reference import chat_ids, hf_beam_search, hf_generate, sequence_logprob
from tokenloom_client import AsyncClient, Client

SAMPLED = dict(do_sample=True, temperature=0.8, top_k=30, top_p=0.9)


def _mixed_requests(prompts: list[list[int]]) -> list[dict]:
    """Greedy, penalised greedy, sampled and beams of widths 2, 4 and 5, all in one batch."""
    p = prompts
    return [
        dict(input_ids=p[0], max_new_tokens=14),
        dict(input_ids=p[1], max_new_tokens=12, no_repeat_ngram_size=2),
        dict(input_ids=p[2], max_new_tokens=12, repetition_penalty=1.3),
        dict(input_ids=p[3], max_new_tokens=16, seed=11, **SAMPLED),
        dict(input_ids=p[4], max_new_tokens=10, num_beams=2, no_repeat_ngram_size=2, num_return_sequences=2),
        dict(input_ids=p[5], max_new_tokens=9, num_beams=4, length_penalty=0.5, early_stopping=True,
             num_return_sequences=3),
        dict(input_ids=p[6], max_new_tokens=8, num_beams=5, length_penalty=2.0, early_stopping="never",
             no_repeat_ngram_size=2),
        dict(input_ids=p[7], max_new_tokens=11, num_beams=4, repetition_penalty=1.2, num_return_sequences=4),
        dict(input_ids=p[8], max_new_tokens=10, num_return_sequences=3, seed=5, **SAMPLED),
    ]


async def _run(address: str, requests: list[dict], stagger: float = 0.02):
    async def one(client, i, req):
        await asyncio.sleep(i * stagger)
        return await client.generate(**req)

    async with AsyncClient(address) as client:
        return await asyncio.gather(*(one(client, i, r) for i, r in enumerate(requests)))


def _hf_expected(model, request: dict, eos: set[int]):
    kwargs = {k: v for k, v in request.items() if k not in ("input_ids", "seed")}
    if request.get("num_beams", 1) > 1:
        return hf_beam_search(model, request["input_ids"], eos, **kwargs)
    return hf_generate(model, request["input_ids"], do_sample=False, **kwargs), None


def _assert_matches_hf(model, request, result, eos):
    expected, scores = _hf_expected(model, request, eos)
    if scores is None:
        assert result.token_ids == expected, request
        return
    got = [h.token_ids for h in result.hypotheses]
    assert got == expected, request
    assert [h.score for h in result.hypotheses] == pytest.approx(scores, abs=1e-4), request
    assert result.token_ids == expected[0]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mixed_batch_of_every_mode_matches_hf_generate(kind, tiny_servers, tiny_dirs, hf_models):
    model, tok = hf_models(tiny_dirs[kind])
    rng = random.Random(f"modes-{kind}")
    prompts = [[rng.randrange(len(tok)) for _ in range(n)] for n in (5, 12, 30, 8, 20, 3, 41, 16, 9)]
    requests = _mixed_requests(prompts)
    results = asyncio.run(_run(tiny_servers[kind].address, requests))
    eos = {model.generation_config.eos_token_id}
    for request, result in zip(requests, results):
        if request.get("do_sample"):
            continue
        _assert_matches_hf(model, request, result, eos)
    # Sampled rows: the same tokens as when each runs alone (the batch does not change them).
    for request, result in zip(requests, results):
        if request.get("do_sample"):
            alone = asyncio.run(_run(tiny_servers[kind].address, [request]))[0]
            assert result.token_ids == alone.token_ids
            if request.get("num_return_sequences", 1) > 1:
                assert [h.token_ids for h in result.hypotheses] == [h.token_ids for h in alone.hypotheses]
                assert len(result.hypotheses) == request["num_return_sequences"]
                assert len({tuple(h.token_ids) for h in result.hypotheses}) > 1, "samples should differ"


@pytest.mark.slow
def test_default_model_beams_match_hf_with_eos(default_server, default_dir, hf_models):
    model, tok = hf_models(default_dir)
    eos_id = model.generation_config.eos_token_id
    eos = set(eos_id) if isinstance(eos_id, list) else {eos_id}
    questions = ["What is the capital of France?", "Name a primary color.", "Say hello."]
    requests = [
        dict(input_ids=chat_ids(tok, questions[0]), max_new_tokens=20, num_beams=4, num_return_sequences=2),
        dict(input_ids=chat_ids(tok, questions[1]), max_new_tokens=16, num_beams=2, no_repeat_ngram_size=2,
             length_penalty=1.5),
        dict(input_ids=chat_ids(tok, questions[2]), max_new_tokens=12),
        dict(input_ids=chat_ids(tok, questions[0]), max_new_tokens=12, num_beams=5, early_stopping=True),
    ]
    results = asyncio.run(_run(default_server.address, requests, stagger=0.05))
    for request, result in zip(requests, results):
        _assert_matches_hf(model, request, result, eos)
    assert "Paris" in results[0].text
    assert results[0].hypotheses[0].finish_reason == "eos"


def test_beam_stream_sends_provisional_best_then_final_n_best(tiny_servers):
    with Client(tiny_servers["llama"].address) as client:
        chunks = list(client.stream(input_ids=list(range(40, 60)), max_new_tokens=6, num_beams=3,
                                    num_return_sequences=2))
    provisional = [c for c in chunks if c.provisional]
    final = chunks[-1]
    assert len(provisional) >= 1 and all(len(c.hypotheses) == 1 for c in provisional)
    assert [len(c.hypotheses[0].token_ids) for c in provisional] == list(range(1, len(provisional) + 1))
    assert not final.provisional and len(final.hypotheses) == 2
    assert final.finish_reason == "length" and final.usage.generated_tokens == 6
    assert final.hypotheses[0].score >= final.hypotheses[1].score


def _rebuild(best: tuple[list[int], bytes], update) -> tuple[list[int], bytes]:
    """BestUpdate applied as the proto comment spells it, without the SDK, as another language would."""
    ids, text = best
    assert update.keep_tokens <= len(ids) and update.keep_text_bytes <= len(text)
    ids = ids[:update.keep_tokens] + list(update.token_ids)
    return ids, text[:update.keep_text_bytes] + update.text_suffix.encode()


@pytest.mark.parametrize("n", [64, 256])
def test_beam_progress_bytes_grow_linearly_and_rebuild_the_best_every_step(tiny_servers, tiny_dirs, n):
    from transformers import AutoTokenizer

    from tokenloom_client.pb.tokenloom.v1 import generation_pb2 as pb
    from tokenloom_client.pb.tokenloom.v1.generation_pb2_grpc import GenerationStub

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"], local_files_only=True)
    request_id = "beam-bytes"
    params = dict(max_new_tokens=n, num_beams=4, num_return_sequences=2, ignore_eos=True)
    request = pb.GenerateRequest(request_id=request_id, input_ids=list(range(40, 60)),
                                 parameters=pb.GenerationParameters(**params))
    with grpc.insecure_channel(tiny_servers["llama"].address) as channel:
        messages = list(GenerationStub(channel).Generate(request, timeout=120))
    *provisional, final = messages
    assert all(m.provisional and m.HasField("best_update") and not m.hypotheses for m in provisional)
    assert not final.provisional and not final.HasField("best_update") and len(final.hypotheses) == 2
    assert [len(h.token_ids) for h in final.hypotheses] == [n, n] and len(provisional) == n - 1

    best, rebuilt, old_bytes, taken_back = ([], b""), [], 0, 0
    for step, message in enumerate(provisional, start=1):
        taken_back += message.best_update.keep_tokens < len(best[0])
        best = _rebuild(best, message.best_update)
        ids, text = best[0], best[1].decode()
        assert len(ids) == step and text == tokenizer.decode(ids, skip_special_tokens=True)
        rebuilt.append((ids, text))
        # The message this step sent before: the whole best as the one provisional hypothesis.
        old_bytes += pb.GenerateResponse(request_id=request_id, provisional=True,
                                         hypotheses=[pb.Hypothesis(token_ids=ids, text=text)]).ByteSize()
    new_bytes = sum(m.ByteSize() for m in provisional)
    # Per step: the request id (2 + its length), `provisional` (2), the BestUpdate's header (2), its
    # two counts (3 each) and one new token (id <= 3 bytes + 2, text + 2): 17 + the token's text.
    # 64 leaves ~45 bytes per step for text and for the tokens resent when the best switches beams
    # (measured: ~43 bytes a message in all, a third of the steps switching beams; 11 KB at n = 256,
    # where the whole best took 302 KB).
    assert new_bytes <= (len(request_id) + 2 + 64) * n, (new_bytes, taken_back)
    assert new_bytes * (n // 16) < old_bytes, (new_bytes, old_bytes)  # old: ~ n^2 / 2 tokens
    assert taken_back, "the best switched beams: the test covers updates that take tokens back"
    # The last message: the n best whole, once each, and the best again as token_ids / text.
    whole = sum(3 * len(h.token_ids) + len(h.text.encode()) + 16 for h in final.hypotheses)
    assert final.ByteSize() <= 2 * whole + 64

    with Client(tiny_servers["llama"].address) as client:  # the SDK hands out the same bests, whole
        chunks = list(client.stream(input_ids=list(range(40, 60)), request_id=request_id, **params))
    assert [(c.hypotheses[0].token_ids, c.hypotheses[0].text) for c in chunks if c.provisional] == rebuilt

    async def async_bests():
        async with AsyncClient(tiny_servers["llama"].address) as client:
            return [(c.hypotheses[0].token_ids, c.hypotheses[0].text)
                    async for c in client.stream(input_ids=list(range(40, 60)), **params) if c.provisional]

    assert asyncio.run(async_bests()) == rebuilt
    assert chunks[-1].hypotheses[0].token_ids == list(final.hypotheses[0].token_ids)


def test_top_n_alternatives_are_the_models_softmax(tiny_servers, tiny_dirs, hf_models):
    model, _ = hf_models(tiny_dirs["qwen2"])
    prompt = list(range(700, 730))
    with Client(tiny_servers["qwen2"].address) as client:
        result = client.generate(input_ids=prompt, max_new_tokens=6, top_n=5)
    assert len(result.top_tokens) == 6
    for step, alternatives in enumerate(result.top_tokens):
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + result.token_ids[:step]])).logits[0, -1]
        probs, ids = torch.softmax(logits.float(), dim=-1).topk(5)
        assert [a.token_id for a in alternatives] == ids.tolist()
        assert [a.prob for a in alternatives] == pytest.approx(probs.tolist(), abs=1e-5)
        assert all(x.logprob >= y.logprob for x, y in zip(alternatives, alternatives[1:]))
        assert alternatives[0].token_id == result.token_ids[step]  # greedy picks choice 1
        assert math.isclose(result.logprobs[step], alternatives[0].logprob, abs_tol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_score_equals_the_reference_formula(kind, tiny_servers, tiny_dirs, hf_models):
    model, _ = hf_models(tiny_dirs[kind])
    prompt, continuation = list(range(50, 90)), list(range(900, 925))
    with Client(tiny_servers[kind].address) as client:
        scored = client.score(prompt_ids=prompt, continuation_ids=continuation)
    per_token, total = sequence_logprob(model, prompt + continuation, len(prompt))
    assert scored.continuation_ids == continuation
    assert scored.logprobs == pytest.approx(per_token, abs=1e-4)
    assert scored.total_logprob == pytest.approx(total, abs=1e-4)


@pytest.mark.slow
def test_score_text_on_the_default_model(default_server, default_dir, hf_models):
    model, _ = hf_models(default_dir)
    with Client(default_server.address) as client:
        paris = client.score(prompt="The capital of France is", continuation=" Paris.")
        rome = client.score(prompt="The capital of France is", continuation=" Rome.")
    per_token, total = sequence_logprob(model, paris.prompt_ids + paris.continuation_ids, len(paris.prompt_ids))
    assert paris.total_logprob == pytest.approx(total, abs=1e-4)
    assert paris.total_logprob > rome.total_logprob


BAD = [
    (dict(num_beams=99), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(top_n=21), "top_n"),
    (dict(num_beams=3, do_sample=True), "num_beams"),
    (dict(num_beams=3, stop_strings=["x"]), "stop_strings"),
    (dict(num_beams=3, top_n=2), "top_n"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(do_sample=True, min_p=1.5), "min_p"),
    (dict(do_sample=True, typical_p=0.0), "typical_p"),
    (dict(stop_token_ids=[10**7]), "stop_token_ids"),
]


@pytest.mark.parametrize("params,field", BAD, ids=[f for _, f in BAD])
def test_bad_decoding_parameters_name_the_field(params, field, tiny_servers):
    with Client(tiny_servers["llama"].address) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate(input_ids=[1, 2, 3], max_new_tokens=4, **params)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
