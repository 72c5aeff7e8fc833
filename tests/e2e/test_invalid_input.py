"""Bad input gets INVALID_ARGUMENT naming the field, while other streams go on unharmed."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tokenloom_client import AsyncClient

PROMPT = list(range(500, 520))

# (request, field the message must name)
BAD = [
    (dict(input_ids=PROMPT, do_sample=True, temperature=-0.5), "temperature"),
    (dict(input_ids=PROMPT, do_sample=True, temperature=0.0), "temperature"),
    (dict(input_ids=PROMPT, do_sample=True, temperature=float("nan")), "temperature"),
    (dict(input_ids=PROMPT, top_p=0.0), "top_p"),
    (dict(input_ids=PROMPT, top_p=1.5), "top_p"),
    (dict(input_ids=PROMPT, top_k=-1), "top_k"),
    (dict(prompt=""), "prompt"),
    (dict(input_ids=[10] * 600), "prompt"),  # the tiny models' context is 512
    (dict(input_ids=[10**7]), "input_ids"),
    (dict(input_ids=PROMPT, max_new_tokens=0), "max_new_tokens"),
    (dict(input_ids=PROMPT, max_new_tokens=1000), "max_new_tokens"),
    (dict(input_ids=PROMPT, max_length=10), "max_length"),
    (dict(input_ids=PROMPT, stop_strings=[""]), "stop_strings"),
]


async def _collect(client, **request):
    chunks = [c async for c in client.stream(**request)]
    return [t for c in chunks for t in c.token_ids]


async def _bad_and_good(address):
    good = [dict(input_ids=list(range(i, i + 30)), max_new_tokens=30, seed=i, do_sample=bool(i % 2)) for i in range(4)]
    async with AsyncClient(address) as client:
        solo = [await _collect(client, **g) for g in good]
        good_tasks = [asyncio.create_task(_collect(client, **g)) for g in good]
        errors = []
        for request, _ in BAD:
            await asyncio.sleep(0.01)
            try:
                await client.generate(**request)
                errors.append(None)
            except grpc.aio.AioRpcError as exc:
                errors.append(exc)
        together = await asyncio.gather(*good_tasks)
    return solo, together, errors


def test_bad_parameters_are_rejected_by_field_while_others_stream(tiny_servers):
    solo, together, errors = asyncio.run(_bad_and_good(tiny_servers["llama"].address))
    for (request, field), err in zip(BAD, errors):
        assert err is not None, f"{request} was accepted"
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, err.code())
        assert field in err.details(), (request, err.details())
    assert together == solo


def test_both_prompt_and_input_ids_is_rejected(tiny_servers):
    """The SDK refuses this itself; a raw gRPC client gets INVALID_ARGUMENT from the server."""
    from tokenloom_client.pb.tokenloom.v1 import generation_pb2 as pb
    from tokenloom_client.pb.tokenloom.v1 import generation_pb2_grpc as pb_grpc

    with grpc.insecure_channel(tiny_servers["llama"].address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GenerateUnary(pb.GenerateRequest(prompt="hi", input_ids=[1, 2, 3]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only one of prompt, messages or input_ids" in err.value.details()


def test_chat_messages_render_with_the_models_template(tiny_servers):
    """Tiny models carry the default tokenizer's chat template, so messages work there too."""
    async def run():
        async with AsyncClient(tiny_servers["llama"].address) as client:
            return await client.generate(messages=[{"role": "user", "content": "hi"}], max_new_tokens=3)

    assert len(asyncio.run(run()).token_ids) == 3
