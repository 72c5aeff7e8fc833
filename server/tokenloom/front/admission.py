"""Who gets in, and when: per-client rate limits and stream caps, global queue caps, draining.

Pure asyncio, no gRPC: the servicer passes a client identity and a prompt length in,
holds the returned `Ticket` for the request's whole life (an async context manager),
and maps `Rejected` to RESOURCE_EXHAUSTED and `Closed` to UNAVAILABLE.

"Queued" is what the servicer can observe: a request is queued from its admission until
its first engine event (its first token, or its scores), i.e. while it waits for a slot
and is prefilled: the backlog that time to first token depends on. A preempted
request that goes back to waiting is not counted again.

Rate windows are asyncio-throttle's `Throttler`, used through its public API only. Its `acquire`
waits for room, and admission must answer at once: `_RateWindow.try_start` bounds it with
`asyncio.timeout(0)` (Python 3.11+), which lets an acquire that has room finish without suspending
and ends one that would wait at its first suspension, before it records anything. The library does
not say when its window will have room again, so each window also keeps the times of the starts it
admitted, for the retry hint and for forgetting idle clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Iterable
from urllib.parse import unquote

from asyncio_throttle import Throttler

# Retry hint for the queue caps before any request has left the queue.
_DEFAULT_QUEUE_WAIT = 1.0
# Weight of the newest queue wait in the running average behind the queue-cap retry hint.
_WAIT_SMOOTHING = 0.2


@dataclass(frozen=True)
class AdmissionConfig:
    """Every limit is off at 0; only the queue of requests is capped by default, as a safety net."""

    rate_limit_per_client: int = 0  # requests a client may start per `rate_limit_period`
    rate_limit_period: float = 1.0  # seconds, a sliding window
    max_streams_per_client: int = 0  # a client's requests open at once
    max_queued_requests: int = 1024  # requests admitted and not yet at their first event
    max_queued_prompt_tokens: int = 0  # the prompt tokens of those requests
    client_id_metadata_key: str = "x-client-id"  # "" identifies clients by peer address only

    def __post_init__(self):
        for name in ("rate_limit_per_client", "max_streams_per_client", "max_queued_requests",
                     "max_queued_prompt_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 0 (0 = unlimited)")
        if not self.rate_limit_period > 0:
            raise ValueError("rate_limit_period (--rate-limit-period) must be > 0 seconds")


class Rejected(Exception):
    """Over a limit. `limit` names the AdmissionConfig field (the flag without dashes);
    `retry_after_seconds` is None when the wait depends on the client itself."""

    def __init__(self, limit: str, message: str, retry_after_seconds: float | None):
        super().__init__(message)
        self.limit = limit
        self.message = message
        self.retry_after_seconds = retry_after_seconds


class Closed(Exception):
    """The server is draining: it admits no new requests."""


def peer_host(peer: str) -> str:
    """gRPC's peer string without scheme and port: 'ipv4:10.0.0.7:5312' -> '10.0.0.7'."""
    scheme, sep, address = unquote(peer).partition(":")
    if not sep or scheme not in ("ipv4", "ipv6"):
        return peer  # unix sockets and the like: the whole string is the identity
    host = address.rpartition(":")[0].strip("[]")  # '[::1]:5312' -> '::1'
    return host or peer


def client_identity(metadata: Iterable[tuple[str, str]], peer: str, key: str) -> str:
    """The client's self-declared id under `key` (gRPC keys are lower case), else its host."""
    if key:
        key = key.lower()
        for k, value in metadata:
            if k == key and isinstance(value, str) and value:
                return value
    return peer_host(peer)


class _RateWindow:
    """One client's sliding window of request starts: the throttler decides whether one more fits."""

    def __init__(self, rate_limit: int, period: float):
        self._throttler = Throttler(rate_limit, period)
        self.period = period
        # The last `rate_limit` starts the throttler admitted, each read just after it read its own:
        # the same starts as in its window, never earlier, so a hint from them is never too soon.
        self._starts: deque[float] = deque(maxlen=rate_limit)

    async def try_start(self) -> bool:
        """Record a start and say True if the window has room now; else False, recording nothing.

        Suspends only to say False, for a turn or two of the event loop (no timer): when the window
        has room, `acquire` returns without awaiting, so the timeout, due at the loop's next turn,
        never fires. The timeout cancels this task alone and undoes its own cancellation; a
        cancellation from outside that lands meanwhile still propagates."""
        try:
            async with asyncio.timeout(0):
                await self._throttler.acquire()
        except TimeoutError:
            return False  # cancelled in its sleep, before the append that records a start
        self._starts.append(time.monotonic())
        return True

    def retry_after(self) -> float:
        """Seconds until the oldest start leaves the window (asked when the window is full)."""
        return max(self._starts[0] + self.period - time.monotonic(), 0.001)

    def idle(self, now: float) -> bool:
        """Nothing left in the window."""
        return not self._starts or now - self._starts[-1] > self.period


class Ticket:
    """One admitted request's hold on the limits, released once however the request ends."""

    def __init__(self, admission: "Admission", client: str, prompt_tokens: int):
        self._admission = admission
        self.client = client
        self.prompt_tokens = prompt_tokens
        self.admitted_at = time.monotonic()
        self.queued = True
        self.released = False

    def started(self) -> None:
        """The request's first event arrived: it leaves the queue (idempotent)."""
        if self.queued and not self.released:
            self._admission._dequeue(self)

    def release(self) -> None:
        if not self.released:
            self._admission._release(self)

    async def __aenter__(self) -> "Ticket":
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()


