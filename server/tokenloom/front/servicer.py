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

from .admission import Admission, AdmissionConfig, Closed, Rejected, Ticket, client_identity
from .preprocessor import Preprocessor, UserInput
from ..request import (
    EngineUnavailable, FinishReason, GenerationOutput, GenerationRequest, Hypothesis, RequestTooLarge, TokenEvent,
    TopToken,
)
from .request_log import RequestRecord
from .stream import StreamHub
from .validation import InvalidArgument, RawParams

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
# Trailing metadata of a RESOURCE_EXHAUSTED answer: seconds after which a retry may pass.
RETRY_AFTER_KEY = "retry-after-seconds"

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
                 admission: Admission | None = None):
        self.preprocessor = preprocessor
        self.hub = hub
        self.served = served
        self.admission = admission or Admission(AdmissionConfig())
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
            usage=pb.Usage(prompt_tokens=out.prompt_tokens, generated_tokens=out.generated_tokens),
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
            ending.limit = exc.limit
            self.metrics.rejected(exc.limit)
            retry = () if exc.retry_after_seconds is None else ((RETRY_AFTER_KEY, f"{exc.retry_after_seconds:.3f}"),)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message, trailing_metadata=retry)
        except Closed as exc:
            self.metrics.rejected("draining")
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    def _client(self, context) -> str:
        metadata = context.invocation_metadata() or ()
        return client_identity(metadata, context.peer(), self.admission.config.client_id_metadata_key)

    async def _events(self, req: GenerationRequest, context, ending: RequestRecord,
                      ticket: Ticket) -> AsyncIterator[TokenEvent]:
        """The engine's events for `req`; failures become gRPC status codes."""
        try:
            async for event in self.hub.run(req):
                ticket.started()
                ending.on_event(event)
                if event.finish_reason is FinishReason.ERROR:
                    await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {event.error}")
                if event.finish_reason is FinishReason.CANCELLED:
                    # The engine cancels on its own only when it stops (shutdown or failure).
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine stopped; retry later")
                yield event
        except EngineUnavailable as exc:
            self.metrics.rejected("engine_unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except RequestTooLarge as exc:
            self.metrics.rejected("too_large")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    @contextlib.contextmanager
    def _counted(self, method: str, context, request_id: str) -> Iterator[RequestRecord]:
        """Count and log one call of a generating RPC under how it ended: its finish reason,
        "cancelled" when the client left, or the name of the gRPC status code it failed with."""
        ending = RequestRecord(method, self._client(context), request_id=request_id)  # the client's, if any
        try:
            yield ending
        except (asyncio.CancelledError, GeneratorExit):
            ending.outcome = "cancelled"
            raise
        except grpc.aio.AbortError:
            code = context.code()
            ending.outcome = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            raise
        except Exception:
            ending.outcome = "UNKNOWN"  # what gRPC answers for an exception it did not expect
            raise
        finally:
            self.metrics.request_finished(ending.outcome)
            ending.emit()


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
    if event.final:
        response.usage.prompt_tokens = event.prompt_tokens
        response.usage.generated_tokens = event.generated_tokens
    return response


def add_to_server(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
