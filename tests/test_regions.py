"""Regions without Ray: their config's checks, and a region's auctioneer (`AuctioneerHost`
over in-process agents) under a driver that sends orders again or polls while rounds run."""
from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agents.fleet import build_fleet
from agents.rider_pool import RiderPool
from market.auctioneer import (AuctioneerCore, BatchPolicy, OrdersClock, RegionCfg, load_regions, region_bidders,
                               round_id_base)
from market.config import ConfigError, load_profile
from market.engine import LocalBidders, MarketEngine
from market.types import AwardLine
from policies.registry import make_policy
from runtime.auctioneer_actor import AuctioneerHost, AuctioneerSpec
from tests.test_ray_runtime import FLEET, SEED, orders_at


@pytest.mark.parametrize("regions, says", [
    ("[{name: w, bbox_km: [.nan, 0, 1, 1]}]", "finite"),
    ("[{name: w, bbox_km: [5, 0, 1, 1]}]", "x0 < x1 and y0 < y1"),
    ("[{name: w, bbox_km: [0, 0, 1, 1]}, {name: w, bbox_km: [1, 0, 2, 1]}]", "repeated: w"),
])
def test_a_bad_regions_file_is_one_line_naming_what(tmp_path: Path, regions: str, says: str) -> None:
    path = tmp_path / "regions.yaml"
    path.write_text(f"fleet: default\nregions: {regions}\n")
    with pytest.raises(ConfigError, match=says) as err:
        load_regions(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("region", [
    RegionCfg(name="north", bbox_km=(-10, 10, 10, 20), margin_km=0),  # only the crowd is in reach
    RegionCfg(name="legs", bbox_km=(0, 0, 1, 1), bidders=("riders-w", "crowd")),
    RegionCfg(name="stock", bbox_km=(0, 0, 1, 1), bidders=("wh-central",)),
])
def test_a_region_that_could_serve_no_order_is_refused(region: RegionCfg) -> None:
    """Without a warehouse the auctioneer's fleet has no source sites (its constructor
    crashed); without a last-mile bidder no order can be delivered."""
    with pytest.raises(ConfigError, match=f"region {region.name} needs a warehouse and a last-mile bidder"):
        region_bidders(region, FLEET)


def _host(max_batch: int = 4) -> AuctioneerHost:
    return AuctioneerHost(AuctioneerSpec(region_index=0, fleet=FLEET, seed=SEED,
                                         batch=BatchPolicy(window_s=0.0, max_batch=max_batch, retry_after_s=0.0)),
                          None)


def test_orders_sent_again_are_ignored_and_the_round_loop_lives_on() -> None:
    """A driver that retries `submit` after a timeout sends orders the auctioneer has: the
    ledger refuses a known id, which used to end the round loop and every open order."""
    host = _host(max_batch=8)
    try:
        orders = orders_at(20, 3)
        host.submit(orders[:12])
        host.submit(orders[8:12] + orders[12:] + orders[12:13])  # 4 known, 1 twice in one batch
        assert host.wait_idle(30), host.failure
        host.submit(orders)
        assert host.wait_idle(30) and host.alive, host.failure
        outcomes = host.outcomes()
        assert sorted(outcomes) == sorted(o.order_id for o in orders)
        assert all(status in ("awarded", "unfulfilled") for status, _, _ in outcomes.values())
    finally:
        host.stop()
    assert len(host.outcomes()) == 20  # read in place once the loop has stopped


def test_queries_run_on_the_round_loop_while_it_runs_and_in_place_once_it_ends() -> None:
    """The actor answers queries on other threads than its round loop, so they are run on
    the loop between steps (a read beside a settling round could see the ledger change
    size); once the loop has ended, in place, at once."""
    host = _host()
    loop: list[str] = []
    try:
        host.call(lambda core: loop.append(threading.current_thread().name)).result(5)
        seen_on: list[str] = []
        host._read(lambda core: seen_on.append(threading.current_thread().name))
        assert seen_on == loop == [f"auctioneer-{host.name}"]
        # from the loop itself (a callback that asks for status): in place, not a wait on itself
        assert host.call(lambda core: host._read(lambda c: threading.current_thread().name)).result(5) == loop[0]
        host.submit(orders_at(12, 4))
        assert host.wait_idle(30) and len(host.outcomes()) == 12
    finally:
        host.stop()
    started = time.monotonic()
    assert len(host.outcomes()) == 12 and host.call(lambda core: None).cancelled()
    assert time.monotonic() - started < 1


def test_calls_left_when_the_loop_ends_are_cancelled_not_left_waiting() -> None:
    """A call queued while the loop finishes its last step never runs: its caller hears at
    once (the desk answers 503) instead of waiting out its timeout."""
    host = AuctioneerHost(AuctioneerSpec(region_index=0, fleet=FLEET, seed=SEED), None, start=False)
    left = host.call(lambda core: "ran")
    host._stop = True
    host.start()
    assert host._thread is not None
    host._thread.join(5)
    assert left.cancelled()


def test_a_rider_shared_by_regions_whose_clocks_differ_is_never_booked_twice_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each region's market clock follows its own orders. Fed backlogs an hour apart, the
    region ahead moved a shared rider pool's clock past a job's end and freed the rider,
    and the region behind then sold that rider for a pickup inside the job (reproduced:
    one overlap in 12 jobs). A bidder's own time never goes back now."""
    jobs: list[tuple[str, int, float, float]] = []
    commit_line = RiderPool._commit_line

    def logged(self: RiderPool, line: AwardLine, now: float, payload: Any) -> None:
        commit_line(self, line, now, payload)
        rider = next(job for job in self._completions if job[1] == self._completion_seq)[2][0]
        jobs.append((self.agent_id, rider, line.pickup_s, line.done_s))

    monkeypatch.setattr(RiderPool, "_commit_line", logged)
    fleet, policy = build_fleet(FLEET, SEED), make_policy("heuristic")
    cores = []
    for region in range(2):  # both over the same agents: every bidder shared
        engine = MarketEngine(fleet, policy, load_profile("balanced"), LocalBidders(fleet.agents, policy.strategy),
                              seed=SEED + region, _round_id=round_id_base(region))
        cores.append(AuctioneerCore(engine, BatchPolicy(window_s=0.0, max_batch=8, retry_after_s=0.0, max_attempts=3),
                                    market=OrdersClock(follow_wall=False)))
    west_orders = orders_at(24, 3, t0=36_000.0, spread_s=120.0)
    east_orders = [dataclasses.replace(o, order_id="E" + o.order_id)
                   for o in orders_at(24, 4, t0=39_600.0, spread_s=120.0)]
    for k in range(0, 24, 8):
        for core, orders in zip(cores, (west_orders, east_orders)):
            core.submit(orders[k:k + 8])
            core.step(flush=True)
    for core in cores:
        assert core.run_until_idle(30)
    assert len(jobs) >= 8
    by_rider: dict[tuple[str, int], list[tuple[float, float]]] = collections.defaultdict(list)
    for agent_id, rider, pickup_s, done_s in jobs:
        by_rider[agent_id, rider].append((pickup_s, done_s))
    overlaps = [(key, a, b) for key, spans in by_rider.items()
                for a, b in itertools.pairwise(sorted(spans)) if b[0] < a[1]]
    assert overlaps == []
