"""The one thread that runs every torch operation of a server process: the model's loading, its
warm-up, and then the engine's step loop, in that order.

Why one: torch's CPU kernels (oneDNN, our C++ kernels, ATen's parallel_for) parallelise with
OpenMP, and GNU OpenMP gives every thread that opens a parallel region a team of its own. Once a
process holds more OpenMP threads than cores, libgomp throttles the spinning by which idle team
threads wait for the next region (GOMP_SPINCOUNT's throttled value), so they sleep, and a decode
step of a few hundred small parallel regions pays a futex wake-up in each. Measured on the 2-core
machine: a oneDNN 576->1536 linear at one row took 44 us on the thread that had loaded the model
and 101 us on a second thread; a one-row decode step of the default model 7-8.5 ms against
14-17 ms. With the load on this thread too, the process has one team.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable


class EngineThread:
    """A daemon thread that runs the callables handed to `submit`, one after another."""

    def __init__(self, name: str = "tokenloom-engine"):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args))
        return future

    def call(self, fn: Callable, *args):
        """Run `fn(*args)` on the thread and wait for its result (or its exception)."""
        return self.submit(fn, *args).result()

    def close(self) -> None:
        """The thread ends once what was submitted before has run."""
        self._calls.put(None)

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)
