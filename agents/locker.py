"""Community pickup lockers: a scheduled shuttle brings the parcel, the customer collects.

Cheap but slow and only for orders that allow it, fit a compartment and whose
customer lives within walking distance. A compartment is busy until collection.
"""
from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from agents.base import Agent, AgentEnv, nearest_pairs
from agents.occupancy import Occupancy
from market.config import LockerCfg
from market.geo import distance_km
from market.round import Round
from market.types import AwardLine, Kind, LegQuote


class PickupLocker(Agent):
    """A locker bank quoting shuttle legs from any warehouse to itself."""

    kind = Kind.LOCKER
    cfg: LockerCfg

    def __init__(self, cfg: LockerCfg, env: AgentEnv) -> None:
        super().__init__(cfg, env)
        self.x, self.y = cfg.x_km, cfg.y_km
        self.occupied = Occupancy()
        self.km_per_s = cfg.shuttle_speed_kmh / 3600.0
        self.shuttle_offset_s = float(zlib.crc32(cfg.id.encode()) % int(cfg.shuttle_every_s))

    def capacity_total(self) -> int:
        return self.cfg.compartments

    def capacity_free(self) -> int:
        return self.cfg.compartments - int(self.occupied.level)

    def utilization(self, now: float) -> float:
        return self.occupied.share(now, self.cfg.compartments)

    def _advance(self, now: float) -> None:
        self.occupied.touch(now)

    def next_departure(self, now: float) -> float:
        """The next shuttle leaving the warehouses at or after `now`."""
        every = self.cfg.shuttle_every_s
        return float(np.ceil((now - self.shuttle_offset_s) / every) * every + self.shuttle_offset_s)

    def _reach(self, rnd: Round) -> np.ndarray:
        fits = rnd.locker_ok & (rnd.units <= self.cfg.max_units)
        if not np.count_nonzero(fits):  # most rounds: skip the distances
            return fits
        return fits & (distance_km(rnd.x, rnd.y, self.x, self.y) <= self.cfg.walk_km)

    def _price(self, rnd: Round, now: float, eligible: np.ndarray, markup: float) -> tuple[LegQuote | None, Any]:
        cfg = self.cfg
        orders = eligible.nonzero()[0]
        src = rnd.sources
        shuttle_km = distance_km(src.x, src.y, self.x, self.y)
        s_idx, o_idx = nearest_pairs(rnd, np.arange(len(src.ids)), orders, cfg.max_sources,
                                     lambda: np.broadcast_to(shuttle_km[:, None], (len(src.ids), len(orders))))
        quote = LegQuote(
            agent_id=self.agent_id,
            order_idx=o_idx,
            source_idx=s_idx,
            price=(cfg.fee + cfg.per_km * shuttle_km[s_idx]) * markup,
            pickup_s=np.full(len(o_idx), self.next_departure(now)),
            travel_s=shuttle_km[s_idx] / self.km_per_s,
            reliability=self.reliability,
            capacity=0,
        )
        return quote, None

    def _commit_line(self, line: AwardLine, now: float, payload: Any) -> None:
        self.occupied.add(now, 1)
        self.schedule_completion(line.done_s, line.on_time)

    def _uncommit(self, payload: Any, now: float) -> None:
        self.occupied.add(now, -1)

    def _on_complete(self, done_s: float, payload: Any) -> None:
        self.occupied.add(done_s, -1)
        self.record_outcome(payload)
