"""The per-request log line: every field present, and a hostile client id cannot forge fields or lines."""

from __future__ import annotations

import shlex

from tokenloom.request import FinishReason, TokenEvent
from tokenloom.front.request_log import RequestRecord


def fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in shlex.split(line))


def test_a_finished_request_reports_tokens_ttft_duration_and_finish_reason():
    record = RequestRecord("Generate", "10.0.0.7", started_at=100.0, request_id="r1", prompt_tokens=12)
    record.on_event(TokenEvent("r1"))  # no tokens yet (held back text): not the first token
    assert record.first_token_at is None
    record.on_event(TokenEvent("r1", token_ids=(5,)))
    record.first_token_at = 100.25
    record.on_event(TokenEvent("r1", token_ids=(6,), finish_reason=FinishReason.LENGTH, final=True,
                               prompt_tokens=12, generated_tokens=2, cached_tokens=8))
    got = fields(record.line(now=101.5))
    assert got == {"request_id": "r1", "method": "Generate", "front": "grpc", "client": "10.0.0.7", "prompt_tokens": "12",
                   "cached_tokens": "8", "generated_tokens": "2", "delivered_tokens": "2", "ttft_s": "0.2500", "duration_s": "1.5000", "outcome": "length"}


def test_a_rejected_request_names_its_limit_and_has_no_ttft():
    record = RequestRecord("Score", "a", started_at=0.0, request_id="r2", outcome="RESOURCE_EXHAUSTED",
                           limit="max_queued_requests")
    got = fields(record.line(now=0.001))
    assert got["ttft_s"] == "-" and got["outcome"] == "RESOURCE_EXHAUSTED" and got["limit"] == "max_queued_requests"


def test_a_request_cut_short_reports_the_tokens_it_was_sent():
    record = RequestRecord("Generate", "a", started_at=0.0, request_id="r4", outcome="cancelled")
    for token in (1, 2, 3):
        record.on_event(TokenEvent("r4", token_ids=(token,)))
    got = fields(record.line(now=1.0))
    assert got["generated_tokens"] == "3" and got["delivered_tokens"] == "3"


def test_an_unknown_outcome_is_said_so_and_a_missing_id_is_a_dash():
    got = fields(RequestRecord("GenerateUnary", "a", started_at=0.0).line(now=1.0))
    assert got["outcome"] == "UNKNOWN" and got["request_id"] == "-"


def test_client_ids_with_spaces_or_newlines_are_quoted_on_one_line():
    record = RequestRecord("Generate", 'evil outcome=length\nrequest_id=x "q"', started_at=0.0, request_id="r3")
    line = record.line(now=1.0)
    assert "\n" not in line
    got = fields(line)
    assert got["client"] == 'evil outcome=length\\nrequest_id=x "q"'
    assert got["request_id"] == "r3" and got["outcome"] == "UNKNOWN"
