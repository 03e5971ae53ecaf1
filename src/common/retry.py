"""The one retry policy every loop that retries uses.

A ``RetryPolicy`` says how long to wait before each try (a delay that
doubles from ``base`` up to ``cap``, times a random factor drawn from
``jitter``), when to give up (``attempts`` tries, ``deadline`` seconds of
failing) and which errors are worth another try (``retry_on``). A
``Backoff`` is one run of retries under a policy: it counts failures and
answers the next delay, or ``None`` when the policy says stop.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

# 2.0**64 times any sane base is already far beyond any cap; a larger
# exponent would only risk OverflowError after weeks of failing.
_MAX_EXPONENT = 64


def _always(exc: BaseException) -> bool:
    return True


@dataclass(frozen=True)
class RetryPolicy:
    """How a loop retries.

    ``base``: the first delay (s); each further failure doubles it, up to
    ``cap`` (s). ``jitter``: the delay is multiplied by a factor drawn
    uniformly from this range: ``(0.0, 1.0)`` is "full jitter", ``(0.8, 1.2)``
    is ±20 %, ``(1.0, 1.0)`` is none. ``attempts``: failures after which to
    give up (``None``: never). ``deadline``: seconds after the first failure
    (since the last success) after which to give up (``None``: never).
    ``retry_on``: whether an error is worth another try at all.
    """

    base: float = 0.1
    cap: float = 2.0
    jitter: tuple[float, float] = (0.0, 1.0)
    attempts: int | None = None
    deadline: float | None = None
    retry_on: Callable[[BaseException], bool] = _always

    def __post_init__(self) -> None:
        low, high = self.jitter
        if not (0 < self.base <= self.cap and 0 <= low <= high):
            raise ValueError(f"not a retry policy: {self!r}")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failure number ``attempt`` (1 for the first).

        ``retry_after`` is the wait a server asked for (HTTP Retry-After): the
        answer is never shorter than it, unless it exceeds ``cap``."""
        exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
        low, high = self.jitter
        wait = min(self.cap, self.base * 2.0**exponent)
        wait *= random.uniform(low, high)  # noqa: S311 (jitter, not secrecy)
        if retry_after is not None:
            wait = max(wait, min(self.cap, retry_after))
        return wait

    def backoff(self, clock: Callable[[], float] = time.monotonic) -> Backoff:
        """A new run of retries under this policy (``clock`` in seconds)."""
        return Backoff(self, clock)


class Backoff:
    """One run of retries. Call ``failed`` after each failed try (it answers
    the delay, or ``None`` to give up) or ``wait`` to also sleep; call
    ``succeeded`` after a success so the next failure starts over. Not
    shared between tasks."""

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self.attempt = 0
        self._since: float | None = None

    def failed(
        self, exc: BaseException | None = None, retry_after: float | None = None
    ) -> float | None:
        """Count a failure (``exc``, when there is one). Returns the seconds to
        wait before the next try, or ``None`` when the policy says stop: the
        error is not one to retry, the attempts are spent, or the deadline
        has passed."""
        if exc is not None and not self.policy.retry_on(exc):
            return None
        now = self._clock()
        if self._since is None:
            self._since = now
        self.attempt += 1
        policy = self.policy
        if policy.attempts is not None and self.attempt >= policy.attempts:
            return None
        if policy.deadline is not None and now - self._since >= policy.deadline:
            return None
        return policy.delay(self.attempt, retry_after)

    async def wait(
        self, exc: BaseException | None = None, retry_after: float | None = None
    ) -> bool:
        """``failed``, then sleep that long. Returns False (at once) when the
        policy says stop. Cancellation interrupts the sleep and propagates."""
        delay = self.failed(exc, retry_after)
        if delay is None:
            return False
        await asyncio.sleep(delay)
        return True

    def succeeded(self) -> None:
        """A try worked: the next failure waits ``base`` again, and the
        deadline counts from it."""
        self.attempt = 0
        self._since = None
