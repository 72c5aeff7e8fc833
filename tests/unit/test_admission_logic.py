"""Admission control, pure asyncio: rate windows, stream and queue caps, release on every exit, draining."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from tokenloom.front.admission import Admission, AdmissionConfig, Closed, Rejected
from tokenloom.front.identity import client_identity, peer_host


def run(coro):
    return asyncio.run(coro)


def admission(**kw) -> Admission:
    return Admission(AdmissionConfig(**{"max_queued_requests": 0, "max_queued_prompt_tokens": 0, **kw}))


async def rejected(adm: Admission, client: str = "a", tokens: int = 1) -> Rejected:
    with pytest.raises(Rejected) as info:
        await adm.admit(client, tokens)
    adm.check_invariants()
    return info.value


# -- rate limit -----------------------------------------------------------------------------------


def test_rate_limit_rejects_at_once_and_names_the_limit_and_when_to_retry():
    async def go():
        adm = admission(rate_limit_per_client=3, rate_limit_period=0.5)
        t0 = time.monotonic()
        for _ in range(3):
            (await adm.admit("a", 1)).release()
        err = await rejected(adm)
        assert time.monotonic() - t0 < 0.1, "an over-rate request must not wait for the window"
        assert err.limit == "rate_limit_per_client"
        assert "--rate-limit-per-client 3" in err.message and "retry in" in err.message
        assert 0.3 < err.retry_after_seconds <= 0.5
        await asyncio.sleep(err.retry_after_seconds + 0.02)
        (await adm.admit("a", 1)).release()  # the hint was enough
        adm.check_invariants()

    run(go())


def test_rate_limit_is_per_client_and_rejections_do_not_count():
    async def go():
        adm = admission(rate_limit_per_client=2, rate_limit_period=0.4)
        for _ in range(2):
            (await adm.admit("a", 1)).release()
        for _ in range(5):
            await rejected(adm, "a")
        for _ in range(2):
            (await adm.admit("b", 1)).release()  # another client has its own window
        await asyncio.sleep(0.45)
        # Five rejections did not push the window forward: two more pass, the third does not.
        for _ in range(2):
            (await adm.admit("a", 1)).release()
        await rejected(adm, "a")

    run(go())


def test_the_rate_retry_hint_is_when_the_oldest_start_leaves_the_window():
    async def go():
        adm = admission(rate_limit_per_client=2, rate_limit_period=1.0)
        (await adm.admit("a", 1)).release()
        await asyncio.sleep(0.5)
        (await adm.admit("a", 1)).release()
        err = await rejected(adm)
        assert 0.2 < err.retry_after_seconds < 0.55, err.retry_after_seconds  # the first start's ~0.5 s, not ~1 s
        await asyncio.sleep(err.retry_after_seconds + 0.02)
        (await adm.admit("a", 1)).release()  # the hint was enough
        await rejected(adm)  # and no more than that: the second start is still in the window

    run(go())


def test_concurrent_admissions_never_overshoot_the_rate():
    async def go():
        adm = admission(rate_limit_per_client=5, rate_limit_period=10)
        results = await asyncio.gather(*(adm.admit("a", 1) for _ in range(40)), return_exceptions=True)
        admitted = [r for r in results if not isinstance(r, BaseException)]
        assert len(admitted) == 5
        assert all(isinstance(r, Rejected) for r in results if isinstance(r, BaseException))
        adm.check_invariants()

    run(go())


def test_idle_clients_are_forgotten():
    async def go():
        adm = admission(rate_limit_per_client=1, rate_limit_period=0.05)
        for i in range(100):
            (await adm.admit(f"c{i}", 1)).release()
        await asyncio.sleep(0.1)
        (await adm.admit("last", 1)).release()
        assert set(adm._throttlers) == {"last"}

    run(go())


# -- streams per client -----------------------------------------------------------------------------


def test_stream_cap_is_per_client_and_frees_when_a_stream_ends():
    async def go():
        adm = admission(max_streams_per_client=2)
        a1, a2 = await adm.admit("a", 1), await adm.admit("a", 1)
        err = await rejected(adm, "a")
        assert err.limit == "max_streams_per_client" and "--max-streams-per-client 2" in err.message
        assert err.retry_after_seconds is None and "when one of them ends" in err.message
        b = [await adm.admit("b", 1), await adm.admit("b", 1)]  # unaffected
        a1.release()
        a3 = await adm.admit("a", 1)
        adm.check_invariants()
        for t in (a2, a3, *b):
            t.release()
        assert adm.num_open == 0
        adm.check_invariants()

    run(go())


# -- global queue caps -------------------------------------------------------------------------------


def test_queued_requests_cap_counts_requests_until_their_first_event():
    async def go():
        adm = admission(max_queued_requests=2)
        t1, t2 = await adm.admit("a", 10), await adm.admit("b", 10)
        err = await rejected(adm, "c")
        assert err.limit == "max_queued_requests" and "--max-queued-requests 2" in err.message
        assert err.retry_after_seconds > 0
        t1.started()  # running now: no longer queued, still open
        t1.started()  # idempotent
        t3 = await adm.admit("c", 10)
        assert adm.queued_requests == 2 and adm.num_open == 3
        adm.check_invariants()
        for t in (t1, t2, t3):
            t.release()
        assert adm.queued_requests == 0 and adm.queued_prompt_tokens == 0

    run(go())


def test_queued_prompt_tokens_cap_but_a_long_prompt_gets_into_an_empty_queue():
    async def go():
        adm = admission(max_queued_prompt_tokens=100)
        big = await adm.admit("a", 500)  # longer than the cap: admitted, or it could never run
        err = await rejected(adm, "b", 1)
        assert err.limit == "max_queued_prompt_tokens" and "--max-queued-prompt-tokens 100" in err.message
        big.started()
        t1 = await adm.admit("b", 60)
        t2 = await adm.admit("c", 40)
        await rejected(adm, "d", 1)
        assert adm.queued_prompt_tokens == 100
        t1.release()  # ended before its first event (cancelled, failed): its tokens leave the queue
        (await adm.admit("d", 60)).release()
        for t in (big, t2):
            t.release()
        adm.check_invariants()

    run(go())


def test_queue_retry_hint_is_the_recent_time_between_starts_and_the_message_estimates_the_wait():
    async def go():
        adm = admission(max_queued_requests=3)
        for _ in range(20):
            t = await adm.admit("a", 1)
            await asyncio.sleep(0.01)
            t.started()
            t.release()
        blockers = [await adm.admit("a", 1) for _ in range(3)]
        err = await rejected(adm, "b")
        # A place frees about every 0.01 s; behind 3 queued requests, a 4th would start after ~0.04 s.
        assert 0.005 < err.retry_after_seconds < 0.1, err.retry_after_seconds
        wait = float(re.search(r"would wait about ([0-9.]+) s for its first token", err.message).group(1))
        assert 0.0 < wait < 0.5, err.message
        assert f"retry in about {err.retry_after_seconds:.3f} s" in err.message
        for t in blockers:
            t.release()

    run(go())


def test_queue_full_before_any_start_says_the_wait_is_not_known_and_hints_one_second():
    async def go():
        adm = admission(max_queued_prompt_tokens=10)
        first = await adm.admit("a", 8)
        err = await rejected(adm, "b", 5)
        assert err.limit == "max_queued_prompt_tokens" and err.retry_after_seconds == 1.0
        assert "the wait is not known" in err.message, err.message
        first.release()

    run(go())


# -- queue wait ---------------------------------------------------------------------------------------


def test_a_ticket_queued_past_its_deadline_is_told_how_long_it_waited_and_when_to_retry():
    async def go():
        adm = admission(max_queue_wait=0.05)
        t = await adm.admit("a", 4)
        assert t.queue_deadline == pytest.approx(t.admitted_at + 0.05)
        behind = await adm.admit("b", 4)
        await asyncio.sleep(0.06)
        err = adm.expired(t)
        assert err.limit == "max_queue_wait" and "--max-queue-wait 0.05" in err.message
        waited = float(re.search(r"waited ([0-9.]+) s without starting", err.message).group(1))
        assert 0.05 <= waited < 1, err.message
        assert "2 requests are waiting for their first token" in err.message
        # Nothing has started in all that time: the hint is the limit itself.
        assert err.retry_after_seconds == pytest.approx(0.05)
        t.release()
        assert adm.queued_requests == 1
        adm.check_invariants()
        behind.release()
        unlimited = await admission(max_queue_wait=0).admit("a", 1)
        assert unlimited.queue_deadline is None

    run(go())


# -- release on every exit path ----------------------------------------------------------------------


def test_the_context_manager_releases_on_finish_error_and_cancel():
    async def go():
        adm = admission(max_streams_per_client=1, max_queued_requests=1)
        async with adm.admitted("a", 5):
            adm.check_invariants()
            assert adm.num_open == 1
        assert adm.num_open == 0

        with pytest.raises(RuntimeError):
            async with adm.admitted("a", 5) as ticket:
                ticket.started()
                raise RuntimeError("the step failed")
        assert adm.num_open == 0

        entered = asyncio.Event()

        async def stream():
            async with adm.admitted("a", 5):
                entered.set()
                await asyncio.sleep(3600)

        task = asyncio.create_task(stream())
        await entered.wait()
        await rejected(adm, "a")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert adm.num_open == 0 and adm.queued_requests == 0
        adm.check_invariants()
        (await adm.admit("a", 5)).release()

    run(go())


def test_release_is_idempotent_and_started_after_release_is_ignored():
    async def go():
        adm = admission(max_streams_per_client=3)
        t = await adm.admit("a", 7)
        other = await adm.admit("a", 3)
        t.release()
        t.release()
        t.started()
        assert adm.num_open == 1 and adm.queued_prompt_tokens == 3
        adm.check_invariants()
        other.release()

    run(go())


# -- draining ----------------------------------------------------------------------------------------


def test_closed_admission_refuses_new_requests_and_waits_for_open_ones():
    async def go():
        adm = admission()
        assert await adm.wait_idle(0.01)
        t = await adm.admit("a", 1)
        adm.close()
        with pytest.raises(Closed):
            await adm.admit("b", 1)
        assert not await adm.wait_idle(0.05)
        asyncio.get_running_loop().call_later(0.05, t.release)
        start = time.monotonic()
        assert await adm.wait_idle(5)
        assert time.monotonic() - start < 1

    run(go())


# -- configuration and identity ------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["rate_limit_per_client", "max_streams_per_client", "max_queued_requests",
                                   "max_queued_prompt_tokens", "max_queue_wait"])
def test_negative_limits_are_refused(field):
    with pytest.raises(ValueError, match=field):
        AdmissionConfig(**{field: -1})


def test_the_rate_period_must_be_positive():
    with pytest.raises(ValueError, match="rate_limit_period"):
        AdmissionConfig(rate_limit_per_client=1, rate_limit_period=0)


def test_unlimited_by_default_except_the_queue_whose_caps_come_from_the_engine():
    cfg = AdmissionConfig()
    assert (cfg.rate_limit_per_client, cfg.max_streams_per_client) == (0, 0)
    assert cfg.max_queue_wait == 60 and cfg.client_id_metadata_key == "x-client-id"
    with pytest.raises(ValueError, match="resolved"):
        Admission(cfg)  # the queue caps are not derived yet
    derived = cfg.resolved(max_num_seqs=64, kv_cache_tokens=32768)
    assert (derived.max_queued_requests, derived.max_queued_prompt_tokens) == (4 * 64, 32768)
    explicit = AdmissionConfig(max_queued_requests=10, max_queued_prompt_tokens=0).resolved(64, 32768)
    assert (explicit.max_queued_requests, explicit.max_queued_prompt_tokens) == (10, 0)  # 0: unlimited, kept

    async def go():
        adm = Admission(AdmissionConfig(max_queued_requests=0, max_queued_prompt_tokens=0))
        tickets = [await adm.admit("a", 10_000) for _ in range(200)]
        adm.check_invariants()
        for t in tickets:
            t.release()

    run(go())


@pytest.mark.parametrize("peer, host", [
    ("ipv4:10.0.0.7:5312", "10.0.0.7"),
    ("ipv6:%5B2001:db8::7%5D:443", "2001:db8::7"),
    ("ipv6:[::ffff:10.0.0.7]:5312", "10.0.0.7"),  # IPv4-mapped: the same host as over IPv4
    # Every loopback address is one client, whatever the address family.
    ("ipv4:127.0.0.1:5312", "loopback"),
    ("ipv4:127.0.0.2:5312", "loopback"),
    ("ipv6:[::1]:5312", "loopback"),
    ("ipv6:[::ffff:127.0.0.1]:5312", "loopback"),
    ("unix:/run/tokenloom.sock", "unix:/run/tokenloom.sock"),
])
def test_peer_host_drops_scheme_and_port(peer, host):
    assert peer_host(peer) == host


def test_client_identity_prefers_the_metadata_key_then_the_peer_host():
    meta = (("user-agent", "grpc-python"), ("x-client-id", "team-a"))
    assert client_identity(meta, "ipv4:10.0.0.7:1234", "x-client-id") == "team-a"
    assert client_identity(meta, "ipv4:10.0.0.7:1234", "X-Client-Id") == "team-a"
    assert client_identity(meta, "ipv4:10.0.0.7:1234", "x-tenant") == "10.0.0.7"
    assert client_identity(meta, "ipv4:10.0.0.7:1234", "") == "10.0.0.7"  # metadata ignored
    assert client_identity((("x-client-id", ""),), "ipv4:10.0.0.7:1234", "x-client-id") == "10.0.0.7"


def test_a_rate_window_takes_a_start_without_suspending_and_refuses_one_without_recording_or_cancelling():
    """What admission assumes of asyncio-throttle's public `acquire` under `asyncio.timeout(0)`."""
    from tokenloom.front.admission import _RateWindow

    async def go():
        window = _RateWindow(2, 0.3)
        ran_meanwhile = []
        loop = asyncio.get_running_loop()
        for _ in range(2):
            loop.call_soon(ran_meanwhile.append, True)
            assert await window.try_start()
            assert not ran_meanwhile, "a start with room must not give the loop a turn"
        bystander = asyncio.create_task(asyncio.sleep(0.05))
        t0 = time.monotonic()
        for _ in range(20):
            assert not await window.try_start()
        assert time.monotonic() - t0 < 0.05, "a refusal must not wait for the window"
        assert asyncio.current_task().cancelling() == 0  # the timeout undid its own cancellation
        await asyncio.sleep(0.01)  # and this task is not left cancelled
        await bystander  # nor was any other task cancelled
        assert 0.2 < window.retry_after() <= 0.3
        await asyncio.sleep(window.retry_after() + 0.02)
        # Twenty refusals recorded nothing: the window holds exactly two starts again, no more.
        assert await window.try_start() and await window.try_start()
        assert not await window.try_start()

    run(go())


def test_a_cancellation_from_outside_during_a_refusal_still_cancels():
    from tokenloom.front.admission import _RateWindow

    async def go():
        window = _RateWindow(1, 10)
        assert await window.try_start()
        task = asyncio.create_task(window.try_start())
        await asyncio.sleep(0)  # the task is now in the throttler's sleep, its timeout due next turn
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(go())
