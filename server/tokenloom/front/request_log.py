"""One structured line per finished request, whatever the outcome: who, how much, how fast, how it ended.

The line goes to the `tokenloom.requests` logger at INFO as key=value pairs, e.g.

    request_id=3f2a... method=Generate front=grpc client=10.0.0.7 prompt_tokens=12 cached_tokens=0 generated_tokens=30
    delivered_tokens=30 ttft_s=0.0123 duration_s=0.3456 outcome=length

`generated_tokens` is what the engine produced for the request, `delivered_tokens` what of it
was handed to gRPC for the client (less when the client left or stopped reading). `outcome` is
the finish reason (eos, length, stop_string), `cancelled` when the client went away,
`stream_idle_timeout` when it stopped reading for longer than --stream-idle-timeout, or the gRPC status code of a failure (INVALID_ARGUMENT, RESOURCE_EXHAUSTED with `limit`,
UNAVAILABLE, INTERNAL, UNKNOWN). Times are from the RPC's arrival, so they are what the client
saw, tokenisation included.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field

from ..request import TokenEvent
from .stream import Stream

log = logging.getLogger("tokenloom.requests")

_BARE = re.compile(r"[\w.:/@\[\]+-]+")


@dataclass
class RequestRecord:
    method: str
    client: str
    front: str = "grpc"  # the protocol the call came in on: grpc or http
    started_at: float = field(default_factory=time.monotonic)
    request_id: str = ""
    prompt_tokens: int = 0
    first_token_at: float | None = None
    outcome: str = "UNKNOWN"  # until the final event or the exception that ends the call says more
    limit: str = ""  # the admission limit that rejected the request
    delivered_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    stalled: bool = False  # cut by the stream hub: the client stopped reading
    stream: Stream | None = None  # the request's stream, once it reached the engine
    _final_usage: int | None = None

    def on_event(self, event: TokenEvent) -> None:
        if self.first_token_at is None and (event.token_ids or event.final):
            self.first_token_at = time.monotonic()
        if not event.provisional:
            self.delivered_tokens += len(event.token_ids)
        if event.final:
            self._final_usage = event.generated_tokens  # the usage count the client gets
            self.cached_tokens = event.cached_tokens
            if event.finish_reason is not None:
                self.outcome = event.finish_reason.value

    @property
    def generated_tokens(self) -> int:
        """The usage count of the final event; without one, what the engine produced so far."""
        if self._final_usage is not None:
            return self._final_usage
        return self.stream.generated if self.stream is not None else self.delivered_tokens

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        ttft = "-" if self.first_token_at is None else f"{self.first_token_at - self.started_at:.4f}"
        fields = [
            ("request_id", self.request_id or "-"),
            ("method", self.method),
            ("front", self.front),
            ("client", self.client),
            ("prompt_tokens", self.prompt_tokens),
            ("cached_tokens", self.cached_tokens),
            ("generated_tokens", self.generated_tokens),
            ("delivered_tokens", self.delivered_tokens),
            ("ttft_s", ttft),
            ("duration_s", f"{now - self.started_at:.4f}"),
            ("outcome", self.outcome),
        ]
        if self.limit:
            fields.append(("limit", self.limit))
        return " ".join(f"{key}={_value(value)}" for key, value in fields)

    def emit(self) -> None:
        log.info("%s", self.line())


def _value(value) -> str:
    """Bare when safe, else JSON-quoted: a client id with spaces or newlines cannot forge a field or a line."""
    text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)
