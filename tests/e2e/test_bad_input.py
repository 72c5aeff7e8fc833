"""Bad input over raw gRPC: each kind gets its exact status and a message naming the field, while
valid streams beside it go on token for token; random requests never crash or hang the server.

Raw stubs, not the SDK, so that the SDK's own client-side checks cannot hide what the server does.
"""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import own_server
from tokenloom_client.pb.tokenloom.v1 import generation_pb2 as pb
from tokenloom_client.pb.tokenloom.v1 import generation_pb2_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PROMPT = list(range(500, 520))
CONTEXT = 512  # the tiny models' max_position_embeddings
HUGE_ID = 10**7  # above any vocabulary


def gen(params: dict | None = None, **request) -> pb.GenerateRequest:
    if not any(k in request for k in ("prompt", "messages", "input_ids")) and not request.pop("no_input", False):
        request["input_ids"] = PROMPT
    request.pop("no_input", None)
    return pb.GenerateRequest(parameters=pb.GenerationParameters(**{"max_new_tokens": 4, **(params or {})}), **request)


def chat(*pairs: tuple[str, str]) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=r, content=c) for r, c in pairs]


# (name, RPC, request, status code, field the message must name); docs/api.md's bad-input table mirrors it.
BAD = [
    ("temperature NaN", "GenerateUnary", gen(dict(do_sample=True, temperature=math.nan)), INVALID, "temperature"),
    ("temperature inf", "GenerateUnary", gen(dict(do_sample=True, temperature=math.inf)), INVALID, "temperature"),
    ("temperature negative", "GenerateUnary", gen(dict(do_sample=True, temperature=-0.5)), INVALID, "temperature"),
    ("temperature 0 when sampling", "GenerateUnary", gen(dict(do_sample=True, temperature=0.0)), INVALID, "temperature"),
    ("temperature huge", "GenerateUnary", gen(dict(do_sample=True, temperature=1e6)), INVALID, "temperature"),
    ("top_p 0", "GenerateUnary", gen(dict(do_sample=True, top_p=0.0)), INVALID, "top_p"),
    ("top_p > 1", "GenerateUnary", gen(dict(do_sample=True, top_p=1.5)), INVALID, "top_p"),
    ("top_p negative", "GenerateUnary", gen(dict(do_sample=True, top_p=-0.1)), INVALID, "top_p"),
    ("top_p NaN", "GenerateUnary", gen(dict(do_sample=True, top_p=math.nan)), INVALID, "top_p"),
    ("top_k negative", "GenerateUnary", gen(dict(do_sample=True, top_k=-1)), INVALID, "top_k"),
    ("empty input", "GenerateUnary", gen(no_input=True), INVALID, "prompt"),
    ("prompt + messages", "GenerateUnary", gen(prompt="hi", messages=chat(("user", "hi"))), INVALID, "prompt"),
    ("prompt + input_ids", "GenerateUnary", gen(prompt="hi", input_ids=[1, 2]), INVALID, "prompt"),
    ("negative token id", "GenerateUnary", gen(input_ids=[5, -3, 7]), INVALID, "input_ids"),
    ("token id >= vocab", "GenerateUnary", gen(input_ids=[5, HUGE_ID]), INVALID, "input_ids"),
    ("prompt over the context", "GenerateUnary", gen(input_ids=[10] * (CONTEXT + 88)), INVALID, "prompt"),
    ("prompt fills the context", "GenerateUnary", gen(input_ids=[10] * CONTEXT), INVALID, "prompt"),
    ("max_new_tokens past the context", "GenerateUnary", gen(dict(max_new_tokens=CONTEXT)), INVALID, "max_new_tokens"),
    ("max_new_tokens above the server limit", "GenerateUnary", gen(dict(max_new_tokens=10**6)), INVALID,
     "max_new_tokens"),
    ("max_new_tokens 0", "GenerateUnary", gen(dict(max_new_tokens=0)), INVALID, "max_new_tokens"),
    ("max_new_tokens negative", "GenerateUnary", gen(dict(max_new_tokens=-5)), INVALID, "max_new_tokens"),
    ("max_length <= prompt", "GenerateUnary", gen(dict(max_new_tokens=None, max_length=len(PROMPT))), INVALID,
     "max_length"),
    ("max_length over the context", "GenerateUnary", gen(dict(max_new_tokens=None, max_length=CONTEXT + 1)), INVALID,
     "max_length"),
    ("too many chat messages", "GenerateUnary", gen(messages=chat(*[("user", "x")] * 257)), INVALID, "messages"),
    ("chat message with empty role", "GenerateUnary", gen(messages=chat(("", "hi"))), INVALID, "messages"),
    ("too many stop strings", "GenerateUnary", gen(dict(stop_strings=[f"s{i}" for i in range(17)])), INVALID,
     "stop_strings"),
    ("stop string too long", "GenerateUnary", gen(dict(stop_strings=["x" * 257])), INVALID, "stop_strings"),
    ("empty stop string", "GenerateUnary", gen(dict(stop_strings=[""])), INVALID, "stop_strings"),
    ("too many stop_token_ids", "GenerateUnary", gen(dict(stop_token_ids=list(range(1, 18)))), INVALID,
     "stop_token_ids"),
    ("stop_token_ids >= vocab", "GenerateUnary", gen(dict(stop_token_ids=[HUGE_ID])), INVALID, "stop_token_ids"),
    ("stop_token_ids negative", "GenerateUnary", gen(dict(stop_token_ids=[-1])), INVALID, "stop_token_ids"),
    ("num_beams over the limit", "GenerateUnary", gen(dict(num_beams=9)), INVALID, "num_beams"),
    ("num_beams 0", "GenerateUnary", gen(dict(num_beams=0)), INVALID, "num_beams"),
    ("num_return_sequences > num_beams", "GenerateUnary", gen(dict(num_beams=2, num_return_sequences=3)), INVALID,
     "num_return_sequences"),
    ("num_return_sequences over the limit", "GenerateUnary", gen(dict(do_sample=True, num_return_sequences=9)),
     INVALID, "num_return_sequences"),
    ("greedy with num_return_sequences > 1", "GenerateUnary", gen(dict(num_return_sequences=2)), INVALID,
     "num_return_sequences"),
    ("top_n > 20", "GenerateUnary", gen(dict(top_n=21)), INVALID, "top_n"),
    ("top_n negative", "GenerateUnary", gen(dict(top_n=-1)), INVALID, "top_n"),
    ("no_repeat_ngram_size negative", "GenerateUnary", gen(dict(no_repeat_ngram_size=-1)), INVALID,
     "no_repeat_ngram_size"),
    ("repetition_penalty 0", "GenerateUnary", gen(dict(repetition_penalty=0.0)), INVALID, "repetition_penalty"),
    ("repetition_penalty NaN", "GenerateUnary", gen(dict(repetition_penalty=math.nan)), INVALID,
     "repetition_penalty"),
    ("min_p > 1", "GenerateUnary", gen(dict(do_sample=True, min_p=1.5)), INVALID, "min_p"),
    ("min_p negative", "GenerateUnary", gen(dict(do_sample=True, min_p=-0.1)), INVALID, "min_p"),
    ("typical_p 0", "GenerateUnary", gen(dict(do_sample=True, typical_p=0.0)), INVALID, "typical_p"),
    ("typical_p NaN", "GenerateUnary", gen(dict(do_sample=True, typical_p=math.nan)), INVALID, "typical_p"),
    ("min_new_tokens negative", "GenerateUnary", gen(dict(min_new_tokens=-1)), INVALID, "min_new_tokens"),
    ("length_penalty NaN", "GenerateUnary", gen(dict(num_beams=2, length_penalty=math.nan)), INVALID,
     "length_penalty"),
    ("length_penalty huge", "GenerateUnary", gen(dict(num_beams=2, length_penalty=1e30)), INVALID, "length_penalty"),
    ("length_penalty hugely negative", "GenerateUnary", gen(dict(num_beams=2, length_penalty=-1e30)), INVALID,
     "length_penalty"),
    ("early_stopping unknown enum", "GenerateUnary", gen(dict(num_beams=2, early_stopping=7)), INVALID,
     "early_stopping"),
    ("beams with do_sample", "GenerateUnary", gen(dict(num_beams=3, do_sample=True)), INVALID, "num_beams"),
    ("beams with stop_strings", "GenerateUnary", gen(dict(num_beams=3, stop_strings=["x"])), INVALID, "stop_strings"),
    ("beams with top_n", "GenerateUnary", gen(dict(num_beams=3, top_n=2)), INVALID, "top_n"),
    ("bad params on a stream", "Generate", gen(dict(do_sample=True, temperature=-1.0)), INVALID, "temperature"),
    ("Score without a continuation", "Score", pb.ScoreRequest(prompt_ids=PROMPT), INVALID, "continuation"),
    ("Score with continuation and continuation_ids", "Score",
     pb.ScoreRequest(prompt_ids=PROMPT, continuation="hi", continuation_ids=[5]), INVALID, "continuation"),
    ("Score over the context", "Score", pb.ScoreRequest(prompt_ids=[10] * 500, continuation_ids=[10] * 20), INVALID,
     "continuation"),
    ("Score continuation_ids >= vocab", "Score", pb.ScoreRequest(prompt_ids=PROMPT, continuation_ids=[HUGE_ID]),
     INVALID, "continuation_ids"),
    ("Score with no prompt", "Score", pb.ScoreRequest(continuation_ids=[5]), INVALID, "prompt"),
    ("Score prompt_ids >= vocab", "Score", pb.ScoreRequest(prompt_ids=[HUGE_ID], continuation_ids=[5]), INVALID,
     "prompt_ids"),
]

