"""When the engine gives freed heap back: on going idle (rate-limited) and periodically under load."""

from tokenloom.engine.heap import HeapTrimmer


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_trims_when_idle_at_most_once_per_idle_interval_and_periodically_under_load():
    clock = Clock()
    heap = HeapTrimmer(interval_s=30, idle_interval_s=1, clock=clock)
    clock.now = 0.5
    heap.on_idle()
    assert heap.trims == 0
    clock.now = 1.5
    heap.on_idle()
    heap.on_idle()
    assert heap.trims == 1
    for t in range(2, 31):
        clock.now = float(t)
        heap.on_step()
    assert heap.trims == 1
    clock.now = 31.5
    heap.on_step()
    assert heap.trims == 2
