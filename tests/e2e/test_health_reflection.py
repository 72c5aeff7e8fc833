"""grpc.health.v1 through a server's life (start, serve, drain on SIGTERM) and server reflection,
each against a server started here."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import grpc
import pytest
from google.protobuf import descriptor_database, descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from conftest import own_server
from held_stream import SMALL_WINDOW
from server_process import ServerProcess
from tokenloom_client import AsyncClient

ARGS = ("--kv-cache-tokens", "8192", "--max-num-batched-tokens", "256", "--log-level", "INFO")
SERVICE = "tokenloom.v1.Generation"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PROMPTS = [list(range(400 + 13 * i, 424 + 13 * i)) for i in range(3)]


def check(channel: grpc.Channel, service: str = "", timeout: float = 1.0):
    """The status name, or the gRPC code name when the call fails (UNAVAILABLE before the port opens)."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    except grpc.RpcError as exc:
        return exc.code().name


def test_health_is_not_serving_until_warm_then_serving(tiny_dirs, tmp_path):
    server = ServerProcess(tiny_dirs["qwen2"], *ARGS, log_dir=tmp_path, name="health-start")
    seen = []
    try:
        server.start()
        deadline = time.monotonic() + 180
        with grpc.insecure_channel(server.address) as channel:
            while time.monotonic() < deadline and server.proc.poll() is None:
                status = check(channel)
                if not seen or seen[-1] != status:
                    seen.append(status)
                if status == "SERVING":
                    break
                time.sleep(0.01)
            assert seen[-1] == "SERVING", (seen, server.log_tail())
            assert set(seen[:-1]) <= {"UNAVAILABLE", "NOT_SERVING"}, seen
            assert check(channel, SERVICE) == "SERVING"
            assert check(channel, "no.such.Service") == "NOT_FOUND"
        log = server.log_tail(10**7)
        assert log.index("warm-up generation done") < log.index("tokenloom serving"), log
        assert len(asyncio.run(_generate(server.address, PROMPTS[0], 8))) == 8
    finally:
        server.stop()


async def _generate(address, prompt, n):
    async with AsyncClient(address) as c:
        return (await c.generate(input_ids=prompt, max_new_tokens=n, ignore_eos=True)).token_ids


