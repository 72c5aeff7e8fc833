"""Clients that can hold a stream open, so that a test can count on a request still generating after
its first tokens, however fast the model: the server may run only a little ahead of what such a
client has read (its rows run, then pause), instead of finishing into loopback's buffers.

- gRPC: a channel with SMALL_WINDOW (HTTP/2 flow control of about 1 KiB): the engine stops some 16
  tokens ahead of a reader (tests/e2e/test_backpressure.py measures it).
- HTTP: connections that take in 4 KiB at a time, and a request of megabytes of events (HEAVY).
  A test reads the first event, does what needs the request still open, then reads on or leaves."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx

SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]

# Eight samples of 480 tokens with 20 alternatives each: megabytes of events, far more than the
# buffers between a server and a held client.
HEAVY = {"n": 8, "max_tokens": 480, "temperature": 1.0, "seed": 1, "logprobs": 20, "ignore_eos": True,
         "stream": True}


def holding_client(**kwargs) -> httpx.Client:
    transport = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    return httpx.Client(transport=transport, **kwargs)


def first_event(lines: Iterator[str]) -> dict:
    """Read up to the first event with a choice in it. The stream stays open behind it as long as the
    caller holds on to `lines`: httpx closes the connection of an iterator dropped part-way."""
    for line in lines:
        if line.startswith("data:") and line != "data: [DONE]":
            event = json.loads(line[5:])
            if event["choices"]:
                return event
    raise AssertionError("the stream ended before its first token")


def read_freely(response: httpx.Response) -> None:
    """Let a held stream's connection take in megabytes again, to read the rest at loopback speed."""
    sock = response.extensions["network_stream"].get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
