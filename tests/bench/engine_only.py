"""The engine alone, in this process, with no gRPC: the same requests and concurrency as over the wire.

The runtime is built from the server's own flag parser and `load_runtime`, requests go through the
server's `Preprocessor` as the servicer sends them, and outputs are timed in the `publish` callback,
where the server would hand them to its event loop. The difference to the gRPC run is the cost of
gRPC, the event loop and the client. The model forward, sampling and scheduling are timed too.
"""

from __future__ import annotations

import queue
import threading
import time

from results import RequestResult
from workload import Request


class _Timed:
    """Wraps a callable (or an object with __call__) and adds up the seconds spent in it."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t

    def __getattr__(self, name):
        return getattr(self.inner, name)


def load(model: str, server_args: list[str], thread=None):
    """A warmed-up `Runtime` configured exactly as `python -m tokenloom --model MODEL ARGS` would be, and
    the thread that loaded it (where its engine must step: engine/engine_thread.py). Pass the thread
    that runs the process's other torch work, if any, so the process keeps one OpenMP team."""
    from tokenloom.__main__ import parser, runtime_configs
    from tokenloom.engine.engine_thread import EngineThread
    from tokenloom.runtime import load_runtime

    thread = thread or EngineThread()
    runtime = thread.call(load_runtime, *runtime_configs(parser().parse_args(["--model", str(model), *server_args])))
    thread.call(runtime.warm_up)
    return runtime, thread


class EngineDriver:
    def __init__(self, runtime, thread):
        from tokenloom.request import FinishReason

        self._error_reasons = (FinishReason.ERROR, FinishReason.CANCELLED)
        self.runtime = runtime
        self._live: dict[str, RequestResult] = {}
        self._lock = threading.Lock()
        self._done: queue.Queue[str] = queue.Queue()
        self.engine = runtime.engine(self._publish)
        executor = self.engine.executor
        self.forward = executor.execute = _Timed(executor.execute)
        self.sample = executor.sampler = _Timed(executor.sampler)
        self.schedule = self.engine.scheduler.schedule = _Timed(self.engine.scheduler.schedule)
        self.engine.start(thread)

    def _publish(self, events) -> None:
        """The engine thread, once per step."""
        now = time.perf_counter()
        with self._lock:
            for event in events:
                result = self._live.get(event.request_id)
                if result is None:
                    continue
                if event.token_ids or event.provisional:
                    result.output_times.append(now)
                    result.tokens += len(event.token_ids)
                if event.final:
                    if event.finish_reason in self._error_reasons:
                        result.error = event.error or event.finish_reason.value
                    result.end = now
                    self._done.put(event.request_id)

    def _submit(self, req: Request) -> None:
        from tokenloom.front.preprocessor import UserInput
        from tokenloom.front.validation import RawParams

        request = self.runtime.preprocessor(UserInput(input_ids=req.prompt_ids), RawParams(**req.sdk_params()))
        with self._lock:
            self._live[request.request_id] = RequestResult(req.index, time.perf_counter())
        self.engine.submit(request)

    def closed_loop(self, requests: list[Request], concurrency: int, progress) -> tuple:
        timers = (self.forward, self.sample, self.schedule)
        for timer in timers:
            timer.seconds = 0.0
        pending = iter(requests)
        t0 = time.perf_counter()
        open_ = 0
        for req in pending:
            self._submit(req)
            open_ += 1
            if open_ == concurrency:
                break
        results = []
        while open_:
            request_id = self._done.get()
            with self._lock:
                result = self._live.pop(request_id)
            results.append(result)
            progress(len(result.output_times))
            open_ -= 1
            for req in pending:
                self._submit(req)
                open_ += 1
                break
        t1 = time.perf_counter()
        # The executor samples inside its execute(): the forward is what is left of it.
        breakdown = {"forward_s": self.forward.seconds - self.sample.seconds, "sample_s": self.sample.seconds,
                     "schedule_s": self.schedule.seconds, "wall_s": t1 - t0}
        return sorted(results, key=lambda r: r.index), t0, t1, breakdown

    def stop(self) -> None:
        self.engine.stop()
