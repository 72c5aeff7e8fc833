"""The SDK's replica handling without a server: targets, service config, and a stream's resumption."""

from __future__ import annotations

import json

import grpc
import pytest

from tokenloom_client.failover import FailoverStats, Resumption, channel_target
from tokenloom_client.pb.tokenloom.v1 import generation_pb2 as pb
from tokenloom_client.types import Hypothesis, StreamChunk


def test_one_address_is_left_as_it_was():
    assert channel_target("localhost:50051") == ("localhost:50051", [], False)


@pytest.mark.parametrize("target", [["10.0.0.1:5", "localhost:6"], "10.0.0.1:5, localhost:6"])
def test_several_addresses_are_balanced_with_health_checks_and_retries(target):
    address, options, balanced = channel_target(target)
    assert balanced and address == "ipv4:10.0.0.1:5,127.0.0.1:6"
    config = json.loads(dict(options)["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "tokenloom.v1.Generation"}
    assert config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_a_dns_name_is_balanced_and_host_names_in_a_list_are_refused():
    assert channel_target("dns:///tokenloom-headless:50051")[2]
    with pytest.raises(ValueError, match="dns:///"):
        channel_target(["replica-a:50051", "replica-b:50051"])


class _Error(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "gone"


def _chunk(index, tokens, logprobs, **kw):
    return StreamChunk("r", tokens, logprobs, "", None, None, index=index, **kw)


def test_a_broken_stream_is_sent_again_with_its_tokens_and_the_scores_add_up():
    request = pb.GenerateRequest(input_ids=[1, 2], parameters=pb.GenerationParameters(do_sample=True,
                                                                                      num_return_sequences=2))
    stats = FailoverStats()
    r = Resumption(request, stats)
    assert r.request.parameters.HasField("seed")  # drawn here, so a resumption draws the same numbers
    r.seen(_chunk(0, [5], [-1.0]))
    r.seen(_chunk(1, [7], [-2.0]))
    r.seen(_chunk(0, [6], [-0.5]))
    assert not r.retry(_Error(grpc.StatusCode.INVALID_ARGUMENT))
    assert r.retry(_Error(grpc.StatusCode.UNAVAILABLE))
    assert [list(x.token_ids) for x in r.request.resume] == [[5, 6], [7]]
    assert r.request.parameters.seed == request.parameters.seed and not request.resume
    assert (stats.resumed_streams, stats.resumes, stats.resent_tokens) == (1, 1, 3)
    final = r.seen(_chunk(1, [8], [-1.0], hypotheses=[Hypothesis([5, 6, 9], "", -0.25, "length"),
                                                      Hypothesis([7, 8], "", -1.0, "length")]))
    assert [h.score for h in final.hypotheses] == [-0.25 - 1.5, -1.0 - 2.0]  # the server's sums start at the resume
    assert len(stats.resume_seconds) == 1


def test_beams_restart_and_a_single_target_never_resumes():
    beams = Resumption(pb.GenerateRequest(parameters=pb.GenerationParameters(num_beams=3)), FailoverStats())
    beams.seen(_chunk(0, [], [], provisional=True))
    assert beams.retry(_Error(grpc.StatusCode.UNAVAILABLE)) and not beams.request.resume
    single = Resumption(pb.GenerateRequest(parameters=pb.GenerationParameters(do_sample=True)), FailoverStats(),
                        enabled=False)
    assert not single.request.parameters.HasField("seed")
    assert not single.retry(_Error(grpc.StatusCode.UNAVAILABLE))


def test_resumptions_stop_after_a_bound_and_back_off():
    r = Resumption(pb.GenerateRequest(), FailoverStats())
    delays = []
    while r.retry(_Error(grpc.StatusCode.UNAVAILABLE)):
        delays.append(r.backoff)
    assert len(delays) == 8 and delays[0] == 0.0 and delays == sorted(delays) and delays[-1] <= 1.0


def test_a_break_after_the_final_message_is_not_resumed():
    r = Resumption(pb.GenerateRequest(), FailoverStats())
    r.seen(_chunk(0, [5], [-1.0]))
    from tokenloom_client.types import Usage
    r.seen(StreamChunk("r", [6], [-1.0], "", "length", Usage(3, 2)))
    assert r.finished and not r.retry(_Error(grpc.StatusCode.UNAVAILABLE))
