"""Prometheus metrics: the only module that imports prometheus_client.

Other modules call the small methods of `Metrics` with plain numbers and
strings. The engine thread records steps, gauges and preemptions once per step;
the asyncio side records what a client sees (first token, gaps between tokens,
end to end, outcome). Labels stay low-cardinality: an outcome or a reason,
never a request id or a client.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

PREFIX = "tokenloom_"

# Outcomes and reasons exported at 0 from the start, so that rate() and alerts see them
# before the first occurrence. Any other value still counts when it happens.
KNOWN_OUTCOMES = (
    "eos", "length", "stop_string", "cancelled", "stream_idle_timeout", "shutdown",
    "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL",
)
KNOWN_REJECT_REASONS = (
    "rate_limit_per_client", "max_streams_per_client", "max_queued_requests", "max_queued_prompt_tokens",
    "max_queue_wait", "draining", "too_large", "engine_unavailable",
)
KNOWN_AUTH_FAILURES = ("missing", "malformed", "rejected")
FRONTS = ("grpc", "http")  # the protocols requests come in on (the `front` label)

# Latency buckets span a fast GPU (sub-millisecond decode steps) to a loaded CPU (seconds).
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
_QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class MetricsConfig:
    port: int = 8000  # 0: no metrics endpoint
    host: str = "0.0.0.0"

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"metrics port {self.port} is not in 0..65535")


class Metrics:
    def __init__(self):
        # A registry of our own: two servers (or engines in tests) in one process do not mix.
        self.registry = r = CollectorRegistry()
        self._finished = Counter(
            PREFIX + "requests_finished", "Requests ended, by outcome: a finish reason (eos, length, "
            "stop_string), cancelled by the client, shutdown (ended when the drain's grace ran out), or the gRPC "
            "status code name of an error; and by front (grpc, http)",
            ["outcome", "front"], registry=r,
        )
        self._rejected = Counter(
            PREFIX + "requests_rejected", "Requests refused before running, by reason and front (grpc, http)",
            ["reason", "front"], registry=r
        )
        self._auth_failures = Counter(
            PREFIX + "auth_failures", "Calls refused with UNAUTHENTICATED, by reason: no token (missing), "
            "not 'Bearer <token>' (malformed), a token not accepted (rejected)", ["reason"], registry=r,
        )
        self._malformed = Counter(
            PREFIX + "malformed_requests", "Calls refused with INVALID_ARGUMENT because their body did not parse",
            registry=r,
        )
        self._prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Input tokens of requests that reached the engine", registry=r
        )
        self._generated_tokens = Counter(
            PREFIX + "generated_tokens", "Tokens generated and handed to their requests", registry=r
        )
        self._preemptions = Counter(
            PREFIX + "preemptions", "Requests preempted (KV freed, recomputed later)", registry=r
        )
        self._prefix_queries = Counter(
            PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache (all but each prompt's last)",
            registry=r)
        self._prefix_hits = Counter(
            PREFIX + "prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache", registry=r)
        self._ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "From the request's arrival to its first token",
            buckets=_TTFT_BUCKETS, registry=r,
        )
        self._itl = Histogram(
            PREFIX + "inter_token_latency_seconds", "Between consecutive engine steps that gave a request output",
            buckets=_STEP_BUCKETS, registry=r,
        )
        self._e2e = Histogram(
            PREFIX + "request_duration_seconds", "From arrival to the final event, for requests the engine ended",
            buckets=_E2E_BUCKETS, registry=r,
        )
        self._queue_wait = Histogram(
            PREFIX + "queue_wait_seconds", "From arrival to the request's first engine step",
            buckets=_QUEUE_BUCKETS, registry=r,
        )
        self._step = Histogram(PREFIX + "step_duration_seconds", "One engine step, schedule to publish",
                               buckets=_STEP_BUCKETS, registry=r)
        self._step_rows = Histogram(PREFIX + "step_rows", "Sequences computed in one engine step",
                                    buckets=_ROW_BUCKETS, registry=r)
        self._step_tokens = Histogram(PREFIX + "step_tokens", "Tokens computed in one engine step (prefill and decode)",
                                      buckets=_TOKEN_BUCKETS, registry=r)
        self._waiting = Gauge(
            PREFIX + "waiting_requests", "Requests queued for their first (or, if preempted, next) step", registry=r
        )
        self._running = Gauge(PREFIX + "running_sequences", "Sequences holding KV in the running batch", registry=r)
        self._paused = Gauge(PREFIX + "paused_sequences",
                             "Sequences out of the steps because their client stopped reading", registry=r)
        self._stream_pauses = Counter(PREFIX + "stream_pauses",
                                      "Times a request's rows paused because its client had not read its buffer",
                                      registry=r)
        self._open_streams = Gauge(PREFIX + "open_streams", "Requests between submission and their last event read",
                                   registry=r)
        self._kv_ratio = Gauge(PREFIX + "kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self._kv_bytes = Gauge(PREFIX + "kv_cache_used_bytes", "Bytes of the KV store in used blocks", registry=r)
        for front in FRONTS:
            for outcome in KNOWN_OUTCOMES:
                self._finished.labels(outcome=outcome, front=front)
            for reason in KNOWN_REJECT_REASONS:
                self._rejected.labels(reason=reason, front=front)
        for reason in KNOWN_AUTH_FAILURES:
            self._auth_failures.labels(reason=reason)

    # -- the asyncio side: what clients see -------------------------------------------

    def request_finished(self, outcome: str, front: str = "grpc") -> None:
        self._finished.labels(outcome=outcome, front=front).inc()

    def rejected(self, reason: str, front: str = "grpc") -> None:
        self._rejected.labels(reason=reason, front=front).inc()

    def auth_failed(self, reason: str) -> None:
        self._auth_failures.labels(reason=reason).inc()

    def malformed_request(self) -> None:
        self._malformed.inc()

    def tokens(self, prompt: int, generated: int) -> None:
        self._prompt_tokens.inc(prompt)
        self._generated_tokens.inc(generated)

    def stream_paused(self) -> None:
        self._stream_pauses.inc()

    def open_streams(self, n: int) -> None:
        self._open_streams.set(n)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def end_to_end(self, seconds: float) -> None:
        self._e2e.observe(seconds)

    # -- the engine thread: once per step ------------------------------------------------

    def queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def step(self, seconds: float, rows: int, tokens: int) -> None:
        self._step.observe(seconds)
        self._step_rows.observe(rows)
        self._step_tokens.observe(tokens)

    def gauges(self, waiting: int, running_seqs: int, kv_used_blocks: int, kv_total_blocks: int,
               kv_bytes_used: int, paused_seqs: int = 0) -> None:
        self._waiting.set(waiting)
        self._running.set(running_seqs)
        self._paused.set(paused_seqs)
        self._kv_ratio.set(kv_used_blocks / kv_total_blocks if kv_total_blocks else 0.0)
        self._kv_bytes.set(kv_bytes_used)

    def prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        if queried_tokens:
            self._prefix_queries.inc(queried_tokens)
        if hit_tokens:
            self._prefix_hits.inc(hit_tokens)

    def preempted(self, n: int) -> None:
        if n:
            self._preemptions.inc(n)

    # -- reading and serving ---------------------------------------------------------------

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (e.g. "tokenloom_step_rows_count"); 0 when absent."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def serve_http(self, config: MetricsConfig) -> "MetricsEndpoint | None":
        """Expose the registry on `config.host:config.port` (a thread of its own); None when disabled."""
        if not config.port:
            return None
        try:
            httpd, thread = start_http_server(config.port, config.host, registry=self.registry)
        except OSError as exc:
            raise RuntimeError(f"cannot listen on {config.host}:{config.port} for metrics: {exc}") from exc
        log.info("metrics on http://%s:%d/metrics", config.host, config.port)
        return MetricsEndpoint(httpd, thread)


@dataclass
class MetricsEndpoint:
    httpd: object
    thread: object

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5.0)
