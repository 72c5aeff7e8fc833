"""The one place where engine events cross from the engine thread into asyncio.

Each request gets a stream: the engine publishes a whole step's events with a single
`call_soon_threadsafe`, and a request that stops listening before its final event is aborted
in the engine, so no row is left dangling.

Backpressure: a stream holds at most `StreamConfig.buffer` events its reader has not taken
(gRPC's own flow control holds the reader's HTTP/2 window beyond that). When the buffer fills,
the request's rows pause: they leave the steps and keep their KV while the store has room
(engine/scheduler.py), so a reader that catches up resumes at no cost; they resume once the
reader has taken half the buffer. A stream whose handler has been away with an event (its write
blocked by the client's flow control) for `idle_timeout` seconds is cut, paused or not, finished
or not: its request is aborted in the engine and its caller is told why. Nothing is dropped:
every event the engine produced is delivered or the stream ends.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol

from ..metrics import Metrics
from ..request import GenerationRequest, TokenEvent


@dataclass(frozen=True)
class StreamConfig:
    # Events a request may have waiting for its reader before its rows pause.
    buffer: int = 64
    # Seconds a stream's reader may leave an event unread (its write blocked) before it is cut; 0: never.
    idle_timeout: float = 60.0

    def __post_init__(self):
        if self.buffer < 2:
            raise ValueError("the stream buffer must hold at least 2 events")
        if self.idle_timeout < 0:
            raise ValueError("the stream idle timeout must be >= 0 (0 disables it)")


class EngineInbox(Protocol):
    """What the hub needs of the engine: take a request in, drop one, pause and resume one."""

    def submit(self, request: GenerationRequest) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def pause(self, request_id: str) -> None: ...

    def resume(self, request_id: str) -> None: ...


# Called once when a stream is cut (its reader stopped reading, or the server is shutting down),
# with the message for its client.
OnStalled = Callable[[str], None]


class Stream:
    """One request's events on their way to its reader; what it produced stays readable after."""

    def __init__(self, on_stalled: OnStalled | None = None):
        self.events: deque[tuple[float, TokenEvent]] = deque()  # each with the time its step reached the loop
        self.ready = asyncio.Event()
        self.paused = False
        self.cut = False
        self.away_since: float | None = None  # since when its handler has been writing an event out
        self.generated = 0  # tokens the engine produced for it, read or not
        self.on_stalled = on_stalled


class StreamHub:
    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics | None = None,
                 config: StreamConfig | None = None):
        self._loop = loop
        self.metrics = metrics or Metrics()
        self.config = config or StreamConfig()
        self._streams: dict[str, Stream] = {}
        self.engine: EngineInbox | None = None
        self._sweeping = False

    def publish(self, events: list[TokenEvent]) -> None:
        """Called from the engine thread."""
        if events:
            self._loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[TokenEvent]) -> None:
        now = time.monotonic()  # one stamp per step: a request's samples in one step share it
        for event in events:
            stream = self._streams.get(event.request_id)
            if stream is None:  # the listener left and its abort is on the way
                continue
            stream.events.append((now, event))
            stream.generated += len(event.token_ids)
            stream.ready.set()
            if not stream.paused and not event.final and len(stream.events) >= self.config.buffer:
                self._pause(event.request_id, stream)

    def _pause(self, request_id: str, stream: Stream) -> None:
        stream.paused = True
        self.engine.pause(request_id)
        self.metrics.stream_paused()

    def _resume(self, request_id: str, stream: Stream) -> None:
        stream.paused = False
        self.engine.resume(request_id)

    def _sweep(self) -> None:
        """Every quarter of the idle timeout while streams are open: cut those whose reader stopped."""
        now, timeout = time.monotonic(), self.config.idle_timeout
        for request_id, stream in list(self._streams.items()):
            if stream.away_since is not None and now - stream.away_since >= timeout:
                self._cut(request_id, stream, (
                    f"the client read nothing for {now - stream.away_since:.0f} s with {len(stream.events) + 1} "
                    f"messages waiting (--stream-idle-timeout {timeout:g}); the stream was cut and its request "
                    "stopped: read the stream as it arrives"))
        self._sweeping = bool(self._streams)
        if self._sweeping:
            self._loop.call_later(timeout / 4, self._sweep)

    def cut_unread(self, message: str) -> int:
        """Cut every stream whose handler is blocked writing to its client (shutdown: they would
        not see their end otherwise); how many."""
        blocked = [(rid, s) for rid, s in self._streams.items() if s.away_since is not None]
        for request_id, stream in blocked:
            self._cut(request_id, stream, message)
        return len(blocked)

    def _cut(self, request_id: str, stream: Stream, message: str) -> None:
        if stream.cut:
            return
        stream.cut = True
        self.engine.abort(request_id)
        if stream.on_stalled is not None:
            stream.on_stalled(message)

    async def run(self, request: GenerationRequest, stream: Stream | None = None) -> AsyncIterator[TokenEvent]:
        """Submit `request` and yield its events up to and including the final one, through `stream`.

        Records what its client sees: time to first output, the gaps between the
        steps that gave it output, end-to-end latency, and its token counts.
        """
        request_id = request.request_id
        stream = self._streams[request_id] = stream or Stream()
        self.metrics.open_streams(len(self._streams))
        if self.config.idle_timeout and not self._sweeping:
            self._sweeping = True
            self._loop.call_later(self.config.idle_timeout / 4, self._sweep)
        finished = submitted = False
        timed = request.score_from is None  # scoring has no tokens to wait for
        last_output: float | None = None
        try:
            self.engine.submit(request)
            submitted = True
            while not finished:
                while not stream.events:
                    stream.ready.clear()
                    await stream.ready.wait()
                stamp, event = stream.events.popleft()
                if stream.paused and len(stream.events) <= self.config.buffer // 2:
                    self._resume(request_id, stream)
                finished = event.final
                if timed and (event.token_ids or event.provisional):
                    if last_output is None:
                        self.metrics.first_token(stamp - request.arrival_time)
                    elif stamp != last_output:
                        self.metrics.inter_token(stamp - last_output)
                    last_output = stamp
                if finished:
                    self.metrics.end_to_end(stamp - request.arrival_time)
                stream.away_since = time.monotonic()
                yield event
                stream.away_since = None
        finally:
            del self._streams[request_id]
            self.metrics.open_streams(len(self._streams))
            if submitted:
                self.metrics.tokens(prompt=len(request.prompt_ids), generated=stream.generated if timed else 0)
            if not finished:
                self.engine.abort(request_id)
