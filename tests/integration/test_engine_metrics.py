"""What the engine thread records, stepped by hand: gauges that track the scheduler, preemptions, queue waits."""

from __future__ import annotations

from test_engine import Harness


def test_gauges_preemptions_and_queue_waits_follow_a_preempting_run(tiny_dirs):
    h = Harness(tiny_dirs["qwen2"], kv_tokens=320, budget=128, max_seqs=8)
    metrics, scheduler, blocks = h.engine.metrics, h.runtime.scheduler, h.runtime.blocks
    block_bytes = h.runtime.cache.bytes_per_block
    for i in range(8):
        h.submit(list(range(20 * i + 5, 20 * i + 45)), max_new_tokens=30)
    turns, peak = 0, 0.0
    while turns == 0 or scheduler.has_work():  # submitted requests reach the scheduler at the first step
        h.step()
        turns += 1
        assert turns < 500, "the requests never finished"
        assert metrics.value("tokenloom_waiting_requests") == len(scheduler.waiting)
        assert metrics.value("tokenloom_running_sequences") == sum(len(g.seqs) for g in scheduler.running)
        assert metrics.value("tokenloom_kv_cache_used_bytes") == blocks.num_used * block_bytes
        assert metrics.value("tokenloom_kv_cache_usage_ratio") == blocks.num_used / blocks.num_blocks
        assert metrics.value("tokenloom_preemptions_total") == scheduler.num_preemptions
        peak = max(peak, metrics.value("tokenloom_kv_cache_usage_ratio"))
    assert scheduler.num_preemptions > 0, "the store was meant to be too small for all 8"
    assert peak > 0.8
    assert metrics.value("tokenloom_kv_cache_used_bytes") == 0
    # A preempted request waits again, but its queue wait is the one before its first step.
    assert metrics.value("tokenloom_queue_wait_seconds_count") == 8
    steps = metrics.value("tokenloom_step_duration_seconds_count")
    assert 30 <= steps <= turns
    assert metrics.value("tokenloom_step_rows_count") == metrics.value("tokenloom_step_tokens_count") == steps
