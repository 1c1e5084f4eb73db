"""Capacity holds: a bidder reserves what it quoted until the round closes.

Each bidder owns its HoldBook and is the only writer of its capacity, so two
auctioneers clearing rounds at once can never book the same unit twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class HoldError(RuntimeError):
    """A commit that the bidder's holds do not cover (expired, unknown or too large)."""


@dataclass(slots=True)
class Hold:
    """Units reserved for one round, plus kind-specific payload (e.g. stock)."""

    round_id: int
    units: int
    expires_s: float
    payload: Any = None


class HoldBook:
    """The holds one bidder has outstanding."""

    def __init__(self) -> None:
        self._holds: dict[int, Hold] = {}
        self._units = 0

    @property
    def units(self) -> int:
        """Units currently held across all open rounds."""
        return self._units

    def __len__(self) -> int:
        return len(self._holds)

    def __contains__(self, round_id: int) -> bool:
        return round_id in self._holds

    def place(self, round_id: int, units: int, now: float, ttl_s: float, payload: Any = None) -> Hold:
        """Reserves `units` for `round_id` until now + ttl_s."""
        if round_id in self._holds:
            raise HoldError(f"round {round_id} already holds capacity")
        if units < 0:
            raise HoldError("cannot hold negative capacity")
        hold = Hold(round_id, units, now + ttl_s, payload)
        self._holds[round_id] = hold
        self._units += units
        return hold

    def take(self, round_id: int, units: int, now: float) -> Hold:
        """Removes the hold to commit `units` of it; refuses anything it does not cover."""
        hold = self._holds.get(round_id)
        if hold is None:
            raise HoldError(f"no hold for round {round_id}")
        if now > hold.expires_s:
            self.release(round_id)
            raise HoldError(f"hold for round {round_id} expired at {hold.expires_s:.3f}")
        if units > hold.units:
            raise HoldError(f"round {round_id}: {units} awards exceed the {hold.units} units held")
        return self.release(round_id)  # type: ignore[return-value]

    def release(self, round_id: int) -> Hold | None:
        """Drops a hold (the round closed without an award, or the award consumed it)."""
        hold = self._holds.pop(round_id, None)
        if hold is not None:
            self._units -= hold.units
        return hold

    def release_all(self) -> list[Hold]:
        """Drops every hold and returns them, so their payloads can be freed."""
        holds, self._holds, self._units = list(self._holds.values()), {}, 0
        return holds

    def expire(self, now: float) -> list[Hold]:
        """Drops holds past their time-to-live and returns them so payloads can be freed."""
        if not self._holds:  # the usual case, asked once per bidder per round
            return []
        stale = [h for h in self._holds.values() if h.expires_s < now]
        for hold in stale:
            self.release(hold.round_id)
        return stale
