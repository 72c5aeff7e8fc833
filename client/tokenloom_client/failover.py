"""Several replicas behind one client: gRPC's own balancing, and streams that survive a dead replica.

- **Targets.** A `Client` takes one address, several (`["10.0.0.1:50051", "10.0.0.2:50051"]`, or one
  string with commas), or a DNS name with many records (`dns:///tokenloom-headless:50051`). With
  more than one address, or a `dns:` target, the channel's service config asks gRPC for its built-in
  `round_robin` policy with client-side health checking (the servers' standard health service: a
  loading or draining replica gets no new calls), and a retry policy that resends a call that failed
  UNAVAILABLE before any response came back (a replica that died or refused at its door).
- **Resumption.** A stream broken with UNAVAILABLE after tokens arrived is sent again with those
  tokens as `resume` (the server continues exactly where the stream ended: greedy and seeded sampling
  are deterministic by position), so the caller sees one uninterrupted stream. A sampled request
  without a seed is given one here, so that its resumption draws the same numbers. Beam requests are
  not resumable: they restart. `Resumption` is the pure bookkeeping; the clients run the calls.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from .pb.tokenloom.v1 import generation_pb2 as pb
from .types import StreamChunk

log = logging.getLogger(__name__)

SERVICE = "tokenloom.v1.Generation"
MAX_RESUMES = 8  # per stream: a stream broken more often than this fails with its last error
RETRY_POLICY = {  # gRPC's: only calls that got no response yet are retried
    "maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def channel_target(target: str | Sequence[str]) -> tuple[str, list[tuple[str, object]], bool]:
    """The gRPC target, its channel options, and whether it balances over replicas (several addresses
    or a `dns:` name: only then are calls retried and streams resumed, since only then is there
    another replica to go to)."""
    addresses = [t.strip() for t in target.split(",")] if isinstance(target, str) else [t.strip() for t in target]
    addresses = [a for a in addresses if a]
    if not addresses:
        raise ValueError("no target address given")
    if len(addresses) == 1 and not addresses[0].startswith("dns:"):
        return addresses[0], [], False
    target = addresses[0] if len(addresses) == 1 else "ipv4:" + ",".join(_ipv4(a) for a in addresses)
    return target, [("grpc.service_config", json.dumps(SERVICE_CONFIG)), ("grpc.enable_retries", 1)], True


SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": SERVICE},
    "methodConfig": [{"name": [{"service": SERVICE}], "retryPolicy": RETRY_POLICY}],
}


def _ipv4(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r}: give each address as host:port")
    host = "127.0.0.1" if host == "localhost" else host
    parts = host.split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) < 256 for p in parts):
        raise ValueError(f"{address!r}: several addresses must be IPv4 literals (host:port); for host names "
                         "use one DNS name with several records, e.g. 'dns:///tokenloom-headless:50051'")
    return f"{host}:{port}"


def with_seed(request: pb.GenerateRequest) -> pb.GenerateRequest:
    """A sampled request without a seed gets one here: a retry or a resumption then draws the same tokens."""
    p = request.parameters
    if p.do_sample and not p.HasField("seed"):
        p.seed = secrets.randbits(64)
    return request


@dataclass
class FailoverStats:
    """What resumptions cost so far, over a client's streams."""

    resumed_streams: int = 0  # streams continued (or, for beams, restarted) after a broken connection
    resumes: int = 0  # calls sent to continue them (more than one when a resumed call broke too)
    resent_tokens: int = 0  # tokens sent back to a server as `resume`
    # a stream's break -> its next message, for the last 1,000 resumptions
    resume_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=1000))


class Resumption:
    """One stream's progress, kept so that it can be sent again after a break."""

    def __init__(self, request: pb.GenerateRequest, stats: FailoverStats, enabled: bool = True):
        self.enabled = enabled
        self.original = with_seed(request) if enabled else request
        self.request = self.original
        self.stats = stats
        self.beams = request.parameters.HasField("num_beams") and request.parameters.num_beams > 1
        self.tokens: dict[int, list[int]] = {}
        self.logprobs: dict[int, float] = {}  # per index, the sum over tokens received so far
        self.resumed_logprobs: dict[int, float] = {}  # ... over the tokens sent as resume
        self.attempts = 0
        self.broken_at: float | None = None
        self.finished = False  # the final message arrived: a break after it loses nothing

    def seen(self, chunk: StreamChunk) -> StreamChunk:
        """Record a chunk; the final one's hypotheses get the scores of the tokens sent before a resume."""
        if self.broken_at is not None:
            self.stats.resume_seconds.append(time.monotonic() - self.broken_at)
            self.broken_at = None
        if chunk.usage is not None:
            self.finished = True
        if not chunk.provisional:
            self.tokens.setdefault(chunk.index, []).extend(chunk.token_ids)
            self.logprobs[chunk.index] = self.logprobs.get(chunk.index, 0.0) + sum(chunk.logprobs)
        if chunk.hypotheses and not chunk.provisional and self.resumed_logprobs:
            hypotheses = [dataclasses.replace(h, score=h.score + self.resumed_logprobs.get(i, 0.0))
                          for i, h in enumerate(chunk.hypotheses)]
            chunk = dataclasses.replace(chunk, hypotheses=hypotheses)
        return chunk

    def retry(self, error: grpc.RpcError) -> bool:
        """Whether to send the stream again after `error`; if so, `request` is what to send."""
        if not self.enabled or error.code() != grpc.StatusCode.UNAVAILABLE or self.attempts >= MAX_RESUMES:
            return False
        if self.finished:  # everything arrived; only the status was lost: end the stream as it is
            return False
        self.attempts += 1
        if self.broken_at is None:  # the first break of a run of them: the latency counts from here
            self.broken_at = time.monotonic()
        self.stats.resumes += 1
        self.stats.resumed_streams += self.attempts == 1
        request = pb.GenerateRequest()
        request.CopyFrom(self.original)
        if not self.beams:  # beams restart from the prompt
            n = max(self.tokens, default=-1) + 1
            for i in range(n):
                request.resume.add(token_ids=self.tokens.get(i, []))
            self.resumed_logprobs = dict(self.logprobs)
            self.stats.resent_tokens += sum(len(t) for t in self.tokens.values())
        self.request = request
        log.info("stream of request %s broken (%s: %s); %s on another replica", self.original.request_id or "-",
                 error.code().name, error.details(), "restarting" if self.beams else "resuming")
        return True

    @property
    def backoff(self) -> float:
        """Seconds to wait before the next call: none for the first resumption, then doubling (a
        replica that just died may still be picked until gRPC has seen its connection fail)."""
        return 0.0 if self.attempts <= 1 else min(0.05 * 2 ** (self.attempts - 2), 1.0)
