"""Discrete-event simulation of a fulfilment day on the market core.

Seeded and driven by the simulated clock alone, so the same seed gives the same
awards, the same journal and byte-identical KPIs (wall-clock timings aside).
"""
from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agents.fleet import Fleet, build_fleet
from market.config import FleetCfg, ProfileCfg, ScenarioCfg, load_fleet, load_profile
from market.demand import generate_orders
from market.engine import Bidders, LocalBidders, MarketEngine, RoundOutcome
from market.kpis import utilization_by_kind
from market.recorder import NullRecorder, Recorder
from market.round import Round
from market.types import Order
from policies.registry import NetworkPolicy

Progress = Callable[[int, int], None]


@dataclass
class SimSetup:
    """Everything a run is made of; `build` resolves names to configs."""

    scenario: ScenarioCfg
    fleet_cfg: FleetCfg
    profile: ProfileCfg
    policy: NetworkPolicy
    seed: int = 0
    n_orders: int | None = None
    exact_every: int | None = None
    recorder: Recorder = field(default_factory=NullRecorder)
    timer: Callable[[], float] = time.perf_counter
    profile_name: str = ""

    @classmethod
    def build(cls, scenario: ScenarioCfg, policy: NetworkPolicy, **kw: Any) -> SimSetup:
        """Loads the scenario's fleet and profile unless given."""
        fleet_cfg = kw.pop("fleet_cfg", None) or load_fleet(scenario.fleet)
        profile = kw.pop("profile", None)
        name = kw.pop("profile_name", None) or ("custom" if profile else scenario.profile)
        return cls(scenario, fleet_cfg, profile or load_profile(name), policy, profile_name=name, **kw)


@dataclass
class PendingRound:
    """A round opened by `Simulator.rounds()` and not yet traded.

    Attributes:
        batch: (order, attempts so far) for each order of the round, in round order.
        outcome: the traded round, once the generator has been resumed.
    """

    rnd: Round
    batch: list[tuple[Order, int]]
    outcome: RoundOutcome | None = None


class Simulator:
    """Feeds a day of orders through rounds and collects the KPIs."""

    def __init__(self, setup: SimSetup, bidders: Callable[[Fleet, NetworkPolicy], Bidders] | None = None) -> None:
        self.setup = setup
        sc = setup.scenario
        self.fleet = build_fleet(setup.fleet_cfg, setup.seed)
        make_bidders = bidders or (lambda fleet, policy: LocalBidders(fleet.agents, policy.strategy))
        self.engine = MarketEngine(
            fleet=self.fleet,
            policy=setup.policy,
            profile=setup.profile,
            bidders=make_bidders(self.fleet, setup.policy),
            seed=setup.seed,
            hold_ttl_s=sc.round.hold_ttl_s,
            recorder=setup.recorder,
            timer=setup.timer,
            exact_every=sc.exact_every if setup.exact_every is None else setup.exact_every,
        )
        n = setup.n_orders or sc.orders_per_day
        self.orders = generate_orders(sc, setup.fleet_cfg, self.fleet.env.catalogue, n, setup.seed)
        self._retry: list[tuple[float, int, Order, int]] = []
        self._seq = 0
        self.now = 0.0

    def run(self, progress: Progress | None = None) -> dict[str, Any]:
        """Runs the whole day and returns the KPI report."""
        for _ in self.rounds(progress):
            pass
        return self.report()

    def rounds(self, progress: Progress | None = None) -> Iterator[PendingRound]:
        """Runs the day step-wise: yields each round once opened, before any bidder quotes.

        The round is traded when the generator is resumed, and its `outcome` is filled
        in then. `run()` drains this generator, so a step-wise driver (the Gymnasium
        env) and `run()` follow exactly the same path and give the same awards and KPIs.
        """
        rc = self.setup.scenario.round
        orders, i, n = self.orders, 0, len(self.orders)
        self.setup.recorder.run_started(self._run_info())
        while i < n or self._retry:
            nxt = min(orders[i].created_s if i < n else math.inf, self._retry[0][0] if self._retry else math.inf)
            close = math.ceil(nxt / rc.window_s) * rc.window_s
            batch: list[tuple[Order, int]] = []
            while self._retry and self._retry[0][0] <= close:
                due, _, order, attempts = heapq.heappop(self._retry)
                batch.append((order, attempts))
            while i < n and orders[i].created_s <= close:
                self._receive(orders[i], close)
                batch.append((orders[i], 0))
                i += 1
            for k in range(0, len(batch), rc.max_batch):
                part = batch[k : k + rc.max_batch]
                pending = PendingRound(self.engine.open_round([o for o, _ in part], close, [a for _, a in part]), part)
                yield pending
                self._trade(pending, close)
            self.now = close
            if progress:
                progress(i, n)
        self.setup.recorder.close()

    def _receive(self, order: Order, now: float) -> None:
        self.engine.kpis.order_in(order.tier == "vip")
        self.setup.recorder.order_received(order, now)

    def _trade(self, pending: PendingRound, now: float) -> RoundOutcome:
        out = self.engine.trade(pending.rnd, now)
        rc = self.setup.scenario.round
        for o, reason in enumerate(out.alloc.reason):
            if not reason:
                continue
            order, attempts = pending.batch[o][0], pending.batch[o][1] + 1
            if attempts < rc.max_attempts:
                self._seq += 1
                heapq.heappush(self._retry, (now + rc.retry_after_s, self._seq, order, attempts))
            else:
                self.engine.kpis.gave_up(reason)
        pending.outcome = out
        return out

    def _run_info(self) -> dict[str, Any]:
        s = self.setup
        return {
            "scenario": s.scenario.model_dump(mode="json"),
            "fleet": s.fleet_cfg.model_dump(mode="json"),
            "profile": s.profile.model_dump(mode="json"),
            "profile_name": s.profile_name or s.scenario.profile,
            "policy": s.policy.name,
            "mechanism": s.policy.mechanism.name,
            "seed": s.seed,
            "orders": len(self.orders),
        }

    def report(self, timing: bool = True) -> dict[str, Any]:
        """KPIs so far; `timing=False` drops wall-clock fields for reproducible output."""
        util = utilization_by_kind(self.engine.utilization(self.now))
        return self.engine.kpis.report(util, timing=timing)
