"""Generation over real gRPC on loopback, compared token for token with HF `generate`."""

from __future__ import annotations

import asyncio
import random
import shutil

import grpc
import pytest

from conftest import own_server
from hf_reference import chat_ids, hf_generate
from tiny_models import KINDS
from tokenloom_client import AsyncClient, Client

# Different prompt lengths and output lengths, so requests join and leave at different steps.
PROMPT_LENGTHS = [3, 9, 17, 31, 64, 100, 150, 200, 5]
MAX_NEW = [12, 30, 7, 25, 16, 40, 9, 20, 33]


async def _run_all(address: str, requests: list[dict], stagger: float = 0.02, stream: bool = True):
    """Send every request concurrently, request i after i * stagger seconds; return results in order."""

    async def one(client, i, req):
        await asyncio.sleep(i * stagger)
        if stream and i % 2 == 0:
            chunks = [c async for c in client.stream(**req)]
            ids = [t for c in chunks for t in c.token_ids]
            return ids, chunks[-1].finish_reason, "".join(c.text for c in chunks)
        result = await client.generate(**req)
        return result.token_ids, result.finish_reason, result.text

    async with AsyncClient(address) as client:
        return await asyncio.gather(*(one(client, i, r) for i, r in enumerate(requests)))


def run_all(address, requests, **kw):
    return asyncio.run(_run_all(address, requests, **kw))


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_hf_generate_inside_a_changing_batch(kind, tiny_servers, tiny_dirs, hf_models):
    model, tok = hf_models(tiny_dirs[kind])
    rng = random.Random(kind)
    prompts = [[rng.randrange(len(tok)) for _ in range(n)] for n in PROMPT_LENGTHS]
    requests = [dict(input_ids=p, max_new_tokens=m) for p, m in zip(prompts, MAX_NEW)]
    results = run_all(tiny_servers[kind].address, requests)
    for prompt, m, (ids, reason, _) in zip(prompts, MAX_NEW, results):
        expected = hf_generate(model, prompt, do_sample=False, max_new_tokens=m)
        assert ids == expected, f"prompt of {len(prompt)} tokens diverged from HF generate"
        assert reason == ("eos" if expected[-1] in tok.all_special_ids and len(expected) < m else "length")


def test_dummy_weights_serve_like_the_checkpoint_built_from_the_same_seed(tiny_dirs, hf_models, tmp_path_factory):
    """`--load-format dummy` on a directory holding only config.json and a tokenizer: the model is the
    architecture's random init from seed 0, which is how the tiny checkpoint was built."""
    model, tok = hf_models(tiny_dirs["llama"])
    config_only = tmp_path_factory.mktemp("config-only")
    for item in tiny_dirs["llama"].iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, config_only / item.name)
    prompts = [[random.Random(n).randrange(len(tok)) for _ in range(n)] for n in (5, 40)]
    with own_server(config_only, "dummy", tmp_path_factory, "--load-format", "dummy") as server:
        with Client(server.address) as client:
            assert "dummy" in client.model_info().model_name
            for prompt in prompts:
                got = client.generate(input_ids=prompt, max_new_tokens=12).token_ids
                assert got == hf_generate(model, prompt, do_sample=False, max_new_tokens=12)


DEFAULT_QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "Explain in one sentence what a CPU does, and then give an example of a task that it performs every day.",
    "Hi",
    "List the days of the week.",
    "Translate 'good morning' into Spanish.",
]


@pytest.mark.slow
def test_default_model_greedy_matches_hf_generate(default_server, default_dir, hf_models):
    model, tok = hf_models(default_dir)
    max_new = [10, 24, 18, 8, 30, 12, 20, 16]
    requests = [dict(messages=[{"role": "user", "content": q}], max_new_tokens=m) for q, m in zip(DEFAULT_QUESTIONS, max_new)]
    results = run_all(default_server.address, requests, stagger=0.1)
    for q, m, (ids, reason, text) in zip(DEFAULT_QUESTIONS, max_new, results):
        expected = hf_generate(model, chat_ids(tok, q), do_sample=False, max_new_tokens=m)
        assert ids == expected, f"{q!r}: {tok.decode(ids)!r} != HF {tok.decode(expected)!r}"
        assert text == tok.decode(expected, skip_special_tokens=True)