# Valid streams that run while the bad requests arrive: greedy and seeded sampling, long enough to overlap.
GOOD = [
    pb.GenerateRequest(input_ids=list(range(i + 3, i + 33)), parameters=pb.GenerationParameters(
        max_new_tokens=120, ignore_eos=True, do_sample=bool(i % 2), seed=i, top_k=0 if i == 3 else None))
    for i in range(4)
]


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    with own_server(tiny_dirs["llama"], "bad-input", tmp_path_factory, "--max-num-seqs", "16") as proc:
        yield proc


async def _stream_tokens(stub, request: pb.GenerateRequest, started: asyncio.Event | None = None) -> list[int]:
    tokens = []
    async for chunk in stub.Generate(request, timeout=60):
        tokens.extend(chunk.token_ids)
        if started is not None and tokens:
            started.set()
    return tokens


async def _call(stub, method: str, request) -> grpc.aio.AioRpcError | None:
    try:
        if method == "Generate":
            async for _ in stub.Generate(request, timeout=20):
                pass
        else:
            await getattr(stub, method)(request, timeout=20)
    except grpc.aio.AioRpcError as exc:
        return exc
    return None


async def _bad_beside_good(address: str):
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        info = await stub.ModelInfo(pb.ModelInfoRequest())
        solo = [await _stream_tokens(stub, g) for g in GOOD]
        started = [asyncio.Event() for _ in GOOD]
        good = [asyncio.create_task(_stream_tokens(stub, g, s)) for g, s in zip(GOOD, started)]
        await asyncio.gather(*(s.wait() for s in started))
        errors = await asyncio.gather(*(_call(stub, method, request) for _, method, request, _, _ in BAD))
        overlapped = sum(not t.done() for t in good)
        together = await asyncio.gather(*good)
    return info, solo, together, errors, overlapped


