"""Reading a live server's /metrics the way a dashboard does: one scrape, parsed by prometheus_client."""

from __future__ import annotations

import time
import urllib.request
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "tokenloom_"


class Scrape:
    """One scrape of a server's /metrics, keyed by sample name and labels."""

    def __init__(self, url: str):
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        self.values = {(s.name, frozenset(s.labels.items())): s.value
                       for family in text_string_to_metric_families(text) for s in family.samples}

    def get(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` that carry `labels` (and any others: e.g. both fronts)."""
        want = frozenset(labels.items())
        return sum(v for (n, k), v in self.values.items() if n == PREFIX + name and want <= k)

    def by_label(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """Sums of the samples of `name` that carry `labels`, by the value of `label`."""
        want, sums = frozenset(labels.items()), {}
        for (n, k), v in self.values.items():
            if n == PREFIX + name and want <= k:
                sums[dict(k)[label]] = sums.get(dict(k)[label], 0.0) + v
        return sums

    def outcomes(self) -> dict[str, float]:
        return self.by_label("requests_finished_total", "outcome")

    def finished(self, outcome: str) -> float:
        return self.get("requests_finished_total", outcome=outcome)

    @property
    def running(self) -> float:
        return self.get("running_sequences")

    @property
    def kv_bytes(self) -> float:
        return self.get("kv_cache_used_bytes")

    @property
    def steps(self) -> float:
        return self.get("step_duration_seconds_count")

    @property
    def idle(self) -> bool:
        """No sequence runs and no KV block is held."""
        return self.running == 0 and self.kv_bytes == 0


def poll(url: str, ready: Callable[[Scrape], bool], timeout: float = 10.0) -> Scrape:
    """The first scrape for which `ready(scrape)` holds; the last one once `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        scrape = Scrape(url)
        if ready(scrape) or time.monotonic() > deadline:
            return scrape
        time.sleep(0.02)
