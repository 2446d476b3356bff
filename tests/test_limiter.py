"""Token buckets and the rate limiter, on a controllable clock: exact timing without sleeping."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from prefect_anthropic.engine.limiter import RateLimiter, RateLimits, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


def test_bucket_refills_continuously_up_to_capacity():
    bucket = TokenBucket(per_minute=60, capacity=10, now=0.0)
    bucket.take(10, 0.0)
    assert bucket.wait_time(1, 0.0) == pytest.approx(1.0)
    assert bucket.wait_time(1, 0.5) == pytest.approx(0.5)
    bucket.refill(100.0)
    assert bucket.level == 10  # never above capacity


def test_a_cost_above_capacity_is_admitted_when_full_and_paid_back_by_refill():
    bucket = TokenBucket(per_minute=600, capacity=10, now=0.0)  # 10/s
    assert bucket.wait_time(50, 0.0) == 0.0
    bucket.take(50, 0.0)
    assert bucket.level == -40
    assert bucket.wait_time(1, 0.0) == pytest.approx(4.1)


def test_give_back_and_hold_until():
    bucket = TokenBucket(per_minute=60, capacity=5, now=0.0)
    bucket.take(5, 0.0)
    bucket.give_back(3, 0.0)
    assert bucket.level == 3
    bucket.hold_until(10.0)
    assert bucket.level == 0 and bucket.wait_time(1, 10.0) == pytest.approx(1.0)
    assert bucket.wait_time(1, 5.0) == pytest.approx(6.0)  # nothing accrues before 10.0


async def test_requests_are_paced_evenly_at_the_limit():
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(requests_per_minute=120), clock=clock, sleep=clock.sleep)
    start = clock.now
    times = []
    for _ in range(11):
        await limiter.acquire(0, 0)
        times.append(clock.now - start)
    # Capacity is half a second of refill (1 request), then one every 0.5 s: no minute-sized burst.
    assert times[0] == 0.0
    assert times[-1] == pytest.approx(5.0)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g == pytest.approx(0.5) for g in gaps)


async def test_input_and_output_tokens_bound_the_rate():
    clock = FakeClock()
    limits = RateLimits(input_tokens_per_minute=6000, output_tokens_per_minute=600)  # 100/s and 10/s
    limiter = RateLimiter(limits, clock=clock, sleep=clock.sleep)
    start = clock.now
    for _ in range(10):
        await limiter.acquire(100, 5)
    # Input 100/s allows 1 request/s, output 10/s allows 2/s: input decides. The output bucket starts empty
    # (the server counts output one reply later: no burst), so the first request waits 0.5 s for its 5
    # tokens; it is admitted from the full input bucket (capacity 50, going 50 into debt), then one a second.
    assert clock.now - start == pytest.approx(9.5)


async def test_settle_refunds_over_reservations():
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(output_tokens_per_minute=600), clock=clock, sleep=clock.sleep)
    reservation = await limiter.acquire(0, 1000)  # max_tokens reserved: deep in debt
    assert limiter.output.level == pytest.approx(5 - 1000)
    limiter.settle(reservation, 0, 20)  # the reply was 20 tokens
    assert limiter.output.level == pytest.approx(5 - 20)


async def test_a_lone_429_empties_the_buckets_and_a_storm_holds_everyone_then_resumes_at_the_rate():
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(requests_per_minute=60), clock=clock, sleep=clock.sleep, burst_seconds=3)
    limiter.pause(5.0)  # a lone 429 (our pacing a hair ahead of the server's): no burst, but no pause
    start = clock.now
    await limiter.acquire(0, 0)
    await limiter.acquire(0, 0)
    assert clock.now - start == pytest.approx(2.0)  # one a second from an empty bucket
    limiter.pause(5.0)  # a second 429 within the first's retry-after: the limits are lower than ours
    start = clock.now
    await limiter.acquire(0, 0)
    await limiter.acquire(0, 0)
    # Nothing before 5 s; then the bucket starts empty, so one per second (no burst after the pause).
    assert clock.now - start == pytest.approx(7.0)


async def test_waiters_are_served_in_order():
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(requests_per_minute=60), clock=clock, sleep=clock.sleep)
    order = []

    async def worker(i):
        await limiter.acquire(0, 0)
        order.append(i)

    await asyncio.gather(*(worker(i) for i in range(6)))
    assert order == list(range(6))


def test_server_limits_below_the_configured_ones_are_adopted():
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(requests_per_minute=2000, input_tokens_per_minute=10**6), clock=clock)
    limiter.observe_headers(
        {
            "anthropic-ratelimit-requests-limit": "1000",
            "anthropic-ratelimit-requests-remaining": "999",
            "anthropic-ratelimit-input-tokens-limit": "2000000",
            "anthropic-ratelimit-input-tokens-remaining": "1999000",
        }
    )
    assert limiter.limits.requests_per_minute == 1000
    assert limiter.limits.input_tokens_per_minute == 10**6  # a higher server limit does not raise ours


def test_auto_mode_adopts_whatever_the_server_reports():
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(requests_per_minute=50), adopt_server_limits=True, clock=clock)
    limiter.observe_headers(
        {
            "anthropic-ratelimit-requests-limit": "4000",
            "anthropic-ratelimit-requests-remaining": "3999",
            "anthropic-ratelimit-output-tokens-limit": "400000",
            "anthropic-ratelimit-output-tokens-remaining": "400000",
        }
    )
    assert limiter.limits.requests_per_minute == 4000
    assert limiter.limits.output_tokens_per_minute == 400000


def test_remaining_lowers_the_local_level_beyond_rounding_only():
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(input_tokens_per_minute=600_000), clock=clock)  # capacity 5,000
    limiter.observe_headers(
        {"anthropic-ratelimit-input-tokens-limit": "600000", "anthropic-ratelimit-input-tokens-remaining": "4000"}
    )
    assert limiter.input.level == 5_000  # within the 1,000 rounding: untouched
    limiter.observe_headers(
        {"anthropic-ratelimit-input-tokens-limit": "600000", "anthropic-ratelimit-input-tokens-remaining": "2000"}
    )
    assert limiter.input.level == 3000


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        RateLimits(requests_per_minute=0)
