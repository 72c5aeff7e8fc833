"""gRPC <-> domain objects. The only module that imports the generated protobuf code."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass

import grpc

from tokenloom_client.pb.tokenloom.v1 import generation_pb2 as pb
from tokenloom_client.pb.tokenloom.v1 import generation_pb2_grpc as pb_grpc

from .gateway import CallError, Gateway
from .preprocessor import UserInput
from ..request import BestUpdate, Constraint, FinishReason, GenerationOutput, Hypothesis, TokenEvent, TopToken
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
    def __init__(self, gateway: Gateway, served: ServedModel):
        self.gateway = gateway
        self.preprocessor = gateway.preprocessor
        self.served = served

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        async with _aborting(context):
            with self._call("Generate", context, request.request_id) as call:
                req = await call.prepare(_user_input(request), _raw_params(request.parameters))
                client_id = request.request_id or req.request_id
                async with await call.admit(req, client_id) as ticket:
                    async for event in call.events(req, ticket, _cutter(context)):
                        yield _to_response(event, client_id)

    async def GenerateUnary(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        async with _aborting(context):
            with self._call("GenerateUnary", context, request.request_id) as call:
                req = await call.prepare(_user_input(request), _raw_params(request.parameters))
                out = GenerationOutput(request.request_id or req.request_id)
                async with await call.admit(req, out.request_id) as ticket:
                    async for event in call.events(req, ticket, _cutter(context)):
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
        async with _aborting(context):
            with self._call("Score", context, request.request_id) as call:
                req = await call.prepare_score(prompt, request.continuation, tuple(request.continuation_ids))
                out = GenerationOutput(req.request_id)
                async with await call.admit(req, request.request_id or req.request_id) as ticket:
                    async for event in call.events(req, ticket, _cutter(context)):
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

    def _call(self, method: str, context, request_id: str):
        metadata = context.invocation_metadata() or ()
        return self.gateway.call(method, "grpc", self.gateway.identify(metadata, context.peer()), request_id)


@contextlib.asynccontextmanager
async def _aborting(context):
    """A call's `CallError` as its gRPC status (RESOURCE_EXHAUSTED carries the retry hint)."""
    try:
        yield
    except CallError as exc:
        retry = () if exc.retry_after is None else ((RETRY_AFTER_KEY, f"{exc.retry_after:.3f}"),)
        await context.abort(grpc.StatusCode[exc.code], exc.message, trailing_metadata=retry)


def _cutter(context):
    """How a stream whose client stopped reading ends: the status goes out first (a client that reads
    again gets the messages it was sent, then this), then the handler is cancelled, since it waits on a
    write that the client's flow control will not let through."""
    task = asyncio.current_task()

    def cut(code: str, message: str) -> None:
        asyncio.ensure_future(_cut(context, task, grpc.StatusCode[code], message))

    return cut


async def _cut(context, task: asyncio.Task, code: grpc.StatusCode, message: str) -> None:
    abort = asyncio.ensure_future(context.abort(code, message))
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(BaseException):
        await abort


def _user_input(request: pb.GenerateRequest) -> UserInput:
    return UserInput(
        prompt=request.prompt,
        messages=tuple((m.role, m.content) for m in request.messages),
        input_ids=tuple(request.input_ids),
        resume=tuple(tuple(r.token_ids) for r in request.resume),
    )


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
        constraint=_constraint(p) if p.HasField("constraint") else None,
        do_sample=p.do_sample,
        stop_strings=tuple(p.stop_strings),
        early_stopping=_EARLY_STOPPING[p.early_stopping],
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
    )


def _constraint(p: pb.GenerationParameters) -> Constraint:
    c = p.constraint
    kind = c.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("constraint", "set one of json_schema, json_object, regex, grammar, choice")
    if kind == "json_object":
        if not c.json_object:
            raise InvalidArgument("constraint", "json_object must be true (leave the constraint unset for none)")
        return Constraint("json_object")
    if kind == "choice":
        return Constraint("choice", json.dumps(list(c.choice.options)))  # validation checks the options
    return Constraint(kind, getattr(c, kind))


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
