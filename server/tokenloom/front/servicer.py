"""gRPC <-> domain objects. The only module that imports the generated protobuf code."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

import grpc

from tokenloom_client.pb.tokenloom.v1 import generation_pb2 as pb
from tokenloom_client.pb.tokenloom.v1 import generation_pb2_grpc as pb_grpc

from .admission import Admission, AdmissionConfig, Closed, Rejected, Ticket
from .identity import Identify
from .queue_wait import QueueWaitExpired, first_by
from .preprocessor import Preprocessor, UserInput
from ..request import (
    BestUpdate, EngineUnavailable, FinishReason, GenerationOutput, GenerationRequest, Hypothesis, RequestTooLarge,
    TokenEvent, TopToken,
)
from .request_log import RequestRecord
from .stream import Stream, StreamHub
from .validation import InvalidArgument, RawParams

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
# Trailing metadata of a RESOURCE_EXHAUSTED answer: seconds after which a retry may pass.
RETRY_AFTER_KEY = "retry-after-seconds"
# UNAVAILABLE for the requests still open when the drain's grace (--grace-seconds) ends.
SHUTDOWN_MESSAGE = "the server is shutting down and its grace for open requests is over; retry on another replica"

# ModelInfo's pb.Limits: these three describe the server, not a request ceiling; every other field is
# validation.Limits' field of the same name (a unit test holds the two messages' names together).
_SERVER_LIMITS = ("max_input_tokens", "max_num_seqs", "kv_cache_tokens")
_REQUEST_LIMITS = tuple(f.name for f in pb.Limits.DESCRIPTOR.fields if f.name not in _SERVER_LIMITS)

_FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_STRING: pb.FINISH_REASON_STOP_STRING,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}


@dataclass(frozen=True)
class ServedModel:
    """What ModelInfo reports."""

    name: str
    model_type: str
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    has_chat_template: bool
    dtype: str
    quantization: str
    device: str
    max_num_seqs: int
    kv_cache_tokens: int


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, preprocessor: Preprocessor, hub: StreamHub, served: ServedModel,
                 admission: Admission | None = None, identify: Identify | None = None):
        self.preprocessor = preprocessor
        self.hub = hub
        self.served = served
        self.admission = admission or Admission(
            AdmissionConfig().resolved(served.max_num_seqs, served.kv_cache_tokens))
        # Who a call is from (the client admission counts it under); server.py passes the tokens file's.
        self.identify = identify or Identify(self.admission.config.trusted_metadata_key)
        self.metrics = hub.metrics  # one Metrics per server; the hub and the engine share it

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        with self._counted("Generate", context, request.request_id) as ending:
            req = await self._prepare(request, context)
            client_id = request.request_id or req.request_id
            async with await self._admit(req, client_id, ending, context) as ticket:
                async for event in self._events(req, context, ending, ticket):
                    yield _to_response(event, client_id)

    async def GenerateUnary(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        with self._counted("GenerateUnary", context, request.request_id) as ending:
            req = await self._prepare(request, context)
            out = GenerationOutput(request.request_id or req.request_id)
            async with await self._admit(req, out.request_id, ending, context) as ticket:
                async for event in self._events(req, context, ending, ticket):
                    out.add(event)
        return pb.GenerateResult(
            request_id=out.request_id,
            token_ids=out.token_ids,
            logprobs=out.logprobs,
            text=out.text,
            finish_reason=_FINISH[out.finish_reason],
            usage=pb.Usage(prompt_tokens=out.prompt_tokens, generated_tokens=out.generated_tokens,
                           cached_tokens=out.cached_tokens),
            top_tokens=[_top_tokens(t) for t in out.top_tokens],
            hypotheses=[_hypothesis(h) for h in out.hypotheses],
        )

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext):
        prompt = UserInput(prompt=request.prompt, input_ids=tuple(request.prompt_ids))
        with self._counted("Score", context, request.request_id) as ending:
            try:
                req = await asyncio.to_thread(
                    self.preprocessor.score, prompt, request.continuation, tuple(request.continuation_ids)
                )
            except InvalidArgument as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            out = GenerationOutput(req.request_id)
            async with await self._admit(req, request.request_id or req.request_id, ending, context) as ticket:
                async for event in self._events(req, context, ending, ticket):
                    out.add(event)
        return pb.ScoreResponse(
            request_id=request.request_id or req.request_id,
            prompt_ids=req.prompt_ids[: req.score_from],
            continuation_ids=out.token_ids,
            logprobs=out.logprobs,
            total_logprob=sum(out.logprobs),
            usage=pb.Usage(prompt_tokens=len(req.prompt_ids), cached_tokens=out.cached_tokens),
        )

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext):
        s, limits = self.served, self.preprocessor.limits
        return pb.ModelInfoResponse(
            model_name=s.name,
            model_type=s.model_type,
            context_length=s.context_length,
            vocab_size=s.vocab_size,
            eos_token_ids=list(s.eos_token_ids),
            has_chat_template=s.has_chat_template,
            dtype=s.dtype,
            quantization=s.quantization,
            device=s.device,
            limits=pb.Limits(
                **{name: getattr(limits, name) for name in _REQUEST_LIMITS},
                max_input_tokens=limits.context_length - 1,
                max_num_seqs=s.max_num_seqs,
                kv_cache_tokens=s.kv_cache_tokens,
            ),
        )

    async def _prepare(self, request: pb.GenerateRequest, context) -> GenerationRequest:
        user = UserInput(
            prompt=request.prompt,
            messages=tuple((m.role, m.content) for m in request.messages),
            input_ids=tuple(request.input_ids),
        )
        try:
            # Tokenising a long prompt or rendering a template is CPU work: keep it off the loop.
            return await asyncio.to_thread(self.preprocessor, user, _raw_params(request.parameters))
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _admit(self, req: GenerationRequest, request_id: str, ending: RequestRecord, context) -> Ticket:
        """Admission of `req`; the ticket must be held (`async with`) until the request ends."""
        ending.request_id, ending.prompt_tokens = request_id, len(req.prompt_ids)
        try:
            return await self.admission.admit(ending.client, len(req.prompt_ids))
        except Rejected as exc:
            await self._reject(exc, ending, context)
        except Closed as exc:
            ending.limit = "draining"
            self.metrics.rejected("draining")
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def _reject(self, exc: Rejected, ending: RequestRecord, context) -> None:
        ending.limit = exc.limit
        self.metrics.rejected(exc.limit)
        retry = () if exc.retry_after_seconds is None else ((RETRY_AFTER_KEY, f"{exc.retry_after_seconds:.3f}"),)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message, trailing_metadata=retry)

    def _client(self, context) -> str:
        metadata = context.invocation_metadata() or ()
        return self.identify(metadata, context.peer())

    async def _events(self, req: GenerationRequest, context, ending: RequestRecord,
                      ticket: Ticket) -> AsyncIterator[TokenEvent]:
        """The engine's events for `req`; failures become gRPC status codes."""
        task = asyncio.current_task()

        def stalled(message: str) -> None:  # the hub cut the stream: its reader stopped reading
            ending.stalled = True
            code = grpc.StatusCode.UNAVAILABLE if self.admission.cutting else grpc.StatusCode.CANCELLED
            asyncio.ensure_future(_cut(context, task, code, message))

        stream = Stream(stalled)
        ending.stream = stream
        try:
            async for event in first_by(self.hub.run(req, stream), ticket.queue_deadline):
                ticket.started()
                ending.on_event(event)
                if event.finish_reason is FinishReason.ERROR:
                    await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {event.error}")
                if event.finish_reason is FinishReason.CANCELLED:
                    # The engine cancels on its own only when it stops (shutdown or failure).
                    await context.abort(grpc.StatusCode.UNAVAILABLE, self._stopped("the engine stopped; retry later"))
                yield event
        except QueueWaitExpired:
            await self._reject(self.admission.expired(ticket), ending, context)
        except EngineUnavailable as exc:
            self.metrics.rejected("engine_unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._stopped(str(exc)))
        except RequestTooLarge as exc:
            self.metrics.rejected("too_large")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    def _stopped(self, message: str) -> str:
        """What a request the engine dropped is told: the shutdown's words once the drain's grace is over."""
        return SHUTDOWN_MESSAGE if self.admission.cutting else message

    @contextlib.contextmanager
    def _counted(self, method: str, context, request_id: str) -> Iterator[RequestRecord]:
        """Count and log one call of a generating RPC under how it ended: its finish reason,
        "cancelled" when the client left, "shutdown" when the drain's grace ended it, or the name
        of the gRPC status code it failed with."""
        ending = RequestRecord(method, self._client(context), request_id=request_id)  # the client's, if any
        try:
            yield ending
        except (asyncio.CancelledError, GeneratorExit):
            ending.outcome = "stream_idle_timeout" if ending.stalled else "cancelled"
            if self.admission.cutting:  # past the grace, the server's own stop cancels what is left
                ending.outcome = "shutdown"
            raise
        except grpc.aio.AbortError:
            code = context.code()
            ending.outcome = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            if code is grpc.StatusCode.UNAVAILABLE and self.admission.cutting and not ending.limit:
                ending.outcome = "shutdown"  # admitted, then ended past the grace (not refused at the door)
            raise
        except Exception:
            ending.outcome = "UNKNOWN"  # what gRPC answers for an exception it did not expect
            raise
        finally:
            self.metrics.request_finished(ending.outcome)
            ending.emit()


async def _cut(context, task: asyncio.Task, code: grpc.StatusCode, message: str) -> None:
    """End a call whose client stopped reading: the status goes out first (a client that reads
    again gets the messages it was sent, then this), then the handler is cancelled, since it
    waits on a write that the client's flow control will not let through."""
    abort = asyncio.ensure_future(context.abort(code, message))
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(BaseException):
        await abort


_EARLY_STOPPING = {
    pb.EARLY_STOPPING_FALSE: False,
    pb.EARLY_STOPPING_TRUE: True,
    pb.EARLY_STOPPING_NEVER: "never",
}

# The scalar parameters with explicit presence (proto3 `optional`): unset reaches RawParams as None.
_OPTIONAL = tuple(
    f.name for f in pb.GenerationParameters.DESCRIPTOR.fields if f.has_presence and f.message_type is None
)


def _raw_params(p: pb.GenerationParameters) -> RawParams:
    optional = {name: getattr(p, name) if p.HasField(name) else None for name in _OPTIONAL}
    if p.early_stopping not in _EARLY_STOPPING:
        raise InvalidArgument("early_stopping", f"unknown value {p.early_stopping}")
    return RawParams(
        **optional,
        do_sample=p.do_sample,
        stop_strings=tuple(p.stop_strings),
        early_stopping=_EARLY_STOPPING[p.early_stopping],
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
    )


def _top_tokens(alternatives: tuple[TopToken, ...]) -> pb.TopTokens:
    return pb.TopTokens(
        alternatives=[pb.TopToken(token_id=t.token_id, text=t.text, logprob=t.logprob) for t in alternatives]
    )


def _hypothesis(h: Hypothesis) -> pb.Hypothesis:
    return pb.Hypothesis(token_ids=h.token_ids, text=h.text, score=h.score, finish_reason=_FINISH[h.finish_reason])


def _best_update(u: BestUpdate) -> pb.BestUpdate:
    return pb.BestUpdate(keep_tokens=u.keep_tokens, token_ids=u.token_ids, keep_text_bytes=u.keep_text_bytes,
                         text_suffix=u.text_suffix)


def _to_response(event: TokenEvent, request_id: str) -> pb.GenerateResponse:
    response = pb.GenerateResponse(
        request_id=request_id,
        token_ids=event.token_ids,
        logprobs=event.logprobs,
        text=event.text,
        finish_reason=_FINISH[event.finish_reason],
        error_message=event.error,
        index=event.index,
        top_tokens=[_top_tokens(t) for t in event.top_tokens],
        provisional=event.provisional,
        hypotheses=[_hypothesis(h) for h in event.hypotheses],
    )
    if event.best_update is not None:
        response.best_update.CopyFrom(_best_update(event.best_update))
    if event.final:
        response.usage.prompt_tokens = event.prompt_tokens
        response.usage.generated_tokens = event.generated_tokens
        response.usage.cached_tokens = event.cached_tokens
    return response


def add_to_server(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
