"""The crowd-sourced carrier pool: elastic, city-wide, pricier and less reliable.

Couriers on shift follow a daily wave plus noise; prices surge with the share of
couriers already busy, which is what makes the crowd an expensive overflow at peaks.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from agents.base import Agent, AgentEnv, agent_seed, nearest_pairs
from agents.occupancy import Occupancy
from market.config import CrowdCfg
from market.geo import distance_km
from market.round import Round
from market.types import AwardLine, Kind, LegQuote

SHIFT_SLOT_S = 900.0


class CrowdCarrier(Agent):
    """A crowd pool quoting any source to any customer, with surge pricing."""

    kind = Kind.CROWD
    cfg: CrowdCfg

    def __init__(self, cfg: CrowdCfg, env: AgentEnv) -> None:
        super().__init__(cfg, env)
        self.active = Occupancy()
        self.shift = Occupancy()
        self.km_per_s = cfg.speed_kmh / 3600.0
        self._slot = -1
        self._on_shift = cfg.base_couriers

    def on_shift(self, now: float) -> int:
        """Couriers working now: a daily wave with noise, fixed per 15-minute slot."""
        slot = int(now // SHIFT_SLOT_S)
        if slot != self._slot:
            cfg = self.cfg
            hour = (slot * SHIFT_SLOT_S / 3600.0) % 24.0
            wave = 1.0 + cfg.amplitude * np.sin(2 * np.pi * (hour - 12.0) / 24.0)
            noise = np.random.default_rng(agent_seed(self.env.seed, self.agent_id) + [slot]).normal()
            self._on_shift = max(1, int(round(cfg.base_couriers * wave * (1.0 + cfg.noise * noise))))
            self._slot = slot
        return self._on_shift

    def capacity_total(self) -> int:
        return self.on_shift(self.now_s)

    def capacity_free(self) -> int:
        return max(0, self.on_shift(self.now_s) - int(self.active.level))

    def utilization(self, now: float) -> float:
        """Busy courier-time over on-shift courier-time."""
        self._advance(now)
        shift = self.shift.area(now)
        return min(1.0, self.active.area(now) / shift) if shift > 0 else 0.0

    def _advance(self, now: float) -> None:
        self.active.touch(now)
        self.shift.set(now, max(self.on_shift(now), self.active.level))

    def _price(self, rnd: Round, now: float, eligible: np.ndarray, markup: float) -> tuple[LegQuote | None, Any]:
        cfg = self.cfg
        orders = eligible.nonzero()[0]
        src = rnd.sources
        s_idx, o_idx = nearest_pairs(rnd, np.arange(len(src.ids)), orders, cfg.max_sources,
                                     lambda: distance_km(src.x[:, None], src.y[:, None], rnd.x[orders], rnd.y[orders]))
        leg = distance_km(src.x[s_idx], src.y[s_idx], rnd.x[o_idx], rnd.y[o_idx])
        shift = self.on_shift(now)
        surge = 1.0 + cfg.surge_k * (self.active.level / shift) ** 2
        approach_km = cfg.pickup_mean_s * self.km_per_s
        quote = LegQuote(
            agent_id=self.agent_id,
            order_idx=o_idx,
            source_idx=s_idx,
            price=(cfg.base_fee + cfg.per_km * (approach_km + leg)) * surge * markup,
            pickup_s=np.full(len(o_idx), now + cfg.pickup_mean_s),
            travel_s=leg / self.km_per_s + cfg.handover_s,
            reliability=self.reliability,
            capacity=0,
        )
        return quote, None

    def _commit_line(self, line: AwardLine, now: float, payload: Any) -> None:
        self.active.add(now, 1)
        self.schedule_completion(line.done_s, line.on_time)

    def _uncommit(self, payload: Any, now: float) -> None:
        self.active.add(now, -1)

    def _on_complete(self, done_s: float, payload: Any) -> None:
        self.active.add(done_s, -1)
        self.record_outcome(payload)
