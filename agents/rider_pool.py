"""Own rider pools: riders within a few km of a hub quote last-mile legs.

A rider is busy from commit until the drop-off completes, then waits where it
delivered, so the pool's live positions shape its next quotes.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from agents.base import Agent, AgentEnv, nearest_pairs
from agents.occupancy import Occupancy
from market.config import RiderPoolCfg
from market.geo import distance_km
from market.round import Round, SourceSites
from market.types import AwardLine, Kind, LegQuote


class RiderPool(Agent):
    """Riders with positions, speed and per-km cost, bidding for legs near their hub."""

    kind = Kind.RIDER_POOL
    cfg: RiderPoolCfg
    CACHES = (*Agent.CACHES, "_sites")  # the sources within reach, recomputed when they change

    def __init__(self, cfg: RiderPoolCfg, env: AgentEnv) -> None:
        super().__init__(cfg, env)
        self.x, self.y = cfg.x_km, cfg.y_km
        angle = self.rng.uniform(0, 2 * np.pi, cfg.riders)
        radius = cfg.radius_km * 0.5 * np.sqrt(self.rng.uniform(0, 1, cfg.riders))
        self.rider_x = self.x + radius * np.cos(angle)
        self.rider_y = self.y + radius * np.sin(angle)
        self.busy = np.zeros(cfg.riders, dtype=bool)
        self.km_per_s = cfg.speed_kmh / 3600.0
        self.in_use = Occupancy()
        self._sites: tuple[tuple[str, ...], np.ndarray] | None = None

    def capacity_total(self) -> int:
        return self.cfg.riders

    def capacity_free(self) -> int:
        return self.cfg.riders - int(np.count_nonzero(self.busy))

    def utilization(self, now: float) -> float:
        return self.in_use.share(now, self.cfg.riders)

    def _advance(self, now: float) -> None:
        self.in_use.touch(now)

    def _reach(self, rnd: Round) -> np.ndarray:
        return distance_km(rnd.x, rnd.y, self.x, self.y) <= self.cfg.radius_km

    def _price(self, rnd: Round, now: float, eligible: np.ndarray, markup: float) -> tuple[LegQuote | None, Any]:
        cfg = self.cfg
        orders = eligible.nonzero()[0]
        src = rnd.sources
        sources = self._reachable_sources(src)
        free = ~self.busy
        if len(orders) == 0 or len(sources) == 0 or not free.any():
            return None, None
        to_src = distance_km(self.rider_x[free, None], self.rider_y[free, None], src.x[sources], src.y[sources])
        reach = np.zeros(len(src.ids))
        reach[sources] = to_src.min(axis=0)  # nearest free rider per source
        s_idx, o_idx = nearest_pairs(
            rnd, sources, orders, cfg.max_sources,
            lambda: distance_km(src.x[sources, None], src.y[sources, None], rnd.x[orders], rnd.y[orders]),
        )
        r = reach[s_idx]
        leg = distance_km(src.x[s_idx], src.y[s_idx], rnd.x[o_idx], rnd.y[o_idx])
        quote = LegQuote(
            agent_id=self.agent_id,
            order_idx=o_idx,
            source_idx=s_idx,
            price=(cfg.base_fee + cfg.per_km * (r + leg)) * markup,
            pickup_s=now + r / self.km_per_s,
            travel_s=leg / self.km_per_s + cfg.handover_s,
            reliability=self.reliability,
            capacity=0,
        )
        return quote, None

    def _reachable_sources(self, src: SourceSites) -> np.ndarray:
        """Sites within pickup radius; sites do not move, so this is cached per site list."""
        if self._sites is None or self._sites[0] is not src.ids:
            near = distance_km(src.x, src.y, self.x, self.y) <= self.cfg.pickup_radius_km
            self._sites = (src.ids, np.nonzero(near)[0])
        return self._sites[1]

    def _commit_line(self, line: AwardLine, now: float, payload: Any) -> None:
        free = np.flatnonzero(~self.busy)
        d = distance_km(self.rider_x[free], self.rider_y[free], line.source_x, line.source_y)
        rider = int(free[np.argmin(d)])
        self.busy[rider] = True
        self.in_use.add(now, 1)
        self.schedule_completion(line.done_s, (rider, line.dest_x, line.dest_y, line.on_time))

    def _uncommit(self, payload: Any, now: float) -> None:
        self.busy[payload[0]] = False  # the rider never set off: it stays where it was
        self.in_use.add(now, -1)

    def _on_complete(self, done_s: float, payload: Any) -> None:
        rider, x, y, on_time = payload
        self.busy[rider] = False
        self.in_use.add(done_s, -1)
        self.rider_x[rider], self.rider_y[rider] = x, y
        self.record_outcome(on_time)
