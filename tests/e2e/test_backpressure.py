"""A client that stops reading, over real gRPC: its rows pause after a few buffered messages, a
reader that catches up gets every token it would have got, and one that never reads again is cut
after --stream-idle-timeout with a status that says why, freeing its admission slot.

The stalling client is a real gRPC channel whose HTTP/2 receive window is 1 KiB (no BDP probing)
and which never asks for the next message: the server's writes block as they would for a peer
that grants no flow-control credit.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.request

import grpc
import pytest

from held_stream import SMALL_WINDOW
from metrics_scrape import Scrape
from server_process import ServerProcess
from tokenloom_client import AsyncClient
from tokenloom_client.pb.tokenloom.v1 import generation_pb2 as pb
from tokenloom_client.pb.tokenloom.v1 import generation_pb2_grpc as pb_grpc

IDLE_TIMEOUT = 4.0
ARGS = ("--stream-buffer", "8", "--stream-idle-timeout", str(IDLE_TIMEOUT), "--max-streams-per-client", "1",
        "--log-level", "INFO")
PROMPT = list(range(300, 320))
NEW_TOKENS = 300


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    proc = ServerProcess(tiny_dirs["llama"], *ARGS, log_dir=tmp_path_factory.mktemp("logs-backpressure"),
                         name="backpressure").start()
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def request(**params) -> pb.GenerateRequest:
    return pb.GenerateRequest(input_ids=PROMPT, parameters=pb.GenerationParameters(
        max_new_tokens=NEW_TOKENS, ignore_eos=True, **params))


async def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def settled_pause(url: str, timeout: float) -> Scrape:
    """The first scrape, of two taken 0.3 s apart, that shows the rows paused and no step run between
    them. A reader that stops need not pause its rows once for all: while the kernel still grows the
    connection's send buffer, the server's writes drain a little, the stream's buffer empties below
    half and its rows run a step or two more before they pause again."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        scrape = Scrape(url)
        if (last is not None and scrape.get("paused_sequences") >= 1 and scrape.running == 0
                and scrape.steps == last.steps):
            return scrape
        assert time.monotonic() < deadline, "timed out waiting for the rows to pause"
        last = scrape
        await asyncio.sleep(0.3)


def request_lines(server: ServerProcess, outcome: str) -> list[dict[str, str]]:
    lines = [line for line in server.log_path.read_text().splitlines() if f"outcome={outcome}" in line]
    return [dict(re.findall(r"(\w+)=(\S+)", line)) for line in lines]


async def fast_tokens(address: str, **params) -> list[int]:
    async with AsyncClient(address) as client:
        result = await client.generate(input_ids=PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True, **params)
    return list(result.token_ids)


def test_a_reader_that_stops_pauses_its_rows_and_is_cut_after_the_idle_timeout(server):
    async def main():
        async with grpc.aio.insecure_channel(server.address, options=SMALL_WINDOW) as channel:
            stalled = pb_grpc.GenerationStub(channel).Generate(request(top_n=5))
            await wait_for(lambda: Scrape(server.metrics_url).get("paused_sequences") == 1, 30, "the rows to pause")
            paused = Scrape(server.metrics_url)
            assert paused.get("open_streams") == 1 and paused.get("stream_pauses_total") >= 1
            assert paused.running == 0, "a paused request computes nothing"

            # Its admission slot (one stream per client) is still taken while it is open...
            async with AsyncClient(server.address) as other:
                with pytest.raises(grpc.aio.AioRpcError) as held:
                    await other.generate(input_ids=PROMPT, max_new_tokens=4)
                assert held.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                # ...and is free once the stream is cut for not reading.
                await wait_for(lambda: Scrape(server.metrics_url).finished("stream_idle_timeout") == 1,
                               IDLE_TIMEOUT + 10, "the idle cut")
                await wait_for(lambda: Scrape(server.metrics_url).get("open_streams") == 0, 5, "the stream to close")
                after = await other.generate(input_ids=PROMPT, max_new_tokens=4)
                assert len(after.token_ids) == 4

            # The stalled client, reading at last, gets what was sent, then the reason.
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                async for message in stalled:
                    received += message.token_ids
            assert cut.value.code() == grpc.StatusCode.CANCELLED
            assert "--stream-idle-timeout" in cut.value.details() and "read nothing" in cut.value.details()
        scrape = Scrape(server.metrics_url)
        assert scrape.get("paused_sequences") == 0 and scrape.running == 0 and scrape.kv_bytes == 0
        [line] = request_lines(server, "stream_idle_timeout")
        generated, delivered = int(line["generated_tokens"]), int(line["delivered_tokens"])
        # The engine stopped after a window's worth and the stream's buffer, far short of the request.
        assert len(received) <= delivered <= generated < NEW_TOKENS // 3
        return received

    received = asyncio.run(main())
    assert received == asyncio.run(fast_tokens(server.address, top_n=5))[: len(received)]


def test_a_reader_that_stops_after_its_generation_ended_is_cut_too(server):
    """Fewer messages than the buffer: nothing pauses, the engine finishes, and the handler waits on a
    write the client never takes. The idle cut still frees the client's one stream."""
    async def main():
        before = Scrape(server.metrics_url)
        async with grpc.aio.insecure_channel(server.address, options=SMALL_WINDOW) as channel:
            stalled = pb_grpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(input_ids=PROMPT, parameters=pb.GenerationParameters(
                    max_new_tokens=12, ignore_eos=True, top_n=5)))
            await wait_for(lambda: Scrape(server.metrics_url).finished("stream_idle_timeout")
                           > before.finished("stream_idle_timeout"), IDLE_TIMEOUT + 10, "the idle cut")
            assert Scrape(server.metrics_url).get("stream_pauses_total") == before.get("stream_pauses_total")
            async with AsyncClient(server.address) as other:
                assert len((await other.generate(input_ids=PROMPT, max_new_tokens=4)).token_ids) == 4
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                async for _ in stalled:
                    pass
            assert cut.value.code() == grpc.StatusCode.CANCELLED

    asyncio.run(main())


