"""Builds the fleet of agents from config: one object per resource."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agents.base import Agent, AgentEnv
from agents.crowd import CrowdCarrier
from agents.locker import PickupLocker
from agents.rider_pool import RiderPool
from agents.warehouse import Warehouse
from market.catalogue import Catalogue
from market.config import FleetCfg
from market.geo import CityGrid
from market.round import SourceSites
from market.types import Kind


@dataclass
class Fleet:
    """All agents of a market, in a fixed order (warehouses first, then legs)."""

    cfg: FleetCfg
    env: AgentEnv
    agents: list[Agent]

    @property
    def sources(self) -> SourceSites:
        """The warehouses as the sites every leg bidder may quote from."""
        whs = [a for a in self.agents if isinstance(a, Warehouse)]
        return SourceSites(
            tuple(w.agent_id for w in whs),
            np.array([w.x for w in whs]),
            np.array([w.y for w in whs]),
            np.stack([w.category_ok for w in whs]),
        )

    @property
    def kinds(self) -> dict[str, Kind]:
        """Agent id to kind."""
        return {a.agent_id: a.kind for a in self.agents}

    def by_id(self) -> dict[str, Agent]:
        """Agent id to agent."""
        return {a.agent_id: a for a in self.agents}


def build_fleet(cfg: FleetCfg, seed: int = 0) -> Fleet:
    """Instantiates every resource of the fleet config with per-agent seeded RNGs."""
    env = AgentEnv(CityGrid(cfg.city.origin_lat, cfg.city.origin_lon), Catalogue.build(cfg.catalogue), seed)
    agents: list[Agent] = [Warehouse(c, env) for c in cfg.warehouses]
    agents += [RiderPool(c, env) for c in cfg.rider_pools]
    agents += [CrowdCarrier(c, env) for c in cfg.crowd]
    agents += [PickupLocker(c, env) for c in cfg.lockers]
    return Fleet(cfg, env, agents)
