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

from .generation import Generation
from .metrics import Metrics
from .model_runner import ModelRunner, RunnerOutput
from .request import FinishReason, GenerationRequest, TokenEvent
from .sampler import Sampler
from .scheduler import Scheduler, SchedulerOutput
from .sequence import SequenceGroup

log = logging.getLogger(__name__)

Publish = Callable[[list[TokenEvent]], None]


class EngineUnavailable(RuntimeError):
    """The engine is stopping or its thread has died: it takes no new requests."""


class RequestTooLarge(ValueError):
    """The request can never fit in the KV store."""


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
    ):
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.publish = publish
        self.sampler = sampler or Sampler()
        self.metrics = metrics or Metrics()
        self._kv_block_bytes = runner.cache.bytes_per_block
        self._preemptions_seen = 0
        self._unscheduled: set[str] = set()  # admitted requests not yet in a step: their queue wait is open
        self._live: dict[str, Generation] = {}
        self._token_texts: dict[int, str] = {}
        self._inbox: deque[tuple[str, object]] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seq_ids = itertools.count()
        self.steps = 0

    # -- called from any thread ------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        if self._stopping or (self._thread is not None and not self._thread.is_alive()):
            raise EngineUnavailable("the engine is not running; the server is shutting down or failed")
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

    def _post(self, kind: str, item) -> None:
        with self._wake:
            self._inbox.append((kind, item))
            self._wake.notify()

    # -- the engine thread -----------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            # Also when the thread dies of a bug: no open stream may hang.
            self.publish([self._end(rid, FinishReason.CANCELLED) for rid in list(self._live)])

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._inbox and not self.scheduler.has_work() and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    break
            self.run_once()
        self._drain_inbox()

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
                self._admit(item)
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
        except Exception as exc:  # a failed step fails the requests in it, never the engine
            log.exception("engine step failed")
            error = f"{type(exc).__name__}: {exc}"
            touched = {chunk.seq.request_id for chunk in out.chunks}
            events = [self._end(rid, FinishReason.ERROR, error) for rid in touched if rid in self._live]
        self.publish(events)
        self.metrics.step(time.monotonic() - started, len(out.chunks), out.num_tokens)

    def step(self, out: SchedulerOutput) -> list[TokenEvent]:
        result = self.runner.execute(out)
        self.scheduler.step_done(out)
        events = self._score(out, result)
        rows = [(self._live[chunk.seq.request_id], chunk.seq, first) for chunk, first, _ in result.rows
                if chunk.seq.request.score_from is None]
        if rows:
            logits = result.logits[[first for _, _, first in rows]]  # [rows, vocab]
            sampled = self.sampler(logits, [gen.sample_row(seq) for gen, seq, _ in rows])
            events += self._apply(rows, sampled)
        self.steps += 1
        for event in events:
            if event.final:
                self._live.pop(event.request_id, None)
        return events

    def _score(self, out: SchedulerOutput, result: RunnerOutput) -> list[TokenEvent]:
        """Scoring rows: log-probabilities of their continuation tokens."""
        rows = {id(chunk): (first, count) for chunk, first, count in result.rows}
        events = []
        for chunk in out.chunks:
            gen = self._live.get(chunk.seq.request_id)
            if gen is None or not gen.is_scoring:
                continue
            first, count = rows.get(id(chunk), (0, 0))
            logprobs = []
            if count:
                start = max(chunk.start, chunk.seq.request.score_from - 1)
                labels = chunk.seq.token_ids[start + 1 : start + 1 + count]
                logprobs = self.sampler.label_logprobs(result.logits[first : first + count], labels)
            events += gen.on_scores(logprobs, chunk.samples, self.scheduler)
        return events

    def _apply(self, rows, sampled) -> list[TokenEvent]:
        events = []
        beam_rows: dict[str, list] = {}
        for (gen, seq, _), row in zip(rows, sampled):
            if gen.beams is not None:
                beam_rows.setdefault(gen.request_id, []).append(row)
            else:
                events += gen.on_sampled(seq, row, self.scheduler)
        for request_id, results in beam_rows.items():
            events += self._live[request_id].on_beam_step(results, self.scheduler)
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