@pytest.mark.parametrize("mode", [dict(), dict(do_sample=True, seed=7, temperature=0.9)], ids=["greedy", "sampled"])
def test_a_slow_reader_gets_every_token_a_fast_reader_gets(server, mode):
    async def slow() -> list[int]:
        async with grpc.aio.insecure_channel(server.address, options=SMALL_WINDOW) as channel:
            before = Scrape(server.metrics_url).get("stream_pauses_total")
            ids = []
            async for message in pb_grpc.GenerationStub(channel).Generate(request(top_n=5, **mode)):
                ids += message.token_ids
                await asyncio.sleep(0.03)  # a reader slower than the engine, even a loaded one (~10 ms a step)
            assert Scrape(server.metrics_url).get("stream_pauses_total") > before, "the reader was too fast to pause"
            return ids

    slow_ids = asyncio.run(slow())
    assert len(slow_ids) == NEW_TOKENS
    assert slow_ids == asyncio.run(fast_tokens(server.address, top_n=5, **mode))


def test_shutdown_does_not_wait_past_its_grace_for_a_reader_that_stopped(tiny_dirs, tmp_path):
    grace = 2.0
    proc = ServerProcess(tiny_dirs["llama"], "--stream-buffer", "8", "--stream-idle-timeout", "600",
                         "--grace-seconds", str(grace), "--log-level", "INFO", log_dir=tmp_path,
                         name="stalled-shutdown").start()
    try:
        proc.wait_ready()

        async def main():
            async with grpc.aio.insecure_channel(proc.address, options=SMALL_WINDOW) as channel:
                call = pb_grpc.GenerationStub(channel).Generate(request(top_n=5))
                await wait_for(lambda: Scrape(proc.metrics_url).get("paused_sequences") == 1, 30, "the rows to pause")
                started = time.monotonic()
                proc.proc.terminate()
                await asyncio.to_thread(proc.proc.wait, 60)
                took = time.monotonic() - started
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    async for _ in call:
                        pass
                return took, ended.value

        took, ended = asyncio.run(main())
        assert proc.proc.returncode == 0
        assert took < grace + 1.5, f"the server took {took:.1f} s to stop with a {grace} s grace"
        # The status waits behind the messages the client never took, and the process is gone: the
        # client sees the connection close (UNAVAILABLE) when it reads again.
        assert ended.code() == grpc.StatusCode.UNAVAILABLE
        log = proc.log_path.read_text()
        assert "Traceback" not in log
        assert len(re.findall(r"outcome=shutdown", log)) == 1
    finally:
        proc.stop()


def test_an_http_reader_that_stops_pauses_its_rows_and_is_cut_after_the_idle_timeout(tiny_dirs, tmp_path):
    """The same over the HTTP front: a raw SSE client with a 4 KiB receive buffer reads the 200 and
    then nothing. Eight samples of 400 tokens with 20 alternatives each are about 6 MB of events, more
    than loopback's socket buffers (which grow to megabytes) and uvicorn's hold: once they and the
    stream's buffer are full, the rows pause; after --stream-idle-timeout the stream is cut and the
    client's one stream slot is free again."""
    new_tokens = 400
    server = ServerProcess(tiny_dirs["llama"], *ARGS, log_dir=tmp_path, name="http-stall").start()
    try:
        server.wait_ready()
        with urllib.request.urlopen(f"{server.http_url}/v1/models") as answer:
            model = json.load(answer)["data"][0]["id"]
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Count."}], "n": 8,
                           "max_tokens": new_tokens, "temperature": 1.0, "seed": 1, "logprobs": True,
                           "top_logprobs": 20, "ignore_eos": True, "stream": True}).encode()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.http_port))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: tokenloom\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            status = b""
            while len(status) < 12 and (part := sock.recv(12 - len(status))):
                status += part
            assert status == b"HTTP/1.1 200"  # admitted; from here on it reads nothing

            async def main():
                await settled_pause(server.metrics_url, 60)  # a paused request computes nothing
                async with AsyncClient(server.address) as other:  # the same client (loopback): one stream
                    with pytest.raises(grpc.aio.AioRpcError) as held:
                        await other.generate(input_ids=PROMPT, max_new_tokens=4)
                    assert held.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    await wait_for(lambda: Scrape(server.metrics_url).finished("stream_idle_timeout") == 1,
                                   IDLE_TIMEOUT + 10, "the idle cut")
                    await wait_for(lambda: Scrape(server.metrics_url).get("open_streams") == 0, 5,
                                   "the stream to close")
                    assert len((await other.generate(input_ids=PROMPT, max_new_tokens=4)).token_ids) == 4

            asyncio.run(main())
        scrape = Scrape(server.metrics_url)
        assert scrape.get("paused_sequences") == 0 and scrape.running == 0 and scrape.kv_bytes == 0
        [line] = request_lines(server, "stream_idle_timeout")
        assert line["front"] == "http" and int(line["generated_tokens"]) < 8 * new_tokens
    finally:
        server.stop()
