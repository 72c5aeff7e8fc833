"""Who gets in, and when: per-client rate limits and stream caps, global queue caps, draining.

Pure asyncio, no gRPC: the servicer passes a client identity and a prompt length in,
holds the returned `Ticket` for the request's whole life (an async context manager),
and maps `Rejected` to RESOURCE_EXHAUSTED and `Closed` to UNAVAILABLE.

"Queued" is what the servicer can observe: a request is queued from its admission until
its first engine event (its first token, or its scores), i.e. while it waits for a slot
and is prefilled: the backlog that time to first token depends on. A preempted
request that goes back to waiting is not counted again. Admission holds no request itself: an
admitted request goes to the engine at once, and waits there (its inbox, the scheduler's waiting
list, a chunked prefill); the ticket is how this module sees that wait, and `--max-queue-wait`
bounds it (the servicer ends a ticket whose `queue_deadline` passes before its first event).

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
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Mapping

from asyncio_throttle import Throttler

from .queue_wait import QueueDrain

# Retry hint for the queue limits before any request has started (the queue's pace is unknown).
_DEFAULT_QUEUE_WAIT = 1.0
# The default queue caps, from what the engine can serve (`AdmissionConfig.resolved`): requests, a
# multiple of the rows one step runs (--max-num-seqs), so that a full queue is a few batches' worth
# of waiting, not hundreds; prompt tokens, the KV store's capacity: more prompt than the store holds
# cannot all be resident at once, so the surplus would only wait for the rest to finish.
QUEUED_REQUESTS_PER_SEQ = 4


@dataclass(frozen=True)
class ClientLimits:
    """One client's own per-client limits (from --auth-tokens-file); None: the server-wide flag's."""

    rate_limit_per_client: int | None = None
    max_streams_per_client: int | None = None

    def __post_init__(self):
        for name in ("rate_limit_per_client", "max_streams_per_client"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0 (0 = unlimited), not {value!r}")


@dataclass(frozen=True)
class AdmissionConfig:
    """Every limit is off at 0. The queue caps default to None: derived from the engine's size by
    `resolved`, which `Admission` requires; the queue wait is capped at 60 s by default."""

    rate_limit_per_client: int = 0  # requests a client may start per `rate_limit_period`
    rate_limit_period: float = 1.0  # seconds, a sliding window
    max_streams_per_client: int = 0  # a client's requests open at once
    max_queued_requests: int | None = None  # requests admitted and not yet at their first event
    max_queued_prompt_tokens: int | None = None  # the prompt tokens of those requests
    # Seconds from admission to the first event, after which a request is ended (RESOURCE_EXHAUSTED).
    # 60: an interactive client has long given up by then, and a queue holding work that long is
    # one the server cannot catch up with; batch clients that will wait raise it (or 0: no limit).
    max_queue_wait: float = 60.0
    client_id_metadata_key: str = "x-client-id"  # "" identifies clients by peer address only
    trust_client_id_metadata: bool = False  # read the key at all (a proxy in front sets it)
    # Per-client overrides by client id (the tokens file's); swapped whole on reload.
    per_client: Mapping[str, ClientLimits] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        for name in ("rate_limit_per_client", "max_streams_per_client", "max_queued_requests",
                     "max_queued_prompt_tokens", "max_queue_wait"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 0 (0 = unlimited)")
        if not self.rate_limit_period > 0:
            raise ValueError("rate_limit_period (--rate-limit-period) must be > 0 seconds")

    def resolved(self, max_num_seqs: int, kv_cache_tokens: int) -> "AdmissionConfig":
        """The queue caps left at None derived from the engine: QUEUED_REQUESTS_PER_SEQ x `max_num_seqs`
        requests, `kv_cache_tokens` prompt tokens. Explicit values (0 = unlimited included) stay."""
        return replace(
            self,
            max_queued_requests=(QUEUED_REQUESTS_PER_SEQ * max_num_seqs if self.max_queued_requests is None
                                 else self.max_queued_requests),
            max_queued_prompt_tokens=(kv_cache_tokens if self.max_queued_prompt_tokens is None
                                      else self.max_queued_prompt_tokens),
        )

    @property
    def trusted_metadata_key(self) -> str:
        """The metadata key that names the client, or "" when the metadata is not trusted."""
        return self.client_id_metadata_key if self.trust_client_id_metadata else ""

    def limit(self, client: str, name: str) -> int:
        """`client`'s value of the per-client limit `name`: its own override, else the server's."""
        own = getattr(self.per_client.get(client, _NO_OVERRIDE), name)
        return getattr(self, name) if own is None else own


_NO_OVERRIDE = ClientLimits()


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


class _RateWindow:
    """One client's sliding window of request starts: the throttler decides whether one more fits."""

    def __init__(self, rate_limit: int, period: float):
        self._throttler = Throttler(rate_limit, period)
        self.rate_limit = rate_limit
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

    def __init__(self, admission: "Admission", client: str, prompt_tokens: int, admitted_at: float):
        self._admission = admission
        self.client = client
        self.prompt_tokens = prompt_tokens
        self.admitted_at = admitted_at
        wait = admission.config.max_queue_wait
        # When a request still without its first event has waited too long (time.monotonic(), which is
        # asyncio's loop clock); None: no limit.
        self.queue_deadline = admitted_at + wait if wait else None
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
        if config.max_queued_requests is None or config.max_queued_prompt_tokens is None:
            raise ValueError("derive the default queue caps first: AdmissionConfig.resolved(max_num_seqs, kv_tokens)")
        self.config = config
        self._throttlers: dict[str, _RateWindow] = {}
        self._last_sweep = time.monotonic()
        self._streams: dict[str, int] = {}
        self._open: set[Ticket] = set()
        self.queued_requests = 0
        self.queued_prompt_tokens = 0
        self._drain = QueueDrain()
        self._closed = False
        self.cutting = False  # the drain's grace is over: what is still open is being ended
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
        ticket = Ticket(self, client, prompt_tokens, time.monotonic())
        self._drain.entered(ticket.admitted_at, self.queued_requests)
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

    def set_client_limits(self, per_client: Mapping[str, ClientLimits]) -> None:
        """Swap the per-client overrides (a tokens file reload); open requests keep their tickets."""
        self.config = replace(self.config, per_client=dict(per_client))

    def close(self) -> None:
        """Admit nothing from now on (draining); open requests go on."""
        self._closed = True

    def cut(self) -> None:
        """The drain's grace is over: the requests still open are about to be ended by the shutdown."""
        self._closed = self.cutting = True

    def expired(self, ticket: Ticket) -> Rejected:
        """The answer for a ticket still queued at its `queue_deadline` (the caller then releases it)."""
        now, cfg = time.monotonic(), self.config
        pace, wait = self._pace(now, ahead=self.queued_requests - 1)  # the time for the queue to drain
        wait = cfg.max_queue_wait if wait is None else wait  # nothing started in all that time
        return Rejected(
            "max_queue_wait",
            f"queue wait: waited {now - ticket.admitted_at:.1f} s without starting (--max-queue-wait "
            f"{cfg.max_queue_wait:g}); {self.queued_requests} requests are waiting for their first token, "
            f"{pace}; retry in about {wait:.3f} s",
            wait,
        )

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no admitted request is open; False if `timeout` seconds pass first."""
        if self._idle.is_set():
            return True  # also at timeout 0, where wait_for would not let the wait run
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
        rate = cfg.limit(client, "rate_limit_per_client")
        if not rate:
            return
        self._sweep_idle_windows()
        window = self._throttlers.get(client)
        if window is None or window.rate_limit != rate:  # new, or its limit changed on a reload
            window = self._throttlers[client] = _RateWindow(rate, cfg.rate_limit_period)
        if await window.try_start():
            return
        wait = window.retry_after()
        raise Rejected(
            "rate_limit_per_client",
            f"rate limit: client {client!r} started {rate} requests in the last "
            f"{cfg.rate_limit_period:g} s (--rate-limit-per-client {rate} per "
            f"--rate-limit-period {cfg.rate_limit_period:g}); retry in {wait:.3f} s",
            wait,
        )

    def _check_streams(self, client: str) -> None:
        cap = self.config.limit(client, "max_streams_per_client")
        if cap and self._streams.get(client, 0) >= cap:
            raise Rejected(
                "max_streams_per_client",
                f"stream limit: client {client!r} has {cap} requests open (--max-streams-per-client {cap}); "
                "retry when one of them ends",
                None,
            )

    def _check_queue(self, prompt_tokens: int) -> None:
        cfg = self.config
        full_requests = cfg.max_queued_requests and self.queued_requests >= cfg.max_queued_requests
        cap = cfg.max_queued_prompt_tokens
        # A prompt longer than the cap is admitted into an empty queue, or it could never run.
        full_tokens = cap and self.queued_prompt_tokens and self.queued_prompt_tokens + prompt_tokens > cap
        if not (full_requests or full_tokens):
            return
        now = time.monotonic()
        pace, _ = self._pace(now, ahead=self.queued_requests)
        per_start = self._drain.seconds_per_start(now)
        retry = _DEFAULT_QUEUE_WAIT if per_start is None else max(per_start, 0.001)  # when a place frees
        if full_requests:
            raise Rejected(
                "max_queued_requests",
                f"queue full: {self.queued_requests} requests are waiting for their first token "
                f"(--max-queued-requests {cfg.max_queued_requests}); {pace}; retry in about {retry:.3f} s",
                retry,
            )
        raise Rejected(
            "max_queued_prompt_tokens",
            f"queue full: {self.queued_prompt_tokens} prompt tokens are waiting to be prefilled and this "
            f"request adds {prompt_tokens} (--max-queued-prompt-tokens {cap}); {pace}; retry in about {retry:.3f} s",
            retry,
        )

    def _pace(self, now: float, ahead: int) -> tuple[str, float | None]:
        """How fast the queue moves, in words, and the estimated wait of a request behind `ahead`."""
        wait = self._drain.wait(now, ahead)
        if wait is None:
            return "no request has started yet, so the wait is not known", None
        return (f"one starts every {self._drain.seconds_per_start(now):.3f} s, so a request behind them would wait "
                f"about {wait:.2f} s for its first token"), wait

    def _sweep_idle_windows(self) -> None:
        """Forget clients with nothing in their window, at most once a period (amortised)."""
        now = time.monotonic()
        if now - self._last_sweep < self.config.rate_limit_period:
            return
        self._last_sweep = now
        for client in [c for c, w in self._throttlers.items() if w.idle(now)]:
            del self._throttlers[client]

    # -- tickets -----------------------------------------------------------------

    def _dequeue(self, ticket: Ticket, started: bool = True) -> None:
        """`ticket` leaves the queue: at its first event (`started`), or ended before it."""
        ticket.queued = False
        self.queued_requests -= 1
        self.queued_prompt_tokens -= ticket.prompt_tokens
        self._drain.left(time.monotonic(), self.queued_requests, started)

    def _release(self, ticket: Ticket) -> None:
        if ticket.queued:
            self._dequeue(ticket, started=False)  # no start to learn the queue's pace from
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