class Admission:
    """The limits' counters. Runs on one event loop; no method suspends between checking a
    limit and taking the slot, so concurrent requests cannot overshoot a cap."""

    def __init__(self, config: AdmissionConfig):
        self.config = config
        self._throttlers: dict[str, _RateWindow] = {}
        self._last_sweep = time.monotonic()
        self._streams: dict[str, int] = {}
        self._open: set[Ticket] = set()
        self.queued_requests = 0
        self.queued_prompt_tokens = 0
        self._recent_wait = _DEFAULT_QUEUE_WAIT
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def admit(self, client: str, prompt_tokens: int) -> Ticket:
        """A ticket for a request of `client` with a prompt of `prompt_tokens` tokens.

        Raises `Rejected` (nothing is taken) or `Closed`. A rejected request does not count
        against the client's rate: a client retrying after the hint is not punished for it.
        The rate is checked last, since passing it records the start; a request over several
        limits is therefore told about a cap before its rate.
        """
        if self._closed:
            raise Closed("the server is shutting down and takes no new requests; retry on another replica")
        self._check_streams(client)
        self._check_queue(prompt_tokens)
        await self._check_rate(client)  # suspends only to reject: a pass takes the slots below at once
        ticket = Ticket(self, client, prompt_tokens)
        self._open.add(ticket)
        self._idle.clear()
        self._streams[client] = self._streams.get(client, 0) + 1
        self.queued_requests += 1
        self.queued_prompt_tokens += prompt_tokens
        return ticket

    @contextlib.asynccontextmanager
    async def admitted(self, client: str, prompt_tokens: int) -> AsyncIterator[Ticket]:
        async with await self.admit(client, prompt_tokens) as ticket:
            yield ticket

    def close(self) -> None:
        """Admit nothing from now on (draining); open requests go on."""
        self._closed = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no admitted request is open; False if `timeout` seconds pass first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    @property
    def num_open(self) -> int:
        return len(self._open)

    # -- the limits --------------------------------------------------------------

    async def _check_rate(self, client: str) -> None:
        """Records the start in `client`'s window, or raises Rejected."""
        cfg = self.config
        if not cfg.rate_limit_per_client:
            return
        self._sweep_idle_windows()
        window = self._throttlers.get(client)
        if window is None:
            window = self._throttlers[client] = _RateWindow(cfg.rate_limit_per_client, cfg.rate_limit_period)
        if await window.try_start():
            return
        wait = window.retry_after()
        raise Rejected(
            "rate_limit_per_client",
            f"rate limit: client {client!r} started {cfg.rate_limit_per_client} requests in the last "
            f"{cfg.rate_limit_period:g} s (--rate-limit-per-client {cfg.rate_limit_per_client} per "
            f"--rate-limit-period {cfg.rate_limit_period:g}); retry in {wait:.3f} s",
            wait,
        )

    def _check_streams(self, client: str) -> None:
        cap = self.config.max_streams_per_client
        if cap and self._streams.get(client, 0) >= cap:
            raise Rejected(
                "max_streams_per_client",
                f"stream limit: client {client!r} has {cap} requests open (--max-streams-per-client {cap}); "
                "retry when one of them ends",
                None,
            )

    def _check_queue(self, prompt_tokens: int) -> None:
        cfg, wait = self.config, self._recent_wait
        if cfg.max_queued_requests and self.queued_requests >= cfg.max_queued_requests:
            raise Rejected(
                "max_queued_requests",
                f"queue full: {self.queued_requests} requests are waiting for their first token "
                f"(--max-queued-requests {cfg.max_queued_requests}); retry in about {wait:.3f} s",
                wait,
            )
        cap = cfg.max_queued_prompt_tokens
        # A prompt longer than the cap is admitted into an empty queue, or it could never run.
        if cap and self.queued_prompt_tokens and self.queued_prompt_tokens + prompt_tokens > cap:
            raise Rejected(
                "max_queued_prompt_tokens",
                f"queue full: {self.queued_prompt_tokens} prompt tokens are waiting to be prefilled and this "
                f"request adds {prompt_tokens} (--max-queued-prompt-tokens {cap}); retry in about {wait:.3f} s",
                wait,
            )

    def _sweep_idle_windows(self) -> None:
        """Forget clients with nothing in their window, at most once a period (amortised)."""
        now = time.monotonic()
        if now - self._last_sweep < self.config.rate_limit_period:
            return
        self._last_sweep = now
        for client in [c for c, w in self._throttlers.items() if w.idle(now)]:
            del self._throttlers[client]

    # -- tickets -----------------------------------------------------------------

    def _dequeue(self, ticket: Ticket) -> None:
        ticket.queued = False
        self.queued_requests -= 1
        self.queued_prompt_tokens -= ticket.prompt_tokens
        wait = time.monotonic() - ticket.admitted_at
        self._recent_wait += _WAIT_SMOOTHING * (wait - self._recent_wait)

    def _release(self, ticket: Ticket) -> None:
        if ticket.queued:
            ticket.queued = False  # ended before its first event: no queue wait to learn from
            self.queued_requests -= 1
            self.queued_prompt_tokens -= ticket.prompt_tokens
        ticket.released = True
        self._open.discard(ticket)
        left = self._streams[ticket.client] - 1
        if left:
            self._streams[ticket.client] = left
        else:
            del self._streams[ticket.client]
        if not self._open:
            self._idle.set()

    def check_invariants(self) -> None:
        queued = [t for t in self._open if t.queued]
        assert self.queued_requests == len(queued), (self.queued_requests, len(queued))
        assert self.queued_prompt_tokens == sum(t.prompt_tokens for t in queued)
        per_client: dict[str, int] = {}
        for t in self._open:
            per_client[t.client] = per_client.get(t.client, 0) + 1
        assert self._streams == per_client, (self._streams, per_client)
        assert self._idle.is_set() == (not self._open)
        assert all(not t.released for t in self._open)
