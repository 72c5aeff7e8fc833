"""The soak, short enough for CI (`make soak` runs the long one): 2,000 requests at concurrency 64
on a tiny model with client cancels, deadlines, bad input, queue overflow and constrained requests
(cancelled and cut by deadlines too) mixed in. Every call
ends with a status its kind allows, the server counts each request exactly once, nothing is left
holding rows or KV blocks, and resident memory stops growing. See tests/soak.py."""

from __future__ import annotations

from soak import check, run_soak

REQUESTS = 2000


def test_soak_every_request_accounted_for_nothing_leaked(tiny_dirs, tmp_path):
    report = run_soak(tiny_dirs["llama"], requests=REQUESTS, concurrency=64, seed=1, log_dir=tmp_path)
    print(report.to_json())
    assert check(report) == [], report.to_json()
    # The mix really happened: each kind of ending was seen, not just successes.
    assert {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT"} <= set(report.by_code), report.by_code
    assert report.by_kind.keys() == {"greedy", "sampled", "samples_n2", "beam", "score", "constrained", "cancel",
                                     "deadline", "bad"}