async def _stream(c: AsyncClient, started: asyncio.Event, release: asyncio.Event | None = None,
                  **request) -> tuple[list[int], str]:
    """With `release`, the reader waits for it after its first chunk: on a small window the stream is
    then still open, however fast the model."""
    ids, reason = [], ""
    async with contextlib.aclosing(c.stream(**request)) as chunks:
        async for chunk in chunks:
            ids += chunk.token_ids
            reason = chunk.finish_reason or reason
            if not started.is_set():
                started.set()
                if release is not None:
                    await release.wait()
    return ids, reason


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_drains_not_serving_open_streams_complete_and_the_process_exits_0(sig, tiny_dirs, tmp_path):
    server = ServerProcess(tiny_dirs["llama"], *ARGS, "--grace-seconds", "60", log_dir=tmp_path, name="drain")
    params = dict(max_new_tokens=400, ignore_eos=True)  # ~2 s of streaming on a tiny model

    async def go():
        async with AsyncClient(server.address, channel_options=SMALL_WINDOW) as c:
            ref = [(await c.generate(input_ids=p, **params)).token_ids for p in PROMPTS]
            started, release = [asyncio.Event() for _ in PROMPTS], asyncio.Event()
            streams = [asyncio.create_task(_stream(c, s, release, input_ids=p, **params))
                       for s, p in zip(started, PROMPTS)]
            async with grpc.aio.insecure_channel(server.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
                assert (await watch.read()).status == SERVING
                await asyncio.gather(*(s.wait() for s in started))
                server.proc.send_signal(sig)  # what Ctrl-C sends, for SIGINT
                sent = time.monotonic()
                assert (await watch.read()).status == NOT_SERVING
                # The port still answers during the drain: Check says NOT_SERVING, not "connection refused".
                statuses = {(await health.Check(health_pb2.HealthCheckRequest(service=s))).status for s in ("", SERVICE)}
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await c.generate(input_ids=PROMPTS[0], max_new_tokens=4)
                draining = not any(s.done() for s in streams)
                release.set()
                got = await asyncio.gather(*streams)
        return ref, got, statuses, refused.value, draining, sent

    try:
        server.start().wait_ready()
        ref, got, statuses, refused, draining, sent = asyncio.run(go())
        code = server.proc.wait(timeout=30)
        exited_after = time.monotonic() - sent
    finally:
        server.stop()
    assert draining, "the checks above should have run while the streams were still open"
    assert statuses == {NOT_SERVING}
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.details()
    assert [ids for ids, _ in got] == ref, "a stream open at the signal must complete unchanged"
    assert all(reason == "length" for _, reason in got)
    assert code == 0, server.log_tail()
    # Done when the streams are, not at the 60 s grace (an open health Watch must not hold it either).
    assert exited_after < 20, exited_after


@pytest.fixture(scope="module")
def reflection_server(tiny_dirs, tmp_path_factory):
    with own_server(tiny_dirs["gpt2"], "reflection", tmp_path_factory) as server:
        yield server


def test_reflection_lists_the_services_and_serves_the_schema(reflection_server):
    with grpc.insecure_channel(reflection_server.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
        pool = descriptor_pool.DescriptorPool(db)  # only what the server sent, no local generated code
        methods = {m.name: m for m in pool.FindServiceByName(SERVICE).methods}
        assert {"Generate", "GenerateUnary", "ModelInfo", "Score"} <= set(methods)
        assert methods["Generate"].output_type.full_name == "tokenloom.v1.GenerateResponse"
        # What grpcurl does: build a request from the reflected schema alone and call the method.
        unary = methods["GenerateUnary"]
        request_cls = message_factory.GetMessageClass(unary.input_type)
        result_cls = message_factory.GetMessageClass(unary.output_type)
        request = request_cls(input_ids=PROMPTS[0])
        request.parameters.max_new_tokens = 5
        call = channel.unary_unary(f"/{SERVICE}/GenerateUnary", request_serializer=request_cls.SerializeToString,
                                   response_deserializer=result_cls.FromString)
        result = call(request, timeout=30)
        assert len(result.token_ids) == 5 and result.usage.prompt_tokens == len(PROMPTS[0])


def _reflection_v1(channel: grpc.Channel, request_cls, response_cls):
    return channel.stream_stream(f"/{REFLECTION_V1}/ServerReflectionInfo",
                                 request_serializer=request_cls.SerializeToString,
                                 response_deserializer=response_cls.FromString)


def _pool(answer) -> descriptor_pool.DescriptorPool:
    """The files of one reflection answer, alone: no local generated code."""
    db = descriptor_database.DescriptorDatabase()
    for blob in answer.file_descriptor_response.file_descriptor_proto:
        db.Add(descriptor_pb2.FileDescriptorProto.FromString(blob))
    return descriptor_pool.DescriptorPool(db)


def test_reflection_v1_lists_the_services_and_describes_them_itself_included(reflection_server):
    """What a client that speaks grpc.reflection.v1 only sees (v1alpha's successor, same messages)."""
    with grpc.insecure_channel(reflection_server.address) as channel:
        # v1's messages are v1alpha's field for field: v1alpha's classes write and read v1's bytes.
        call = _reflection_v1(channel, v1alpha.ServerReflectionRequest, v1alpha.ServerReflectionResponse)
        asks = [v1alpha.ServerReflectionRequest(list_services=""),
                v1alpha.ServerReflectionRequest(file_containing_symbol=SERVICE),
                v1alpha.ServerReflectionRequest(file_containing_symbol=REFLECTION_V1)]
        listed, generation, itself = call(iter(asks), timeout=30)
        services = {s.name for s in listed.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health", REFLECTION_V1, "grpc.reflection.v1alpha.ServerReflection"} <= services
        methods = {m.name: m for m in _pool(generation).FindServiceByName(SERVICE).methods}
        assert {"Generate", "GenerateUnary", "ModelInfo", "Score"} <= set(methods)
        assert methods["GenerateUnary"].output_type.full_name == "tokenloom.v1.GenerateResult"
        # The v1 service as the server describes it is enough to speak v1, without v1alpha's classes.
        info = _pool(itself).FindServiceByName(REFLECTION_V1).methods_by_name["ServerReflectionInfo"]
        assert info.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
        assert info.output_type.full_name == "grpc.reflection.v1.ServerReflectionResponse"
        request_cls = message_factory.GetMessageClass(info.input_type)
        response_cls = message_factory.GetMessageClass(info.output_type)
        (again,) = _reflection_v1(channel, request_cls, response_cls)(iter([request_cls(list_services="")]), timeout=30)
        assert {s.name for s in again.list_services_response.service} == services


def test_streams_still_open_when_the_grace_ends_are_cut_and_the_process_exits_0(tiny_dirs, tmp_path):
    # One row at a time: the streams queued behind the running one need far longer than the grace
    # (0 s) plus the second the server gives what is left, however fast the model is. The queue
    # takes them all (its default, 4 x --max-num-seqs, would refuse most).
    server = ServerProcess(tiny_dirs["llama"], *ARGS, "--grace-seconds", "0", "--max-num-seqs", "1",
                           "--max-queued-requests", "64", log_dir=tmp_path, name="grace")
    request = dict(input_ids=PROMPTS[0], max_new_tokens=480, ignore_eos=True)

    async def go():
        async with AsyncClient(server.address) as c:
            started = asyncio.Event()
            # ~30,000 tokens one row at a time: seconds even for a tiny model. SIGTERM once one runs.
            streams = [asyncio.create_task(_stream(c, started, **request)) for _ in range(64)]
            await started.wait()
            server.proc.send_signal(signal.SIGTERM)
            ends = await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True), timeout=30)
        cut = [end for end in ends if isinstance(end, grpc.aio.AioRpcError)]
        assert cut, "every stream finished: the test needs more queued work"
        return cut[-1]

    try:
        server.start().wait_ready()
        cut = asyncio.run(go())
        code = server.proc.wait(timeout=30)
    finally:
        server.stop()
    assert cut.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), cut
    assert code == 0, server.log_tail()
    assert "requests still open after 0 s: ending them" in server.log_tail(10**6)
