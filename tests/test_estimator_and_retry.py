"""Token estimation that learns from usage, and the SDK's retry rules."""

from __future__ import annotations

import random

import pytest

from prefect_anthropic.engine.estimator import PRIOR_RATIO, InputTokenEstimator, OutputTokenEstimator, load_encoder
from prefect_anthropic.engine.retry import RetryPolicy, retry_after_seconds


def test_the_offline_cl100k_encoding_is_used():
    count = load_encoder()
    assert count("hello world") == 2  # cl100k, not the characters/4 fallback


def test_count_covers_tools_system_and_messages():
    estimator = InputTokenEstimator()
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    plain = estimator.count_cl100k(base)
    assert estimator.count_cl100k({**base, "system": "You are a careful assistant."}) > plain
    assert estimator.count_cl100k({**base, "tools": [{"name": "lookup", "input_schema": {"type": "object"}}]}) > plain
    blocks = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert estimator.count_cl100k(blocks) == plain


def test_correction_is_learned_per_model():
    estimator = InputTokenEstimator()
    body = {"model": "a", "messages": [{"role": "user", "content": "some words here"}]}
    raw = estimator.count_cl100k(body)
    assert estimator.estimate(body) == pytest.approx(raw * PRIOR_RATIO, abs=1)
    for _ in range(30):
        estimator.observe("a", 1000, 1170)
    assert estimator.ratio("a") == pytest.approx(1.17)
    assert estimator.estimate(body) == pytest.approx(raw * 1.17, abs=1)
    assert estimator.ratio("b") == PRIOR_RATIO


def test_output_reservation_starts_at_max_tokens_then_follows_real_replies():
    estimator = OutputTokenEstimator(warmup=3)
    assert estimator.reserve("m", 4096) == 4096
    for n in (40, 50, 60):
        estimator.observe("m", n)
    reserved = estimator.reserve("m", 4096)
    assert 50 < reserved < 100  # mean plus a margin, far below max_tokens
    assert estimator.reserve("m", 30) == 30  # never above max_tokens


def test_retry_rules_follow_the_sdk():
    policy = RetryPolicy()
    for status in (408, 409, 429, 500, 504, 529):
        assert policy.is_retryable(status, {})
    for status in (400, 401, 403, 404, 413):
        assert not policy.is_retryable(status, {})
    assert policy.is_retryable(400, {"x-should-retry": "true"})
    assert not policy.is_retryable(500, {"x-should-retry": "false"})


def test_retry_delay_honours_retry_after_then_backs_off_with_jitter():
    policy = RetryPolicy()
    assert policy.delay(0, {"retry-after": "3"}) == 3
    assert policy.delay(0, {"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    rng = random.Random(0)
    delays = [policy.delay(n, {}, rng) for n in range(6)]
    for n, delay in enumerate(delays):
        base = min(0.5 * 2**n, 8)
        assert 0.75 * base <= delay <= base
    assert policy.delay(0, {"retry-after": "120"}, rng) == 120  # any positive retry-after, as the SDK 2.x
    assert policy.delay(0, {"retry-after": "0"}, rng) <= 0.5  # not positive: the backoff


def test_retry_after_as_http_date():
    import email.utils
    import time

    value = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= retry_after_seconds({"retry-after": value}) <= 11
