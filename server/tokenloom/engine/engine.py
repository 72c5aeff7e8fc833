"""The step loop, in a thread of its own: schedule -> execute -> update -> publish.

    plan = scheduler.schedule()                    # which sequences compute which tokens (pure)
    rows = [live[request].row(chunk) ...]          # what each chunk must produce (pure, per mode)
    outputs = executor.execute(Batch(rows, ...))   # one forward + the sampler (the only torch)
    events = live[request].apply(its rows' outputs) ...

The asyncio side talks to the engine only through `submit`, `abort`, `pause` and `resume`, which
queue work for the next step, and the `publish` callback, which receives the events of a whole step at once
(the server hands them to the event loop). This module imports no torch: the executor comes in
from outside, and a fabricated one drives it in the tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, wait
from typing import Callable, Protocol

from ..metrics import Metrics
from ..request import EngineUnavailable, FinishReason, GenerationRequest, RequestTooLarge, TokenEvent
from . import generation
from .batch import Batch, Row, RowOutput
from .engine_thread import EngineThread
from .generation import Generation, GenerationContext
from .heap import HeapTrimmer
from .scheduler import Scheduler, SchedulerOutput
from .sequence import SequenceGroup

log = logging.getLogger(__name__)

Publish = Callable[[list[TokenEvent]], None]
OnExit = Callable[[BaseException | None], None]
Start = Callable[[SequenceGroup, GenerationContext], Generation]


class Executor(Protocol):
    """The torch side: one forward over a batch's rows, then what each row asked for."""

    kv_bytes_per_block: int

    def execute(self, batch: Batch) -> list[RowOutput]: ...


