"""The simulator: determinism, terminal states and capacity over a whole run."""
from __future__ import annotations

from typing import Any

import pytest

from agents.crowd import CrowdCarrier
from agents.locker import PickupLocker
from agents.rider_pool import RiderPool
from agents.warehouse import Warehouse
from bidhive_cli.output import to_json
from market.config import load_scenario
from market.engine import LocalBidders
from market.simulator import SimSetup, Simulator
from policies.registry import make_policy


def run(policy: str, seed: int, n: int = 600, scenario: str = "peak") -> Simulator:
    sim = Simulator(SimSetup.build(load_scenario(scenario), make_policy(policy), seed=seed, n_orders=n))
    sim.run()
    return sim


@pytest.mark.parametrize("policy", ["static", "heuristic"])
def test_same_seed_gives_byte_identical_kpis(policy: str) -> None:
    a, b = run(policy, 11), run(policy, 11)
    assert to_json(a.report(timing=False)) == to_json(b.report(timing=False))
    assert to_json(a.report(timing=False)) != to_json(run(policy, 12).report(timing=False))


class CheckedBidders(LocalBidders):
    """Asserts after every round that no agent is committed beyond its capacity."""

    def settle(self, round_id: int, awards: dict[str, Any], quoted: list[str], now: float) -> None:
        super().settle(round_id, awards, quoted, now)
        for a in self.agents:
            if isinstance(a, RiderPool):
                assert 0 <= a.busy.sum() <= a.cfg.riders
            elif isinstance(a, PickupLocker):
                assert 0 <= a.occupied.level <= a.cfg.compartments
            elif isinstance(a, Warehouse):
                assert (a.stock >= 0).all() and (a.held_stock >= 0).all()
                assert a.queue_free_s - now <= a.cfg.max_queue_s + 1e-6
            elif isinstance(a, CrowdCarrier):
                assert a.active.level >= 0
            assert a.holds.units == 0  # every hold was committed or released at close


@pytest.mark.parametrize("policy", ["static", "heuristic"])
def test_no_agent_is_ever_committed_beyond_capacity(policy: str) -> None:
    setup = SimSetup.build(load_scenario("peak"), make_policy(policy), seed=5, n_orders=1500)
    sim = Simulator(setup, bidders=lambda fleet, pol: CheckedBidders(fleet.agents, pol.strategy))
    kpis = sim.run()
    assert kpis["orders"] == 1500


def test_every_order_ends_in_exactly_one_terminal_state() -> None:
    sim = run("heuristic", 3, n=800)
    k = sim.engine.kpis
    assert k.fulfilled + sum(k.unfulfilled.values()) == k.orders == 800
    assert sum(k.leg_mix.values()) == k.fulfilled


def test_kpis_have_the_contract_names() -> None:
    from market.kpis import KPI_NAMES

    report = run("static", 1, n=200).report()
    assert set(KPI_NAMES) <= set(report)
    assert set(report["utilization"]) == {"warehouse", "rider_pool", "crowd", "locker", "overall"}
    assert 0.0 < report["fulfilled_rate"] <= 1.0


def test_second_score_run_pays_at_least_first_score() -> None:
    sc = load_scenario("weekday")
    first = Simulator(SimSetup.build(sc, make_policy("heuristic", "first_score"), seed=2, n_orders=300)).run()
    second = Simulator(SimSetup.build(sc, make_policy("heuristic", "second_score"), seed=2, n_orders=300)).run()
    assert second["cost_per_order"] >= first["cost_per_order"]
