"""How long requests wait in the admission queue: how fast it moves (`QueueDrain`, the estimate
behind the queue limits' messages and retry hints) and the bound on one request's wait (`first_by`,
which --max-queue-wait sets through the ticket's deadline).

A request leaves the queue when its first engine event arrives (it "starts"). The estimate is
busy seconds per start: over the last `window` starts, the time the queue held at least one
request, divided by the number of starts. Idle stretches (an empty queue) say nothing about how
fast the engine takes requests in, so they do not count; the stretch since the last start does,
so a queue that stops moving reads slower and slower instead of keeping its last good figure.

`QueueDrain` is pure: every time comes in as an argument, so the tests drive it with made-up clocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import AsyncIterator, TypeVar

T = TypeVar("T")


class QueueDrain:
    """Busy seconds per start of the admission queue, over its last `window` starts."""

    def __init__(self, window: int = 32):
        if window < 1:
            raise ValueError("window must be >= 1")
        # The busy seconds before each of the last `window` starts (0 for starts in the same step).
        self._gaps: deque[float] = deque(maxlen=window)
        self._busy_since: float | None = None  # start of the busy stretch not yet ended by a start

    def entered(self, now: float, queued_before: int) -> None:
        """A request joined a queue that held `queued_before` requests."""
        if queued_before == 0:
            self._busy_since = now

    def left(self, now: float, queued_after: int, started: bool) -> None:
        """A request left the queue, `started` (its first event came) or not (it ended while queued:
        cancelled, failed, over its wait limit), leaving `queued_after` requests."""
        if started and self._busy_since is not None:
            self._gaps.append(now - self._busy_since)
            self._busy_since = now
        if queued_after == 0:
            self._busy_since = None  # the stretch since the last start, if any, served nobody: dropped

    def seconds_per_start(self, now: float) -> float | None:
        """Busy seconds per start, the open stretch included; None before the first start."""
        if not self._gaps:
            return None
        open_stretch = 0.0 if self._busy_since is None else max(now - self._busy_since, 0.0)
        return (sum(self._gaps) + open_stretch) / len(self._gaps)

    def wait(self, now: float, ahead: int) -> float | None:
        """About how long a request behind `ahead` queued ones waits to start; None when unknown."""
        per_start = self.seconds_per_start(now)
        return None if per_start is None else (ahead + 1) * per_start


class QueueWaitExpired(Exception):
    """A request's first event did not come by its ticket's `queue_deadline`."""


async def first_by(events: AsyncIterator[T], deadline: float | None) -> AsyncIterator[T]:
    """`events`, whose first must come by `deadline` (asyncio's clock, time.monotonic()) or
    QueueWaitExpired; None: no deadline. `events` is closed however this ends, so its cleanup (the
    hub's abort in the engine) runs at once: an expired request leaves nothing in the engine."""
    async with contextlib.aclosing(events):
        timeout = asyncio.timeout_at(deadline)
        try:
            async with timeout:
                first = await anext(events)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if not timeout.expired():
                raise
            raise QueueWaitExpired() from None
        yield first
        async for event in events:
            yield event
