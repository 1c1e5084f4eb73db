"""Time-integrated occupancy, the basis of every utilization figure."""
from __future__ import annotations


class Occupancy:
    """Integrates a piecewise-constant level over time (busy riders, used lockers...).

    The clock starts at the first time it is given, so an agent created before the
    market opens is not charged idle time it never had.
    """

    __slots__ = ("level", "_last_s", "_area", "_start_s")

    def __init__(self) -> None:
        self.level = 0.0
        self._last_s: float | None = None
        self._start_s: float | None = None
        self._area = 0.0

    def set(self, now: float, level: float) -> None:
        """Moves to a new level at `now`."""
        self.touch(now)
        self.level = level

    def add(self, now: float, delta: float) -> None:
        """Changes the level by `delta` at `now`."""
        self.set(now, self.level + delta)

    def touch(self, now: float) -> None:
        """Accumulates the current level up to `now` (times never go backwards)."""
        if self._last_s is None:
            self._start_s = self._last_s = now
        elif now > self._last_s:
            self._area += self.level * (now - self._last_s)
            self._last_s = now

    def area(self, now: float) -> float:
        """Level-seconds from the start up to `now`."""
        if self._last_s is None:
            return 0.0
        return self._area + self.level * max(0.0, now - self._last_s)

    def elapsed(self, now: float) -> float:
        """Seconds since the start."""
        return 0.0 if self._start_s is None else max(0.0, now - self._start_s)

    def share(self, now: float, capacity: float) -> float:
        """Time-averaged level as a share of a constant capacity, within [0, 1]."""
        span = self.elapsed(now) * capacity
        return min(1.0, self.area(now) / span) if span > 0 else 0.0