def test_bad_requests_get_their_status_naming_the_field_while_valid_streams_go_on(server):
    info, solo, together, errors, overlapped = asyncio.run(_bad_beside_good(server.address))
    assert info.context_length == CONTEXT and info.vocab_size < HUGE_ID
    assert info.limits.max_num_beams == 8 and info.limits.max_top_n == 20
    # Every ceiling a client may read, as the server's defaults and this server's flags make them.
    assert info.limits == pb.Limits(
        max_new_tokens=4096, default_max_new_tokens=256, max_stop_strings=16, max_stop_string_length=256,
        max_input_tokens=CONTEXT - 1, max_num_seqs=16, kv_cache_tokens=8192, max_num_beams=8,
        max_num_return_sequences=8, max_top_n=20,
    ), info.limits
    wrong = []
    for (name, _, _, code, field), err in zip(BAD, errors):
        if err is None:
            wrong.append(f"{name}: accepted")
        elif err.code() != code or field not in err.details():
            wrong.append(f"{name}: {err.code().name} {err.details()!r}, want {code.name} naming {field!r}")
    assert not wrong, "\n".join(wrong)
    assert overlapped > 0, "the valid streams ended before the bad requests were answered"
    assert together == solo
    assert all(len(t) == 120 for t in solo)


def test_the_chat_template_accepts_any_role(server):
    """SmolLM2's template renders any role as `<|im_start|>{role}`, so an unknown role is not bad input
    (and is therefore not in BAD): the server must answer it rather than reject it."""
    with grpc.insecure_channel(server.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        result = stub.GenerateUnary(gen(messages=chat(("wizard", "hi"))), timeout=20)
    assert len(result.token_ids) == 4


# --- random requests: never a crash, never a hang, always a status -------------------------------------------

_INT32 = st.integers(-(2**31), 2**31 - 1)
_VOCAB = 49152  # the tiny models share the default tokenizer
_BAD_ID = st.one_of(st.integers(-(2**31), -1), st.integers(_VOCAB, 2**31 - 1))
_GOOD_ID = st.integers(0, _VOCAB - 1)
_IDS = st.one_of(*[_GOOD_ID] * 8, _BAD_ID)  # one draw in nine is out of the vocabulary
_FLOAT = st.floats(width=32)  # NaN, +-inf, extremes and subnormals included
_TEXT = st.text(max_size=40)  # any unicode, control characters and NULs included


def _sometimes_wild(sane, wild, tame: bool):
    """Unset, a plausible value, or (in a wild request, about one time in five) anything of the field's type."""
    return st.one_of(st.none(), sane) if tame else st.one_of(st.none(), sane, sane, sane, wild)


_FLOAT_FIELDS = {
    "temperature": st.floats(0.05, 3.0), "top_p": st.floats(0.05, 1.0), "min_p": st.floats(0.0, 0.5),
    "typical_p": st.floats(0.2, 1.0), "repetition_penalty": st.floats(0.5, 2.0),
    "length_penalty": st.floats(-2.0, 3.0),
}
_INT_FIELDS = {
    "top_k": st.integers(0, 100), "num_beams": st.integers(1, 4), "num_return_sequences": st.integers(1, 4),
    "top_n": st.integers(0, 5), "no_repeat_ngram_size": st.integers(0, 3), "min_new_tokens": st.integers(0, 10),
}


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    request = pb.GenerateRequest()
    # Half the requests are tame (one input, plausible values: mostly accepted), half wild.
    tame = draw(st.booleans())
    text, ids = (st.text(min_size=1, max_size=40), st.lists(_GOOD_ID, min_size=1, max_size=24)) if tame else (
        _TEXT, st.lists(_IDS, max_size=24))
    kinds = ["prompt", "input_ids", "messages"] if tame else ["prompt", "input_ids", "messages", "none", "several"]
    inputs = draw(st.sampled_from(kinds))
    several = inputs == "several"
    if inputs == "prompt" or several and draw(st.booleans()):
        request.prompt = draw(text)
    if inputs == "messages" or several and draw(st.booleans()):
        roles = st.sampled_from(["user", "system", "assistant"] + ([] if tame else ["", "wizard"]))
        for role, content in draw(st.lists(st.tuples(roles, _TEXT), min_size=int(tame), max_size=4)):
            request.messages.add(role=role, content=content)
    if inputs == "input_ids" or several:
        request.input_ids.extend(draw(ids))
    p = request.parameters
    # Valid requests stay cheap: at most 8 new tokens (or a max_length that leaves few), unless
    # the value is one that the server must reject anyway.
    length = draw(st.sampled_from(["new"] if tame else ["new", "new", "new", "length", "both"]))
    if length in ("new", "both"):
        p.max_new_tokens = draw(st.integers(1, 8) if tame else st.one_of(
            *[st.integers(1, 8)] * 4, st.sampled_from([-(2**31), -1, 0, 10**6, 2**31 - 1])))
    if length in ("length", "both"):
        p.max_length = draw(st.one_of(st.integers(-2, 30), st.sampled_from([513, 2**31 - 1])))
    p.do_sample = draw(st.booleans())
    p.ignore_eos = draw(st.booleans())
    for name, sane in _FLOAT_FIELDS.items():
        value = draw(_sometimes_wild(sane, _FLOAT, tame))
        if value is not None:
            setattr(p, name, value)
    for name, sane in _INT_FIELDS.items():
        value = draw(_sometimes_wild(sane, _INT32, tame))
        if value is not None:
            setattr(p, name, value)
    seed = draw(_sometimes_wild(st.integers(0, 1000), st.integers(0, 2**64 - 1), tame))
    if seed is not None:
        p.seed = seed
    p.early_stopping = draw(st.sampled_from([0, 1, 2] + ([] if tame else [3, -1])))
    p.stop_strings.extend(draw(st.lists(st.text(min_size=int(tame), max_size=6), max_size=3)))
    p.stop_token_ids.extend(draw(st.lists(_GOOD_ID if tame else _IDS, max_size=3)))
    return request


@st.composite
def score_requests(draw) -> pb.ScoreRequest:
    text_prompt, text_continuation = draw(st.booleans()), draw(st.booleans())
    return pb.ScoreRequest(prompt=draw(_TEXT) if text_prompt else "",
                           prompt_ids=draw(st.lists(_IDS, max_size=16 if not text_prompt else 1)),
                           continuation=draw(_TEXT) if text_continuation else "",
                           continuation_ids=draw(st.lists(_IDS, max_size=8 if not text_continuation else 1)))


_NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(request=st.one_of(generate_requests(), score_requests()), streamed=st.booleans())
def test_random_requests_always_end_with_a_result_or_a_status(request, streamed, stub, server):
    try:
        if isinstance(request, pb.ScoreRequest):
            stub.Score(request, timeout=20)
        elif streamed:
            chunks = list(stub.Generate(request, timeout=20))
            assert chunks and chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        else:
            result = stub.GenerateUnary(request, timeout=20)
            assert result.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    except grpc.RpcError as exc:
        assert exc.code() not in _NEVER, f"{exc.code().name}: {exc.details()}\n{server.log_tail()}"
        assert exc.details(), exc.code()
    assert server.proc.poll() is None, server.log_tail()


def test_the_server_still_answers_after_the_random_requests(stub, server):
    assert server.proc.poll() is None, server.log_tail()
    assert stub.ModelInfo(pb.ModelInfoRequest(), timeout=10).context_length == CONTEXT
