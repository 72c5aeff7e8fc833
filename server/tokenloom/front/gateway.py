"""One call from any front (gRPC, HTTP): prepare, admit, stream the engine's events, count how it ended.

Both fronts go through here, so validation, admission, the queue wait, the stream hub and the
outcome counters are the same code whichever protocol a client speaks. A front turns its request
into a `UserInput` and `RawParams`, and maps a `CallError` (whose `code` is a gRPC status code name,
the vocabulary of the outcome metric) to its own status: gRPC's code itself, or an HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

from .admission import Admission, Closed, Rejected, Ticket
from .identity import Identify
from .preprocessor import Preprocessor, UserInput
from .queue_wait import QueueWaitExpired, first_by
from .request_log import RequestRecord
from .stream import Stream, StreamHub
from .validation import InvalidArgument, RawParams
from ..request import EngineUnavailable, FinishReason, GenerationRequest, RequestTooLarge, TokenEvent

# UNAVAILABLE for the requests still open when the drain's grace (--grace-seconds) ends.
SHUTDOWN_MESSAGE = "the server is shutting down and its grace for open requests is over; retry on another replica"


class CallError(Exception):
    """A call ends with an error. `code`: a gRPC status code name (INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED, UNAVAILABLE, INTERNAL, CANCELLED); `field`/`detail`: the parameter at
    fault and what is wrong with it, for INVALID_ARGUMENT (a front may name the field its own way);
    `limit`: the admission limit that refused it; `retry_after`: seconds after which a retry may pass."""

    def __init__(self, code: str, message: str, *, field: str = "", detail: str = "", limit: str = "",
                 retry_after: float | None = None):
        super().__init__(message)
        self.code, self.message = code, message
        self.field, self.detail = field, detail or message
        self.limit, self.retry_after = limit, retry_after


@dataclass
class Call:
    """One generating call's way through the server; `record` is its request-log line."""

    gateway: "Gateway"
    record: RequestRecord

    async def prepare(self, user: UserInput, raw: RawParams) -> GenerationRequest:
        # Tokenising a long prompt or rendering a template is CPU work: keep it off the loop.
        return await asyncio.to_thread(self.gateway.preprocessor, user, raw)

    async def prepare_score(self, prompt: UserInput, continuation: str,
                            continuation_ids: tuple[int, ...]) -> GenerationRequest:
        return await asyncio.to_thread(self.gateway.preprocessor.score, prompt, continuation, continuation_ids)

    async def admit(self, req: GenerationRequest, request_id: str) -> Ticket:
        """Admission of `req`; the ticket must be held (`async with`) until the request ends."""
        g, record = self.gateway, self.record
        record.request_id, record.prompt_tokens = request_id, len(req.prompt_ids)
        try:
            return await g.admission.admit(record.client, len(req.prompt_ids))
        except Rejected as exc:
            raise self._rejected(exc) from None
        except Closed as exc:
            record.limit = "draining"
            g.metrics.rejected("draining", record.front)
            raise CallError("UNAVAILABLE", str(exc), limit="draining") from None

    async def events(self, req: GenerationRequest, ticket: Ticket,
                     on_stalled: Callable[[str, str], None]) -> AsyncIterator[TokenEvent]:
        """The engine's events for `req`, up to its final one; failures become `CallError`s.
        `on_stalled(code, message)`: the hub cut the stream because its reader stopped reading; the
        front ends the call (its handler is blocked on a write the client does not take)."""
        g, record = self.gateway, self.record

        def stalled(message: str) -> None:
            record.stalled = True
            on_stalled("UNAVAILABLE" if g.admission.cutting else "CANCELLED", message)

        stream = record.stream = Stream(stalled)
        try:
            async for event in first_by(g.hub.run(req, stream), ticket.queue_deadline):
                ticket.started()
                record.on_event(event)
                if event.finish_reason is FinishReason.ERROR:
                    raise CallError("INTERNAL", f"generation failed: {event.error}")
                if event.finish_reason is FinishReason.CANCELLED:
                    # The engine cancels on its own only when it stops (shutdown or failure).
                    raise CallError("UNAVAILABLE", g.stopped("the engine stopped; retry later"))
                yield event
        except QueueWaitExpired:
            raise self._rejected(g.admission.expired(ticket)) from None
        except EngineUnavailable as exc:
            g.metrics.rejected("engine_unavailable", record.front)
            raise CallError("UNAVAILABLE", g.stopped(str(exc))) from None
        except RequestTooLarge as exc:
            g.metrics.rejected("too_large", record.front)
            raise CallError("RESOURCE_EXHAUSTED", str(exc), limit="too_large") from None

    def _rejected(self, exc: Rejected) -> CallError:
        self.record.limit = exc.limit
        self.gateway.metrics.rejected(exc.limit, self.record.front)
        return CallError("RESOURCE_EXHAUSTED", exc.message, limit=exc.limit, retry_after=exc.retry_after_seconds)


class Gateway:
    def __init__(self, preprocessor: Preprocessor, hub: StreamHub, admission: Admission,
                 identify: Identify | None = None):
        self.preprocessor = preprocessor
        self.hub = hub
        self.admission = admission
        # Who a call is from (the client admission counts it under); server.py passes the tokens file's.
        self.identify = identify or Identify(admission.config.trusted_metadata_key)
        self.metrics = hub.metrics  # one Metrics per server; the hub and the engine share it

    def stopped(self, message: str) -> str:
        """What a request the engine dropped is told: the shutdown's words once the drain's grace is over."""
        return SHUTDOWN_MESSAGE if self.admission.cutting else message

    @contextlib.contextmanager
    def call(self, method: str, front: str, client: str, request_id: str = "") -> Iterator[Call]:
        """Count and log one call under how it ended: its finish reason, "cancelled" when the client
        left, "stream_idle_timeout" when it stopped reading, "shutdown" when the drain's grace ended it,
        or the gRPC status code name of the error it failed with. An `InvalidArgument` raised inside
        becomes a `CallError` INVALID_ARGUMENT."""
        record = RequestRecord(method, client, front=front, request_id=request_id)  # the client's id, if any
        try:
            yield Call(self, record)
        except InvalidArgument as exc:
            record.outcome = "INVALID_ARGUMENT"
            raise CallError("INVALID_ARGUMENT", str(exc), field=exc.field, detail=exc.detail) from None
        except CallError as exc:
            record.outcome = exc.code
            if exc.code == "UNAVAILABLE" and self.admission.cutting and not record.limit:
                record.outcome = "shutdown"  # admitted, then ended past the grace (not refused at the door)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            record.outcome = "stream_idle_timeout" if record.stalled else "cancelled"
            if self.admission.cutting:  # past the grace, the server's own stop cancels what is left
                record.outcome = "shutdown"
            raise
        except Exception:
            record.outcome = "UNKNOWN"  # an exception nobody expected
            raise
        finally:
            self.metrics.request_finished(record.outcome, front)
            record.emit()
