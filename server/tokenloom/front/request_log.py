"""One structured line per finished request, whatever the outcome: who, how much, how fast, how it ended.

The line goes to the `tokenloom.requests` logger at INFO as key=value pairs, e.g.

    request_id=3f2a... method=Generate client=10.0.0.7 prompt_tokens=12 generated_tokens=30
    ttft_s=0.0123 duration_s=0.3456 outcome=length

`outcome` is the finish reason (eos, length, stop_string), `cancelled` when the client went
away, or the gRPC status code of a failure (INVALID_ARGUMENT, RESOURCE_EXHAUSTED with `limit`,
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

log = logging.getLogger("tokenloom.requests")

_BARE = re.compile(r"[\w.:/@\[\]+-]+")


@dataclass
class RequestRecord:
    method: str
    client: str
    started_at: float = field(default_factory=time.monotonic)
    request_id: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    first_token_at: float | None = None
    outcome: str = "UNKNOWN"  # until the final event or the exception that ends the call says more
    limit: str = ""  # the admission limit that rejected the request

    def on_event(self, event: TokenEvent) -> None:
        if self.first_token_at is None and (event.token_ids or event.final):
            self.first_token_at = time.monotonic()
        if event.final:
            self.generated_tokens = event.generated_tokens  # the usage count the client gets
            if event.finish_reason is not None:
                self.outcome = event.finish_reason.value
        else:
            self.generated_tokens += len(event.token_ids)  # what it got so far, if it never ends normally

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        ttft = "-" if self.first_token_at is None else f"{self.first_token_at - self.started_at:.4f}"
        fields = [
            ("request_id", self.request_id or "-"),
            ("method", self.method),
            ("client", self.client),
            ("prompt_tokens", self.prompt_tokens),
            ("generated_tokens", self.generated_tokens),
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
