"""The one retry policy: exponential backoff from ``first`` doubling up to ``cap``."""

from __future__ import annotations


class Backoff:
    """Delays ``first, 2*first, 4*first, ...`` capped at ``cap``; ``reset`` after a success.

    ``immediate`` makes the very first delay zero (a respawn after one crash should be fast).
    """

    def __init__(self, first: float, cap: float, immediate: bool = False) -> None:
        self.first = first
        self.cap = cap
        self.immediate = immediate
        self.failures = 0

    def next_delay(self) -> float:
        """The delay before the next try; counts one more failure."""
        self.failures += 1
        if self.immediate and self.failures == 1:
            return 0.0
        exponent = self.failures - (2 if self.immediate else 1)
        return float(min(self.cap, self.first * 2.0 ** min(exponent, 32)))

    def reset(self) -> None:
        self.failures = 0
