"""The step loop: schedule -> run -> sample -> update -> emit, in a thread of its own.

The asyncio side talks to the engine only through `submit` and `abort`, which
queue work for the next step, and the `publish` callback, which receives the
events of a whole step at once (the server hands them to the event loop).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from typing import Callable

from ..fault import FaultPlan
from .generation import Generation
from .heap import HeapTrimmer
from ..metrics import Metrics
from ..executor.model_runner import ModelRunner, RunnerOutput
from ..request import EngineUnavailable, FinishReason, GenerationRequest, RequestTooLarge, TokenEvent
from ..executor.sampler import Sampler
from .scheduler import Scheduler, SchedulerOutput
from .sequence import SequenceGroup

log = logging.getLogger(__name__)

Publish = Callable[[list[TokenEvent]], None]
OnExit = Callable[[BaseException | None], None]


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer,
        eos_token_ids: frozenset[int],
        publish: Publish,
        sampler: Sampler | None = None,
        metrics: Metrics | None = None,
        faults: FaultPlan | None = None,
        on_exit: OnExit | None = None,
    ):
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.publish = publish
        self.sampler = sampler or Sampler()
        self.metrics = metrics or Metrics()
        self.faults = faults or FaultPlan()
        self.on_exit = on_exit  # called from the engine thread when it ends: None, or what killed it
        self._kv_block_bytes = runner.cache.bytes_per_block
        self._preemptions_seen = 0
        self._unscheduled: set[str] = set()  # admitted requests not yet in a step: their queue wait is open
        self._live: dict[str, Generation] = {}
        self._token_texts: dict[int, str] = {}
        self._inbox: deque[tuple[str, object]] = deque()
        self._admitting: GenerationRequest | None = None  # taken from the inbox, not yet live
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seq_ids = itertools.count()
        self._heap = HeapTrimmer()
        self.steps = 0

    # -- called from any thread ------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        params = request.params
        tokens = len(request.prompt_ids) + (0 if request.score_from is not None else params.max_new_tokens)
        width = 1 if request.score_from is not None else params.width
        if width > self.scheduler.config.max_num_seqs:
            raise RequestTooLarge(
                f"the request needs {width} rows in one step; the server runs at most "
                f"{self.scheduler.config.max_num_seqs} (--max-num-seqs)"
            )
        if not self.scheduler.fits_ever(tokens, width):
            capacity = self.scheduler.blocks.num_blocks * self.scheduler.blocks.block_size
            raise RequestTooLarge(
                f"{width} sequence(s) of up to {tokens} tokens need more KV than the store holds "
                f"({capacity} tokens); lower max_new_tokens, num_beams or num_return_sequences"
            )
        self._post("add", request)

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tokenloom-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop stepping; requests still open end as cancelled."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            log.info("%s", self.state_report())

    def state_report(self) -> str:
        """The scheduler's invariant check and what is still held: after a stop, nothing should be."""
        try:
            self.scheduler.check_invariants()
            verdict = "invariants hold"
        except AssertionError as exc:
            verdict = f"INVARIANT BROKEN ({exc})"
        blocks = self.scheduler.blocks
        seqs = sum(len(g.seqs) for g in list(self.scheduler.waiting) + self.scheduler.running)
        return (f"engine stopped after {self.steps} steps: {verdict}, {seqs} sequences, "
                f"{blocks.num_used} of {blocks.num_blocks} KV blocks in use")

    def _check_running(self) -> None:
        if self._stopping or (self._thread is not None and not self._thread.is_alive()):
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
            self._step_safely()
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
                self.faults.on_admit(item.params.seed, item.request_id)
                try:
                    self._admit(item)
                except Exception as exc:
                    log.exception("admitting request %s failed", item.request_id)
                    events.append(_final(item, FinishReason.ERROR, _describe(exc)))
                self._admitting = None
            elif item in self._live:
                events.append(self._end(item, FinishReason.CANCELLED))
        if events:
            self.publish(events)

    def _admit(self, request: GenerationRequest) -> None:
        group = SequenceGroup.from_request(next(self._seq_ids), request)
        self._live[request.request_id] = Generation(
            group, self.tokenizer, self.eos_token_ids, self._token_text, self._seq_ids
        )
        self.scheduler.add(group)
        self._unscheduled.add(request.request_id)

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

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

    def _step_safely(self) -> None:
        started = time.monotonic()
        out = self.scheduler.schedule()
        for group in out.preempted:
            self._live[group.request_id].restart()
        if not out.chunks:
            return
        if self._unscheduled:
            self._record_queue_waits(out, started)
        try:
            events = self.step(out)
        except Exception as exc:  # a failed forward or sampler fails the step's requests, never the engine
            log.exception("engine step failed")
            touched = {chunk.seq.request_id for chunk in out.chunks}
            events = [self._end_quietly(rid, _describe(exc)) for rid in touched if rid in self._live]
        self.publish(events)
        self.metrics.step(time.monotonic() - started, len(out.chunks), out.num_tokens)

    def step(self, out: SchedulerOutput) -> list[TokenEvent]:
        """One forward over the scheduled chunks, then each request's own bookkeeping. A request
        whose bookkeeping raises fails alone (INTERNAL to its client); the others go on."""
        result = self.runner.execute(out)
        self.scheduler.step_done(out)
        events = self._score(out, result)
        by_request: dict[str, list] = {}
        for chunk, first, _ in result.rows:
            if chunk.seq.request.score_from is None:
                by_request.setdefault(chunk.seq.request_id, []).append((chunk.seq, first))
        rows = []  # (generation, sequence, logits row, sample row)
        for request_id, seqs in by_request.items():
            gen = self._live[request_id]
            try:
                rows += [(gen, seq, first, self._sample_row(gen, seq)) for seq, first in seqs]
            except Exception as exc:
                events.append(self._fail(request_id, exc))
        if rows:
            logits = result.logits[[first for _, _, first, _ in rows]]  # [rows, vocab]
            sampled = self.sampler(logits, [row for _, _, _, row in rows])
            events += self._apply(rows, sampled)
        self.steps += 1
        for event in events:
            if event.final:
                self._live.pop(event.request_id, None)
        return events

    def _sample_row(self, gen: Generation, seq):
        self.faults.on_sampling(gen.params.seed, seq.num_generated, gen.request_id)
        return gen.sample_row(seq)

    def _fail(self, request_id: str, exc: Exception) -> TokenEvent:
        log.exception("request %s failed in its step; the others go on", request_id)
        return self._end_quietly(request_id, _describe(exc))

    def _score(self, out: SchedulerOutput, result: RunnerOutput) -> list[TokenEvent]:
        """Scoring rows: log-probabilities of their continuation tokens."""
        rows = {id(chunk): (first, count) for chunk, first, count in result.rows}
        events = []
        for chunk in out.chunks:
            gen = self._live.get(chunk.seq.request_id)
            if gen is None or not gen.is_scoring:
                continue
            try:
                first, count = rows.get(id(chunk), (0, 0))
                logprobs = []
                if count:
                    start = max(chunk.start, chunk.seq.request.score_from - 1)
                    labels = chunk.seq.token_ids[start + 1 : start + 1 + count]
                    logprobs = self.sampler.label_logprobs(result.logits[first : first + count], labels)
                events += gen.on_scores(logprobs, chunk.samples, self.scheduler)
            except Exception as exc:
                events.append(self._fail(gen.request_id, exc))
        return events

    def _apply(self, rows, sampled) -> list[TokenEvent]:
        per_request: dict[str, list] = {}
        for (gen, seq, _, _), row in zip(rows, sampled):
            per_request.setdefault(gen.request_id, []).append((gen, seq, row))
        events = []
        for request_id, results in per_request.items():
            gen = results[0][0]
            try:
                if gen.beams is not None:
                    events += gen.on_beam_step([row for _, _, row in results], self.scheduler)
                else:
                    for _, seq, row in results:
                        events += gen.on_sampled(seq, row, self.scheduler)
            except Exception as exc:
                events.append(self._fail(request_id, exc))
        return events

    # -- accounting --------------------------------------------------------------

    def _record_queue_waits(self, out: SchedulerOutput, now: float) -> None:
        for chunk in out.chunks:
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
            kv_used_blocks=blocks.num_used,
            kv_total_blocks=blocks.num_blocks,
            kv_bytes_used=blocks.num_used * self._kv_block_bytes,
        )
        self.metrics.preempted(scheduler.num_preemptions - self._preemptions_seen)
        self._preemptions_seen = scheduler.num_preemptions

    @property
    def num_live(self) -> int:
        return len(self._live)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _final(request: GenerationRequest, reason: FinishReason, error: str = "") -> TokenEvent:
    """The final event of a request that never became live."""
    return TokenEvent(request.request_id, finish_reason=reason, final=True,
                      prompt_tokens=len(request.prompt_ids), error=error)