@pytest.mark.slow
def test_default_model_answers_and_stops_at_eos(default_server, default_dir, hf_models):
    model, tok = hf_models(default_dir)
    with Client(default_server.address) as client:
        result = client.generate(messages=[{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=40)
    assert "Paris" in result.text
    assert result.finish_reason == "eos"
    assert result.token_ids[-1] in model.generation_config.eos_token_id if isinstance(
        model.generation_config.eos_token_id, list) else result.token_ids[-1] == model.generation_config.eos_token_id
    expected = hf_generate(model, chat_ids(tok, "What is the capital of France?"), do_sample=False, max_new_tokens=40)
    assert result.token_ids == expected
    assert result.usage.generated_tokens == len(expected)


@pytest.mark.slow
def test_stop_strings_match_hf_generate(default_server, default_dir, hf_models):
    model, tok = hf_models(default_dir)
    question = "What is the capital of France?"
    for stop in ["Paris", "is Pa", "capital"]:
        with Client(default_server.address) as client:
            result = client.generate(messages=[{"role": "user", "content": question}], max_new_tokens=40, stop_strings=[stop])
        expected = hf_generate(model, chat_ids(tok, question), do_sample=False, max_new_tokens=40,
                               stop_strings=[stop], tokenizer=tok)
        assert result.token_ids == expected, stop
        assert result.finish_reason == "stop_string"
        assert stop in result.text and result.text == tok.decode(expected, skip_special_tokens=True)


def test_max_length_counts_the_prompt_and_max_new_tokens_wins(tiny_servers, tiny_dirs, hf_models):
    model, tok = hf_models(tiny_dirs["llama"])
    prompt = list(range(100, 120))
    with Client(tiny_servers["llama"].address) as client:
        by_length = client.generate(input_ids=prompt, max_length=len(prompt) + 7)
        by_new = client.generate(input_ids=prompt, max_new_tokens=5)
        both = client.generate(input_ids=prompt, max_new_tokens=4, max_length=len(prompt) + 20)
        with pytest.raises(grpc.RpcError) as err:
            client.generate(input_ids=prompt, max_length=len(prompt))
    assert by_length.token_ids == hf_generate(model, prompt, do_sample=False, max_length=len(prompt) + 7)
    assert len(by_length.token_ids) == 7 and by_length.finish_reason == "length"
    assert by_new.token_ids == hf_generate(model, prompt, do_sample=False, max_new_tokens=5)
    assert both.token_ids == hf_generate(model, prompt, do_sample=False, max_new_tokens=4, max_length=len(prompt) + 20)
    assert len(both.token_ids) == 4
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_length" in err.value.details()


SAMPLED = dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.95)


def test_seeded_sample_is_the_same_alone_and_in_a_busy_batch(tiny_servers):
    address = tiny_servers["llama"].address
    target = dict(input_ids=list(range(300, 340)), max_new_tokens=40, seed=1234, **SAMPLED)
    alone = run_all(address, [target])[0]
    others = [dict(input_ids=list(range(i, i + 5 + 7 * i)), max_new_tokens=20 + i,
                   **(dict(do_sample=True, seed=i, temperature=1.3) if i % 2 else {})) for i in range(15)]
    busy = run_all(address, others[:7] + [target] + others[7:], stagger=0.01)
    assert busy[7][0] == alone[0]
    # A different seed must change the sample (else the seed does nothing).
    other_seed = run_all(address, [dict(target, seed=99)])[0]
    assert other_seed[0] != alone[0]


def test_every_uint64_seed_works_and_each_seed_is_its_own_stream(tiny_servers):
    base = dict(input_ids=list(range(300, 330)), max_new_tokens=24, **SAMPLED)
    with Client(tiny_servers["llama"].address) as client:
        top = client.generate(**base, seed=2**64 - 1, num_return_sequences=2)  # was INTERNAL: seed + 1 overflowed
        assert top.finish_reason == "length" and len(top.hypotheses) == 2
        assert top.hypotheses[0].token_ids != top.hypotheses[1].token_ids, "the two samples draw apart"
        assert client.generate(**base, seed=2**64 - 1, num_return_sequences=2).hypotheses == top.hypotheses
        # All 64 bits count: seeds that agree in their low 32 bits give different tokens.
        low, high = (client.generate(**base, seed=s).token_ids for s in (0, 2**32))
        assert low != high


def test_a_single_sequence_result_lists_it_among_the_hypotheses(tiny_servers):
    with Client(tiny_servers["llama"].address) as client:
        result = client.generate(input_ids=list(range(40, 60)), max_new_tokens=9)
        [only] = result.hypotheses
        assert (only.token_ids, only.text, only.finish_reason) == (result.token_ids, result.text, result.finish_reason)
        assert only.score == pytest.approx(sum(result.logprobs), abs=1e-4)
        last = list(client.stream(input_ids=list(range(40, 60)), max_new_tokens=9))[-1]
        assert [h.token_ids for h in last.hypotheses] == [result.token_ids]


def test_32_concurrent_streams_each_equal_their_solo_output(tiny_servers):
    address = tiny_servers["qwen2"].address
    requests = [
        dict(input_ids=[(7 * i + j) % 5000 + 10 for j in range(4 + 3 * i)], max_new_tokens=10 + (i * 5) % 30,
             **(dict(SAMPLED, seed=i) if i % 2 else {}))
        for i in range(32)
    ]
    solo = [run_all(address, [r])[0] for r in requests]
    together = run_all(address, requests, stagger=0.0)
    assert [r[0] for r in together] == [s[0] for s in solo]
    assert all(r[1] in ("length", "eos") for r in together)


NON_ASCII = ["Écris une phrase en français avec des accents: été, garçon, où.",
             "用中文写一句话。", "Write three emoji: 🎉🚀🌍", "Привет! Как дела?"]


def test_streamed_text_deltas_concatenate_to_the_full_decode(tiny_servers, tiny_dirs, hf_models, default_dir):
    """Random models emit arbitrary byte-level pieces, the hardest case for UTF-8 boundaries."""
    _, tok = hf_models(tiny_dirs["gpt2"])
    requests = [dict(prompt=p, max_new_tokens=60, do_sample=True, seed=s, temperature=1.5, top_k=0)
                for s, p in enumerate(NON_ASCII * 2)]
    results = run_all(tiny_servers["gpt2"].address, requests, stream=True)
    for ids, _, text in results:
        full = tok.decode(ids, skip_special_tokens=True)
        assert text == full


@pytest.mark.slow
def test_default_model_streams_non_ascii_text_whole(default_server, default_dir, hf_models):
    _, tok = hf_models(default_dir)
    requests = [dict(messages=[{"role": "user", "content": p}], max_new_tokens=40) for p in NON_ASCII]

    async def streams():
        async with AsyncClient(default_server.address) as client:

            async def collect(request):
                return [c async for c in client.stream(**request)]

            return await asyncio.gather(*(collect(r) for r in requests))

    for chunks in asyncio.run(streams()):
        ids = [t for c in chunks for t in c.token_ids]
        assert "".join(c.text for c in chunks) == tok.decode(ids, skip_special_tokens=True)
        # Only a cut at max_new_tokens mid-character may leave U+FFFD, and only in the final flush.
        assert all("\ufffd" not in c.text for c in chunks[:-1])
