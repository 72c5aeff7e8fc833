"""HTTP clients that can hold a stream open: their connections take in 4 KiB at a time, so a server
streaming megabytes of events to one must wait for it to read (its rows run, then pause) instead of
finishing into loopback's socket buffers. A test reads the first event, does what needs the request
still open, then reads on or leaves."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx

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