class Engine:
    def __init__(
        self,
        executor: Executor,
        scheduler: Scheduler,
        context: GenerationContext,
        publish: Publish,
        metrics: Metrics | None = None,
        on_exit: OnExit | None = None,
        start: Start = generation.start,  # picks a request's mode; tests wrap it to inject faults
    ):
        self.executor = executor
        self.scheduler = scheduler
        self.context = context
        self.publish = publish
        self.metrics = metrics or Metrics()
        self.on_exit = on_exit  # called from the engine thread when it ends: None, or what killed it
        self._start = start
        self._preemptions_seen = 0  # the scheduler's counters at the last report
        self._prefix_seen = (0, 0)
        self._unscheduled: set[str] = set()  # admitted requests not yet in a step: their queue wait is open
        self._live: dict[str, Generation] = {}
        self._inbox: deque[tuple[str, object]] = deque()
        self._admitting: GenerationRequest | None = None  # taken from the inbox, not yet live
        self._wake = threading.Condition()
        self._stopping = False
        self._running: Future | None = None  # the step loop, once started
        self._heap = HeapTrimmer()
        self.steps = 0

    # -- called from any thread ------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        width = request.params.width
        if width > self.scheduler.config.max_num_seqs:
            raise RequestTooLarge(
                f"the request needs {width} rows in one step; the server runs at most "
                f"{self.scheduler.config.max_num_seqs} (--max-num-seqs)"
            )
        if not self.scheduler.fits_ever(request.max_len, width):
            capacity = self.scheduler.blocks.num_blocks * self.scheduler.blocks.block_size
            raise RequestTooLarge(
                f"{width} sequence(s) of up to {request.max_len} tokens need more KV than the store holds "
                f"({capacity} tokens); lower max_new_tokens, num_beams or num_return_sequences"
            )
        self._post("add", request)

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def pause(self, request_id: str) -> None:
        """Its client stopped reading: its rows leave the steps (keeping their KV while there is room)."""
        self._post("pause", request_id)

    def resume(self, request_id: str) -> None:
        self._post("resume", request_id)

    def start(self, thread: EngineThread | None = None) -> None:
        """Run the step loop on `thread` (the one that loaded the model: see engine_thread.py), or on
        a thread of its own."""
        own = thread is None
        thread = thread or EngineThread()
        self._running = thread.submit(self._run)
        if own:
            thread.close()  # nothing else runs there: the thread ends with the loop

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop stepping; requests still open end as cancelled."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._running is not None:
            wait([self._running], timeout)
        if self._running is None or self._running.done():
            log.info("%s", self.state_report())

    def state_report(self) -> str:
        """The scheduler's invariant check and what is still held: after a stop, nothing should be."""
        try:
            self.scheduler.check_invariants()
            verdict = "invariants hold"
        except AssertionError as exc:
            verdict = f"INVARIANT BROKEN ({exc})"
        blocks = self.scheduler.blocks
        seqs = sum(len(g.seqs) for g in list(self.scheduler.waiting) + self.scheduler.running + self.scheduler.paused)
        return (f"engine stopped after {self.steps} steps: {verdict}, {seqs} sequences, "
                f"{blocks.num_used} of {blocks.num_blocks} KV blocks in use")

    def _check_running(self) -> None:
        if self._stopping or (self._running is not None and self._running.done()):
            raise EngineUnavailable("the engine is not running; the server is shutting down or failed")

    def _post(self, kind: str, item) -> None:
        with self._wake:
            if kind == "add":
                self._check_running()  # here, under the lock: a stopping engine sees every add it took
            self._inbox.append((kind, item))
            self._wake.notify()

    # -- the engine thread -----------------------------------------------------

    def _run(self) -> None:
        death: BaseException | None = None
        # Count from here: a warm-up engine may have stepped the shared scheduler before.
        scheduler = self.scheduler
        self._preemptions_seen = scheduler.num_preemptions
        self._prefix_seen = (scheduler.prefix_query_tokens, scheduler.prefix_hit_tokens)
        try:
            self._loop()
        except BaseException as exc:  # a bug outside any one step: the engine cannot go on
            death = exc
            log.critical("the engine thread died; open requests fail and no new ones are taken", exc_info=True)
        finally:
            # No open stream may hang: a clean stop cancels them, a death fails them, and
            # those it had not taken in yet too.
            with self._wake:
                self._stopping = True
                orphans = [item for kind, item in self._inbox if kind == "add"]
                self._inbox.clear()
            if self._admitting is not None:
                orphans.append(self._admitting)
            if death is None:
                ends = [self._end(rid, FinishReason.CANCELLED) for rid in list(self._live)]
                ends += [_final(request, FinishReason.CANCELLED) for request in orphans]
            else:
                error = f"the engine failed ({type(death).__name__}: {death}); the server takes no new requests"
                ends = [self._end_quietly(rid, error) for rid in list(self._live)]
                ends += [_final(request, FinishReason.ERROR, error) for request in orphans]
            self.publish(ends)
            if self.on_exit is not None:
                self.on_exit(death)

    def _loop(self) -> None:
        while True:
            with self._wake:
                idle = self._idle()
            if idle:
                self._heap.on_idle()  # outside the lock: submit() need not wait for it
            with self._wake:
                while self._idle():
                    self._wake.wait()
                if self._stopping:
                    break
            self.run_once()
            self._heap.on_step()
        self._drain_inbox()

    def _idle(self) -> bool:
        """Nothing to take in, nothing to step, no stop asked (call with the lock held)."""
        return not self._inbox and not self.scheduler.has_work() and not self._stopping

    def run_once(self) -> None:
        """Take in new requests and aborts, then run one step if there is work."""
        self._drain_inbox()
        if self.scheduler.has_work():
            self.publish(self.step())
        self._record_state()

    def _drain_inbox(self) -> None:
        events = []
        while True:
            with self._wake:
                if not self._inbox:
                    break
                kind, item = self._inbox.popleft()
            if kind == "add":
                self._admitting = item
                try:
                    ended = self._admit(item)
                    if ended is not None:
                        events.append(ended)
                except Exception as exc:
                    log.exception("admitting request %s failed", item.request_id)
                    events.append(_final(item, FinishReason.ERROR, _describe(exc)))
                self._admitting = None
            elif item not in self._live:
                continue  # it ended before this reached the engine
            elif kind == "abort":
                events.append(self._end(item, FinishReason.CANCELLED))
            elif kind == "pause":
                self.scheduler.pause(self._live[item].group)
            else:
                self.scheduler.resume(self._live[item].group)
        if events:
            self.publish(events)

    def _admit(self, request: GenerationRequest) -> TokenEvent | None:
        return self.add(SequenceGroup.from_request(next(self.context.seq_ids), request))

    def add(self, group: SequenceGroup) -> TokenEvent | None:
        """Take a request's group in now, in its mode (engine thread only: other threads `submit`);
        the final event of one that ends at once (a resumed request with nothing left to generate)."""
        generation = self._start(group, self.context)
        if generation.finished_at_start:
            return generation.start_event()
        self._live[group.request_id] = generation
        self.scheduler.add(group)
        self._unscheduled.add(group.request_id)
        return None

    def _end(self, request_id: str, reason: FinishReason, error: str = "") -> TokenEvent:
        self._unscheduled.discard(request_id)
        return self._live.pop(request_id).abort(reason, self.scheduler, error)

    def _end_quietly(self, request_id: str, error: str) -> TokenEvent:
        """A failed request's final event, even when its own bookkeeping is what broke."""
        try:
            return self._end(request_id, FinishReason.ERROR, error)
        except Exception:
            log.exception("freeing request %s failed", request_id)
            self._live.pop(request_id, None)
            return TokenEvent(request_id, finish_reason=FinishReason.ERROR, final=True, error=error)

    def step(self) -> list[TokenEvent]:
        """Schedule, one forward over every scheduled row, then each request's own bookkeeping.
        A failed forward fails this step's requests; a request whose bookkeeping raises fails alone
        (INTERNAL to its client); the engine goes on either way."""
        started = time.monotonic()
        plan = self.scheduler.schedule()
        for group in plan.preempted + plan.reclaimed:
            self._live[group.request_id].restart()
        self._record_queue_waits(plan, started)
        rows, events = self._rows(plan)
        if rows:
            batch = Batch(rows, plan.block_copies)
            try:
                outputs = self.executor.execute(batch)
            except Exception as exc:
                log.exception("engine step failed")
                failed = dict.fromkeys(row.request_id for row in rows)
                return events + [self._end_quietly(rid, _describe(exc)) for rid in failed if rid in self._live]
            self.scheduler.step_done(plan)
            events += self._update(rows, outputs)
            self.steps += 1
            self.metrics.step(time.monotonic() - started, len(rows), batch.num_tokens)
        for event in events:
            if event.final:
                self._live.pop(event.request_id, None)
        return events

    def _rows(self, plan: SchedulerOutput) -> tuple[list[Row], list[TokenEvent]]:
        """Each scheduled chunk as its request's mode wants it computed."""
        rows, events, failed = [], [], set()
        for chunk in plan.chunks:
            request_id = chunk.seq.request_id
            if request_id in failed:
                continue
            try:
                rows.append(self._live[request_id].row(chunk))
            except Exception as exc:
                failed.add(request_id)
                events.append(self._fail(request_id, exc))
        if failed:  # their blocks are free now: nothing of theirs may be computed
            rows = [row for row in rows if row.request_id not in failed]
        return rows, events

    def _update(self, rows: list[Row], outputs: list[RowOutput]) -> list[TokenEvent]:
        """Hand each request its rows' outputs, all at once (a beam step needs every beam)."""
        results: dict[str, list[tuple[Row, RowOutput]]] = {}
        for row, output in zip(rows, outputs, strict=True):
            results.setdefault(row.request_id, []).append((row, output))
        events = []
        for request_id, done in results.items():
            try:
                events += self._live[request_id].apply(done, self.scheduler)
            except Exception as exc:
                events.append(self._fail(request_id, exc))
        return events

    def _fail(self, request_id: str, exc: Exception) -> TokenEvent:
        log.exception("request %s failed in its step; the others go on", request_id)
        return self._end_quietly(request_id, _describe(exc))

    # -- accounting --------------------------------------------------------------

    def _record_queue_waits(self, plan: SchedulerOutput, now: float) -> None:
        if not self._unscheduled:
            return
        for chunk in plan.chunks:
            request = chunk.seq.request
            if request.request_id in self._unscheduled:
                self._unscheduled.discard(request.request_id)
                self.metrics.queue_wait(now - request.arrival_time)

    def _record_state(self) -> None:
        """Gauges and the preemption counter, once per loop turn (O(running groups))."""
        scheduler, blocks = self.scheduler, self.scheduler.blocks
        self.metrics.gauges(
            waiting=len(scheduler.waiting),
            running_seqs=sum(len(g.seqs) for g in scheduler.running),
            paused_seqs=scheduler.num_paused_seqs,
            kv_used_blocks=blocks.num_used,
            kv_total_blocks=blocks.num_blocks,
            kv_bytes_used=blocks.num_used * self.executor.kv_bytes_per_block,
        )
        self.metrics.preempted(scheduler.num_preemptions - self._preemptions_seen)
        self._preemptions_seen = scheduler.num_preemptions
        queried, hits = scheduler.prefix_query_tokens, scheduler.prefix_hit_tokens
        self.metrics.prefix_cache(queried - self._prefix_seen[0], hits - self._prefix_seen[1])
        self._prefix_seen = (queried, hits)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _final(request: GenerationRequest, reason: FinishReason, error: str = "") -> TokenEvent:
    """The final event of a request that never became live."""
    return TokenEvent(request.request_id, finish_reason=reason, final=True,
                      prompt_tokens=len(request.prompt_ids), error=error)
