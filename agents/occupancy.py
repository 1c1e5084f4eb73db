"""Time-integrated occupancy, the basis of every utilization figure."""
from __future__ import annotations


class Occupancy:
    """Integrates a piecewise-constant level over time (busy riders, used lockers...)."""

    __slots__ = ("level", "_last_s", "_area", "_start_s")

    def __init__(self, start_s: float = 0.0, level: float = 0.0) -> None:
        self.level = level
        self._last_s = start_s
        self._start_s = start_s
        self._area = 0.0

    def set(self, now: float, level: float) -> None:
        """Moves to a new level at `now` (times must not go backwards)."""
        if now > self._last_s:
            self._area += self.level * (now - self._last_s)
            self._last_s = now
        self.level = level

    def add(self, now: float, delta: float) -> None:
        """Changes the level by `delta` at `now`."""
        self.set(now, self.level + delta)

    def area(self, now: float) -> float:
        """Level-seconds from the start up to `now`."""
        return self._area + self.level * max(0.0, now - self._last_s)

    def elapsed(self, now: float) -> float:
        """Seconds since the start."""
        return max(0.0, now - self._start_s)
