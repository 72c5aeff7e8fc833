"""The admission queue's pace, from made-up clocks (busy seconds per start, idle time left out), and
the deadline on a request's first event."""

from __future__ import annotations

import asyncio

import pytest

from tokenloom.front.queue_wait import QueueDrain, QueueWaitExpired, first_by


def test_unknown_before_the_first_start():
    drain = QueueDrain()
    assert drain.seconds_per_start(0.0) is None and drain.wait(0.0, ahead=3) is None
    drain.entered(0.0, queued_before=0)
    drain.left(5.0, queued_after=0, started=False)  # cancelled while queued: no pace learned
    assert drain.seconds_per_start(6.0) is None


def test_a_steady_queue_reads_its_time_between_starts_and_a_wait_grows_with_what_is_ahead():
    drain = QueueDrain()
    queued = 0
    for i in range(10):  # one joins every 0.5 s, one starts every 0.5 s: the queue never empties
        drain.entered(i * 0.5, queued)
        queued += 1
    for i in range(1, 6):
        queued -= 1
        drain.left(i * 0.5, queued, started=True)
    assert drain.seconds_per_start(2.5) == pytest.approx(0.5)
    assert drain.wait(2.5, ahead=4) == pytest.approx(2.5)  # 4 ahead of it, then its own start


def test_idle_time_does_not_count():
    drain = QueueDrain()
    for t in (0.0, 100.0, 500.0):  # lone requests, each starting 0.1 s after it came, long idle gaps between
        drain.entered(t, 0)
        drain.left(t + 0.1, 0, started=True)
    assert drain.seconds_per_start(1000.0) == pytest.approx(0.1)


def test_starts_in_one_step_share_the_busy_time():
    drain = QueueDrain()
    for queued in range(4):
        drain.entered(0.0, queued_before=queued)
    for left in (3, 2, 1, 0):  # all four take their first token at t = 1
        drain.left(1.0, left, started=True)
    assert drain.seconds_per_start(1.0) == pytest.approx(0.25)


def test_a_queue_that_stops_moving_reads_slower_and_slower():
    drain = QueueDrain()
    drain.entered(0.0, 0)
    drain.entered(0.0, 1)
    drain.left(1.0, 1, started=True)  # one start after 1 s; the other is still waiting
    assert drain.seconds_per_start(1.0) == pytest.approx(1.0)
    assert drain.seconds_per_start(11.0) == pytest.approx(11.0)  # 11 busy seconds, one start
    drain.left(12.0, 0, started=True)
    assert drain.seconds_per_start(50.0) == pytest.approx(6.0)  # empty since: no open stretch


def test_a_request_that_leaves_without_starting_does_not_end_the_busy_stretch():
    drain = QueueDrain()
    drain.entered(0.0, 0)
    drain.entered(0.0, 1)
    drain.left(0.5, 1, started=False)  # cancelled: the other still waits
    drain.left(2.0, 0, started=True)
    assert drain.seconds_per_start(2.0) == pytest.approx(2.0)


def test_the_window_forgets_old_starts():
    drain = QueueDrain(window=4)
    drain.entered(0.0, 0)
    drain.left(100.0, 0, started=True)  # one very slow start long ago
    t = 200.0
    for _ in range(4):
        drain.entered(t, 0)
        drain.left(t + 0.2, 0, started=True)
        t += 10
    assert drain.seconds_per_start(t) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        QueueDrain(window=0)


def test_first_by_passes_events_through_and_ends_a_late_first_event_with_cleanup():
    cleaned = []

    async def events(delay: float):
        try:
            await asyncio.sleep(delay)
            yield 1
            await asyncio.sleep(0.2)  # later events are not bound by the deadline
            yield 2
        finally:
            cleaned.append(delay)

    async def go():
        loop = asyncio.get_running_loop()
        got = [e async for e in first_by(events(0.0), loop.time() + 0.1)]
        assert got == [1, 2]
        assert [e async for e in first_by(events(0.0), None)] == [1, 2]
        start = loop.time()
        with pytest.raises(QueueWaitExpired):
            async for _ in first_by(events(10.0), loop.time() + 0.05):
                pass
        assert loop.time() - start < 1.0
        assert cleaned == [0.0, 0.0, 10.0], "the late generator must have been closed (its abort ran)"

    asyncio.run(go())
