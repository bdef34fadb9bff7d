"""Exponential backoff with jitter, shared by the control-plane, engine and S3 clients."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Delays between attempts: ``initial_delay * 2**(n-1)`` seconds, capped at ``max_delay``.

    Each delay is drawn uniformly from the upper half of that value (equal jitter), so replicas
    that failed together do not retry together. Attempts stop after ``max_attempts`` tries, or
    earlier when the next delay would pass ``max_elapsed`` seconds since the first try.
    """

    initial_delay: float = 0.5
    max_delay: float = 10.0
    max_attempts: int = 8
    max_elapsed: float = 120.0

    def delay(self, retry_number: int) -> float:
        """Return the delay in seconds before retry number ``retry_number`` (1 for the first)."""
        base = min(self.max_delay, self.initial_delay * 2 ** (retry_number - 1))
        return random.uniform(base / 2, base)

    def allows_retry(self, attempts_made: int, elapsed: float, delay: float) -> bool:
        return attempts_made < self.max_attempts and elapsed + delay <= self.max_elapsed
