"""Log lines that a caller can trigger at will (failed logins, garbage bytes), at most one per period.

A flood of bad calls must not flood the log: the first line of a period is written, the rest are
counted, and the next line written says how many were left out.
"""

from __future__ import annotations

import logging
import time


class ThrottledLog:
    def __init__(self, logger: logging.Logger, period: float = 10.0, level: int = logging.WARNING):
        self._logger = logger
        self._level = level
        self.period = period
        self._last = -float("inf")
        self._suppressed = 0

    def __call__(self, message: str, *args) -> bool:
        """Log `message % args` unless a line went out less than `period` s ago; True if logged."""
        now = time.monotonic()
        if now - self._last < self.period:
            self._suppressed += 1
            return False
        if self._suppressed:
            message += " (%d more like it in the %.0f s before, not logged)"
            args = (*args, self._suppressed, now - self._last)
        self._logger.log(self._level, message, *args)
        self._last, self._suppressed = now, 0
        return True
