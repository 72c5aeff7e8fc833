"""The SDK installs without the server's stack, and rejects bad arguments before any RPC."""

from __future__ import annotations

import asyncio
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenloom_client import (
    AsyncClient,
    Client,
    GenerationResult,
    Hypothesis,
    ScoreResult,
    StreamChunk,
    TopToken,
    Usage,
    convert,
)
from tokenloom_client import __main__ as cli
from tokenloom_client.best_so_far import BestSoFar
from tokenloom_client.pb.tokenloom.v1 import generation_pb2 as pb

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"
# Nothing listens on port 1, so reaching the network would fail with UNAVAILABLE
# instead of the TypeError these tests expect.
UNUSED_TARGET = "127.0.0.1:1"


def test_sdk_and_cli_import_without_torch_or_transformers(tmp_path):
    # A None entry in sys.modules makes any `import torch` raise ImportError.
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "import tokenloom_client, tokenloom_client.__main__")
    env = {**os.environ, "PYTHONPATH": str(CLIENT_DIR)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_client_rejects_unknown_parameter_by_name():
    with Client(UNUSED_TARGET) as client:
        with pytest.raises(TypeError, match="temprature"):
            client.generate("hi", temprature=0.5)
        with pytest.raises(TypeError, match="temprature"):
            client.stream("hi", temprature=0.5)


def test_async_client_rejects_unknown_parameter_by_name():
    async def scenario():
        async with AsyncClient(UNUSED_TARGET) as client:
            with pytest.raises(TypeError, match="beam_width"):
                await client.generate("hi", beam_width=4)
            with pytest.raises(TypeError, match="beam_width"):
                client.stream("hi", beam_width=4)

    asyncio.run(scenario())


# -- decoding parameters -------------------------------------------------------------------


@pytest.mark.parametrize("value,enum", [(False, pb.EARLY_STOPPING_FALSE), (True, pb.EARLY_STOPPING_TRUE),
                                        ("never", pb.EARLY_STOPPING_NEVER)])
def test_early_stopping_takes_hf_values(value, enum):
    assert convert.build_parameters({"early_stopping": value}).early_stopping == enum


@pytest.mark.parametrize("value", ["sometimes", "NEVER", "true", 1, 0, 2])
def test_early_stopping_rejects_anything_else_by_name(value):
    with Client(UNUSED_TARGET) as client:
        with pytest.raises(ValueError, match="early_stopping") as err:
            client.generate("hi", num_beams=2, early_stopping=value)
        assert repr(value) in str(err.value)
        with pytest.raises(ValueError, match="early_stopping"):
            client.stream("hi", num_beams=2, early_stopping=value)


def test_new_parameters_pass_through_and_none_stays_unset():
    message = convert.build_parameters(dict(
        num_beams=4, length_penalty=0.5, num_return_sequences=2, no_repeat_ngram_size=3,
        repetition_penalty=1.2, min_new_tokens=5, stop_token_ids=[7, 8], ignore_eos=True,
        top_n=None, min_p=None, typical_p=None))
    assert (message.num_beams, message.num_return_sequences, message.no_repeat_ngram_size) == (4, 2, 3)
    assert message.length_penalty == pytest.approx(0.5)
    assert message.repetition_penalty == pytest.approx(1.2)
    assert message.min_new_tokens == 5 and message.ignore_eos
    assert list(message.stop_token_ids) == [7, 8]
    assert not any(message.HasField(name) for name in ("top_n", "min_p", "typical_p"))


def test_a_badly_typed_parameter_is_named():
    with pytest.raises(TypeError, match="top_n"):
        convert.build_parameters({"top_n": "3"})
    with pytest.raises(TypeError, match="stop_token_ids"):
        convert.build_parameters({"stop_token_ids": ["eos"]})


# -- Score ----------------------------------------------------------------------------------

BAD_SCORE_ARGS = [
    (dict(continuation="x"), "prompt, prompt_ids .got neither"),
    (dict(prompt="a", prompt_ids=[1], continuation="x"), "prompt, prompt_ids .got both"),
    (dict(prompt="a"), "continuation, continuation_ids .got neither"),
    (dict(prompt_ids=[1], continuation="x", continuation_ids=[2]), "continuation, continuation_ids .got both"),
]


@pytest.mark.parametrize("kwargs,message", BAD_SCORE_ARGS)
def test_score_needs_one_prompt_and_one_continuation(kwargs, message):
    # UNAVAILABLE, not TypeError, would come back if an RPC were attempted.
    with Client(UNUSED_TARGET) as client:
        with pytest.raises(TypeError, match=message):
            client.score(**kwargs)


@pytest.mark.parametrize("kwargs,message", BAD_SCORE_ARGS)
def test_async_score_needs_one_prompt_and_one_continuation(kwargs, message):
    async def scenario():
        async with AsyncClient(UNUSED_TARGET) as client:
            with pytest.raises(TypeError, match=message):
                await client.score(**kwargs)

    asyncio.run(scenario())


def test_score_request_carries_text_or_ids():
    request = convert.build_score_request("The capital is", None, None, [5, 6], "r1")
    assert (request.request_id, request.prompt, list(request.continuation_ids)) == ("r1", "The capital is", [5, 6])
    request = convert.build_score_request(None, " Paris", [1, 2], None, "")
    assert (list(request.prompt_ids), request.continuation) == ([1, 2], " Paris")


# -- replies --------------------------------------------------------------------------------


def _top(*pairs: tuple[int, str, float]) -> pb.TopTokens:
    return pb.TopTokens(alternatives=[pb.TopToken(token_id=i, text=t, logprob=lp) for i, t, lp in pairs])


def test_stream_chunk_carries_index_top_tokens_and_hypotheses():
    chunk = convert.to_chunk(pb.GenerateResponse(
        request_id="r", token_ids=[4], logprobs=[-0.1], text=" a", index=2,
        top_tokens=[_top((4, " a", math.log(0.75)), (9, " b", math.log(0.2)))], provisional=True,
        hypotheses=[pb.Hypothesis(token_ids=[4], text=" a", score=-0.1)]), BestSoFar())
    assert chunk.index == 2 and chunk.provisional
    assert [[(t.token_id, t.text) for t in step] for step in chunk.top_tokens] == [[(4, " a"), (9, " b")]]
    assert [t.prob for t in chunk.top_tokens[0]] == pytest.approx([0.75, 0.2])
    assert chunk.hypotheses == [Hypothesis([4], " a", pytest.approx(-0.1), None)]


def test_provisional_chunks_carry_the_whole_best_rebuilt_from_the_servers_edits():
    best = BestSoFar()
    updates = [pb.BestUpdate(token_ids=[5], text_suffix=" The"),
               pb.BestUpdate(keep_tokens=1, token_ids=[6], keep_text_bytes=4, text_suffix=" café"),
               pb.BestUpdate(keep_tokens=1, token_ids=[7, 8], keep_text_bytes=4, text_suffix=" sea is")]
    chunks = [convert.to_chunk(pb.GenerateResponse(request_id="r", provisional=True, best_update=u), best)
              for u in updates]
    assert [c.hypotheses for c in chunks] == [[Hypothesis([5], " The", 0.0, None)],
                                              [Hypothesis([5, 6], " The café", 0.0, None)],
                                              [Hypothesis([5, 7, 8], " The sea is", 0.0, None)]]
    final = convert.to_chunk(pb.GenerateResponse(
        request_id="r", token_ids=[5, 7, 9], text=" The sea", finish_reason=pb.FINISH_REASON_EOS,
        hypotheses=[pb.Hypothesis(token_ids=[5, 7, 9], text=" The sea", score=-0.5,
                                  finish_reason=pb.FINISH_REASON_EOS)]), best)
    assert final.hypotheses == [Hypothesis([5, 7, 9], " The sea", -0.5, "eos")], "the n best come whole"


def test_result_score_and_limits_convert():
    result = convert.to_result(pb.GenerateResult(
        request_id="r", token_ids=[1], text="x", finish_reason=pb.FINISH_REASON_EOS,
        top_tokens=[_top((1, "x", -0.5))],
        hypotheses=[pb.Hypothesis(token_ids=[1], text="x", score=-0.5, finish_reason=pb.FINISH_REASON_EOS),
                    pb.Hypothesis(token_ids=[2, 3], text="yz", score=-0.9,
                                  finish_reason=pb.FINISH_REASON_LENGTH)]))
    assert [h.finish_reason for h in result.hypotheses] == ["eos", "length"]
    assert result.top_tokens[0][0] == TopToken(1, "x", -0.5)
    scored = convert.to_score_result(pb.ScoreResponse(
        request_id="s", prompt_ids=[1, 2], continuation_ids=[3], logprobs=[-1.5], total_logprob=-1.5))
    assert scored == ScoreResult("s", [1, 2], [3], [-1.5], -1.5)
    info = convert.to_model_info(pb.ModelInfoResponse(
        limits=pb.Limits(max_num_beams=8, max_num_return_sequences=8, max_top_n=20)))
    assert (info.limits.max_num_beams, info.limits.max_num_return_sequences, info.limits.max_top_n) == (8, 8, 20)


# -- CLI ------------------------------------------------------------------------------------

NEW_FLAGS = ["--num-beams", "--num-return-sequences", "--length-penalty", "--early-stopping",
             "--no-repeat-ngram-size", "--repetition-penalty", "--min-new-tokens", "--min-p",
             "--typical-p", "--stop-token-id", "--ignore-eos", "--top-n", "--score"]


def test_cli_help_lists_the_new_flags(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert [flag for flag in NEW_FLAGS if flag not in shown] == []
    assert "{false,true,never}" in shown


def test_cli_flags_become_a_valid_request():
    args = cli._parser().parse_args([
        "--raw", "--num-beams", "4", "--early-stopping", "never", "--stop-token-id", "7",
        "--stop-token-id", "9", "--ignore-eos", "--top-n", "3", "hi"])
    request = cli._request(args, "hi")
    assert request["early_stopping"] == "never" and request["stop_token_ids"] == [7, 9]
    message = convert.build_request(request.pop("prompt"), None, None, "", request)
    assert message.parameters.early_stopping == pb.EARLY_STOPPING_NEVER
    assert (message.parameters.num_beams, message.parameters.top_n) == (4, 3)
    assert not message.parameters.HasField("repetition_penalty")


class FakeClient:
    """Answers `stream` and `generate` with prepared replies; records the request."""

    def __init__(self, chunks=(), result=None):
        self.chunks, self.result, self.request = list(chunks), result, None

    def stream(self, **request):
        self.request = request
        return iter(self.chunks)

    def generate(self, **request):
        self.request = request
        return self.result


def _chunk(text="", token_ids=(), **fields) -> StreamChunk:
    return StreamChunk(request_id="r", token_ids=list(token_ids), logprobs=[], text=text,
                       finish_reason=fields.pop("finish_reason", None), usage=fields.pop("usage", None), **fields)


def _run_cli(client: FakeClient, *argv: str) -> int:
    return cli._generate(client, cli._parser().parse_args([*argv, "prompt"]), "prompt")


def test_cli_top_n_prints_one_line_per_step(capsys):
    chunks = [
        _chunk(" Paris", [10], top_tokens=[[TopToken(10, " Paris", math.log(0.5)),
                                            TopToken(11, " Lyon", math.log(0.125))]]),
        _chunk(".", [12], top_tokens=[[TopToken(13, "!", math.log(0.6)), TopToken(12, ".", math.log(0.3))]],
               finish_reason="length", usage=Usage(3, 2)),
    ]
    assert _run_cli(FakeClient(chunks), "--top-n", "2") == 0
    assert capsys.readouterr().out.splitlines() == [
        " Paris.",
        "step  token     choice 1           choice 2",
        "   1  ' Paris'  ' Paris' (50.00%)  ' Lyon' (12.50%)",
        "   2  '.'       '!' (60.00%)       '.' (30.00%)",
    ]


def test_cli_top_n_without_streaming_names_a_token_outside_the_top_by_id(capsys):
    result = GenerationResult("r", [10, 99], [-0.7, -3.0], " Paris?", "length", Usage(3, 2),
                              top_tokens=[[TopToken(10, " Paris", math.log(0.5))], [TopToken(12, ".", -0.1)]])
    assert _run_cli(FakeClient(result=result), "--no-stream", "--top-n", "1") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == " Paris?"
    assert lines[2].startswith("   1  ' Paris'  ' Paris' (50.00%)")
    assert lines[3].startswith("   2  <id 99>   '.' (90.48%)")


def test_cli_beams_print_nothing_provisional_when_piped_then_the_n_best(capsys):
    best = [Hypothesis([1, 2], "the best", -0.25, "eos"), Hypothesis([1, 3], "the runner-up", -0.5, "length")]
    chunks = [_chunk(provisional=True, hypotheses=[Hypothesis([1], "PROVISIONAL", 0.0, None)]),
              _chunk("the best", [1, 2], finish_reason="eos", usage=Usage(3, 2), hypotheses=best)]
    assert _run_cli(FakeClient(chunks), "--num-beams", "2", "--num-return-sequences", "2") == 0
    out = capsys.readouterr().out
    assert "PROVISIONAL" not in out and "\r" not in out
    assert out.splitlines() == ["[0] score=-0.2500 finish=eos", "the best",
                                "[1] score=-0.5000 finish=length", "the runner-up"]


def test_cli_beams_on_a_terminal_redraw_the_provisional_best_on_one_line(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    steps = [_chunk(provisional=True, hypotheses=[Hypothesis([1], text, 0.0, None)])
             for text in ("The", "The best\nline")]
    final = _chunk("The best", [1, 2], finish_reason="eos", usage=Usage(3, 2),
                   hypotheses=[Hypothesis([1, 2], "The best", -0.25, "eos")])
    assert _run_cli(FakeClient([*steps, final]), "--num-beams", "2") == 0
    redraw = "\r\x1b[K"
    assert terminal.getvalue() == (f"{redraw}The{redraw}The best\\nline{redraw}"
                                   "[0] score=-0.2500 finish=eos\nThe best\n")


def test_cli_samples_print_each_under_its_index(capsys):
    chunks = [_chunk("A", [1], index=0), _chunk("B", [2], index=1), _chunk("b", [3], index=1),
              _chunk("a", [4], index=0, finish_reason="length", usage=Usage(3, 4),
                     hypotheses=[Hypothesis([1, 4], "Aa", -1.0, "length"),
                                 Hypothesis([2, 3], "Bb", -2.0, "length")])]
    assert _run_cli(FakeClient(chunks), "--do-sample", "--num-return-sequences", "2") == 0
    assert capsys.readouterr().out.splitlines() == ["[0]", "Aa", "[1]", "Bb"]


def test_cli_score_prints_each_token_and_the_total(capsys):
    cli._print_score(ScoreResult("r", [1, 2, 3], [7, 8], [math.log(0.5), math.log(0.25)], math.log(0.125)))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "prompt: 3 tokens"
    assert lines[2].split() == ["7", "-0.6931", "50.00%"]
    assert lines[3].split() == ["8", "-1.3863", "25.00%"]
    assert lines[4].split() == ["total", "-2.0794"]


def test_cli_score_rejects_a_system_message():
    with pytest.raises(SystemExit):
        cli.main(["--score", " Paris", "--system", "be brief", "The capital of France is"])
