"""The step loop: schedule -> run -> sample -> update -> emit, in a thread of its own.

The asyncio side talks to the engine only through `submit` and `abort`, which
queue work for the next step, and the `publish` callback, which receives the
events of a whole step at once (the server hands them to the event loop).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner
from .request import FinishReason, GenerationRequest, TokenEvent
from .sampler import RowRandom, Sampler
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence
from .stopping import check_stop

log = logging.getLogger(__name__)

Publish = Callable[[list[TokenEvent]], None]


class EngineUnavailable(RuntimeError):
    """The engine is stopping or its thread has died: it takes no new requests."""


@dataclass(eq=False)
class _Live:
    """Engine-side state of one admitted request."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer
    random: RowRandom | None


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer,
        eos_token_ids: frozenset[int],
        publish: Publish,
        sampler: Sampler | None = None,
    ):
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.publish = publish
        self.sampler = sampler or Sampler()
        self._live: dict[str, _Live] = {}
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
            self.publish([self._finish(live, FinishReason.CANCELLED) for live in list(self._live.values())])

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
                events.append(self._finish(self._live[item], FinishReason.CANCELLED))
        if events:
            self.publish(events)

    def _admit(self, request: GenerationRequest) -> None:
        seq = Sequence.from_request(next(self._seq_ids), request)
        random = RowRandom(request.params.seed) if request.params.do_sample else None
        self._live[request.request_id] = _Live(seq, IncrementalDetokenizer(self.tokenizer), random)
        self.scheduler.add(seq)

    def _step_safely(self) -> None:
        out = self.scheduler.schedule()
        if not out.chunks:
            return
        try:
            events = self.step(out)
        except Exception as exc:  # a failed step fails the requests in it, never the engine
            log.exception("engine step failed")
            error = f"{type(exc).__name__}: {exc}"
            touched = {chunk.seq.request_id for chunk in out.chunks}
            events = [self._finish(self._live[rid], FinishReason.ERROR, error) for rid in touched]
        self.publish(events)

    def step(self, out: SchedulerOutput) -> list[TokenEvent]:
        result = self.runner.execute(out)
        self.scheduler.step_done(out)
        lives = [self._live[chunk.seq.request_id] for chunk in result.chunks]
        sampled = self.sampler(
            result.logits, [live.seq.request.params for live in lives], [live.random for live in lives]
        )
        self.steps += 1
        return [
            self._append(live, token, logprob)
            for live, token, logprob in zip(lives, sampled.token_ids, sampled.logprobs)
        ]

    def _append(self, live: _Live, token: int, logprob: float) -> TokenEvent:
        seq = live.seq
        seq.token_ids.append(token)
        delta = live.detokenizer.add(token)
        params = seq.request.params
        reason = check_stop(
            last_token=token,
            num_generated=seq.num_generated,
            max_new_tokens=params.max_new_tokens,
            eos_token_ids=self.eos_token_ids,
            text=live.detokenizer.text,
            new_text_len=len(delta),
            stop_strings=params.stop_strings,
        )
        if reason is not None:
            return self._finish(live, reason, token=token, logprob=logprob, text=delta)
        return TokenEvent(seq.request_id, (token,), (logprob,), delta)

    def _finish(
        self, live: _Live, reason: FinishReason, error: str = "", token: int | None = None,
        logprob: float = 0.0, text: str = "",
    ) -> TokenEvent:
        seq = live.seq
        self.scheduler.finish(seq)
        del self._live[seq.request_id]
        seq.finish_reason = reason
        tokens = () if token is None else (token,)
        return TokenEvent(
            seq.request_id,
            tokens,
            (logprob,) if tokens else (),
            text + live.detokenizer.flush(),
            finish_reason=reason,
            prompt_tokens=seq.prompt_len,
            generated_tokens=seq.num_generated,
            error=error,
        )

    # -- accounting --------------------------------------------------------------

    @property
    def num_live(self) -> int:
        return len(self._live)
