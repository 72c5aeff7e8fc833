"""Shutdown past its grace, over real gRPC and a real process: streams still open when
--grace-seconds ends get UNAVAILABLE saying that the server is shutting down, are logged once each
as `shutdown` (not `cancelled`, no ERROR traceback), and the process is gone within the grace plus
one second."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time

import grpc

from metrics_scrape import Scrape
from server_process import ServerProcess
from stream_outcome import collect
from tokenloom_client import AsyncClient

GRACE = 1.0
# One row at a time: four streams of 480 tokens are ~4 s of work, far past the grace.
ARGS = ("--kv-cache-tokens", "8192", "--max-num-batched-tokens", "256", "--log-level", "INFO",
        "--max-num-seqs", "1", "--max-queued-requests", "16", "--grace-seconds", str(GRACE))
STREAMS = [dict(input_ids=list(range(50 + 9 * i, 70 + 9 * i)), max_new_tokens=480, ignore_eos=True) for i in range(4)]


def request_log(text: str) -> list[dict[str, str]]:
    lines = [line.split("tokenloom.requests: ", 1)[1] for line in text.splitlines() if "tokenloom.requests: " in line]
    return [dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)) for line in lines]


def test_streams_cut_at_the_end_of_the_grace_are_told_and_counted_as_shutdown_and_the_exit_is_prompt(
        tiny_dirs, tmp_path):
    server = ServerProcess(tiny_dirs["llama"], *ARGS, log_dir=tmp_path, name="shutdown")
    exited: list[float] = []

    def wait_exit():
        server.proc.wait(timeout=60)
        exited.append(time.monotonic())

    async def go():
        async with AsyncClient(server.address) as c:
            started = asyncio.Event()
            streams = [asyncio.create_task(collect(c, r, started)) for r in STREAMS]
            await started.wait()
            # Every stream reached the engine (none arrives after the SIGTERM, to be refused as draining).
            while Scrape(server.metrics_url).get("open_streams") < len(STREAMS):
                await asyncio.sleep(0.02)
            server.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            threading.Thread(target=wait_exit, daemon=True).start()
            return sent, await asyncio.wait_for(asyncio.gather(*streams), timeout=30)

    try:
        server.start().wait_ready()
        sent, outcomes = asyncio.run(go())
        code = server.proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while not exited and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        server.stop()
    log = server.log_tail(10**7)
    took = exited[0] - sent
    assert code == 0, log[-3000:]
    assert GRACE - 0.05 <= took < GRACE + 1.0, f"exited {took:.2f} s after SIGTERM with a {GRACE} s grace"

    cut = [o for o in outcomes if o.error is not None]
    assert cut, "every stream finished within the grace: the test needs more work"
    for o in cut:
        assert o.error.code() == grpc.StatusCode.UNAVAILABLE, o.error
        assert "shutting down" in o.error.details(), o.error.details()
        assert o.ended_at - sent < GRACE + 1.0
    records = request_log(log)
    assert len(records) == len(STREAMS), records  # one line per call, however it ended
    outcomes_logged = sorted(r["outcome"] for r in records)
    assert outcomes_logged == sorted(["shutdown"] * len(cut) + ["length"] * (len(STREAMS) - len(cut))), records
    assert "cancelled" not in outcomes_logged
    assert "ERROR" not in log and "Traceback" not in log, log[-3000:]
    assert f"{len(cut)} requests still open after {GRACE:g} s: ending them" in log
