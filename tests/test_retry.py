"""The one retry policy (common/retry.py): delays, jitter, Retry-After,
cancellation and the two ways of giving up."""

from __future__ import annotations

import asyncio

import pytest

from common.retry import RetryPolicy

EXACT = (1.0, 1.0)


def test_delays_double_from_base_up_to_the_cap() -> None:
    policy = RetryPolicy(base=0.5, cap=4.0, jitter=EXACT)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_a_very_long_outage_stays_at_the_cap() -> None:
    assert RetryPolicy(base=0.1, cap=2.0, jitter=EXACT).delay(100_000) == 2.0


@pytest.mark.parametrize(("jitter", "attempt"), [((0.0, 1.0), 3), ((0.8, 1.2), 2)])
def test_jitter_stays_within_its_bounds(jitter: tuple[float, float], attempt: int) -> None:
    policy = RetryPolicy(base=1.0, cap=10.0, jitter=jitter)
    plain = 2.0 ** (attempt - 1)
    delays = [policy.delay(attempt) for _ in range(2000)]
    assert all(jitter[0] * plain <= d <= jitter[1] * plain for d in delays)
    # Spread over the range, not one fixed point: replicas must not retry in step.
    width = (jitter[1] - jitter[0]) * plain
    assert max(delays) - min(delays) > 0.8 * width


def test_a_servers_retry_after_is_honoured_up_to_the_cap() -> None:
    policy = RetryPolicy(base=1.0, cap=60.0, jitter=(0.8, 1.2))
    assert all(policy.delay(1, retry_after=30.0) >= 30.0 for _ in range(200))
    assert all(policy.delay(1, retry_after=3600.0) == 60.0 for _ in range(20))
    # A Retry-After shorter than the backoff does not shorten it.
    assert RetryPolicy(base=8.0, cap=60.0, jitter=EXACT).delay(1, retry_after=1.0) == 8.0


def test_gives_up_after_its_attempts() -> None:
    backoff = RetryPolicy(base=1.0, cap=8.0, jitter=EXACT, attempts=3).backoff()
    assert [backoff.failed(), backoff.failed(), backoff.failed()] == [1.0, 2.0, None]
    assert backoff.attempt == 3


def test_gives_up_at_its_deadline_counted_from_the_first_failure() -> None:
    now = [100.0]
    backoff = RetryPolicy(base=1.0, cap=1.0, jitter=EXACT, deadline=10.0).backoff(lambda: now[0])
    assert backoff.failed() == 1.0
    now[0] = 109.9
    assert backoff.failed() == 1.0
    now[0] = 110.0
    assert backoff.failed() is None
    # A success starts both the delays and the deadline over.
    backoff.succeeded()
    now[0] = 500.0
    assert backoff.failed() == 1.0
    assert backoff.attempt == 1


def test_an_error_not_worth_retrying_stops_at_once() -> None:
    policy = RetryPolicy(base=1.0, jitter=EXACT, retry_on=lambda e: isinstance(e, TimeoutError))
    backoff = policy.backoff()
    assert backoff.failed(TimeoutError()) == 1.0
    assert backoff.failed(PermissionError()) is None


async def test_wait_stops_on_cancellation() -> None:
    backoff = RetryPolicy(base=60.0, cap=60.0, jitter=EXACT).backoff()
    waiting = asyncio.create_task(backoff.wait())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, timeout=1.0)


async def test_wait_answers_false_at_once_when_the_policy_says_stop() -> None:
    backoff = RetryPolicy(base=60.0, cap=60.0, attempts=1).backoff()
    assert await asyncio.wait_for(backoff.wait(), timeout=1.0) is False


def test_a_policy_that_cannot_work_is_refused() -> None:
    with pytest.raises(ValueError, match="not a retry policy"):
        RetryPolicy(base=5.0, cap=1.0)
