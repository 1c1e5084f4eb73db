"""The shipped RL policy inside a bidder host, in process and as a live Ray actor."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agents.actor import BidderHost, fleet_specs
from agents.fleet import build_fleet
from market.config import load_fleet, load_scenario
from market.demand import generate_orders
from market.round import Round, build_round
from market.types import LegQuote
from policies.rl import ByKind

PRETRAINED = Path(__file__).resolve().parents[1] / "policies" / "pretrained" / "peak" / "policy.zip"
SEED = 3


def _spec(strategy: str) -> Any:
    return next(s for s in fleet_specs(load_fleet("district"), SEED, strategy) if s.agent_id == "riders-a")


def _round() -> Round:
    fleet = build_fleet(load_fleet("district"), SEED)
    orders = generate_orders(load_scenario("peak"), fleet.cfg, fleet.env.catalogue, 400, SEED)[200:240]
    now = max(o.created_s for o in orders)
    return build_round(1, now, orders, fleet.sources, fleet.env.grid, fleet.env.catalogue.index)


def test_bidder_host_quotes_with_the_learned_policy() -> None:
    rnd = _round()
    rl, heuristic = BidderHost(_spec(f"rl:{PRETRAINED}")), BidderHost(_spec("heuristic"))
    assert isinstance(rl.strategy, ByKind) and rl.strategy.learned.loaded
    q_rl, q_h = rl.quote(rnd, rnd.opened_s, 5.0), heuristic.quote(rnd, rnd.opened_s, 5.0)
    assert isinstance(q_rl, LegQuote) and isinstance(q_h, LegQuote)
    assert np.array_equal(q_rl.order_idx, q_h.order_idx)
    assert (q_rl.price > q_h.price).all()  # the profit-trained bidder prices above the heuristic markup


ray = pytest.importorskip("ray")

from agents.actor import bidder_actor_class  # noqa: E402
from runtime.local_ray import local_ray  # noqa: E402
from runtime.ray_bidders import RAY_BIDDER_ENV  # noqa: E402


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """One loopback Ray cluster for the module, set up as bidhive's bidders run
    (`RAY_BIDDER_ENV`): at Ray's own nice 15, two busy processes beside the tests left
    the actor 4% of a core, and importing torch and SB3 took over 120 s."""
    with local_ray(num_cpus=2, extra_env=RAY_BIDDER_ENV):
        yield


def test_ray_bidder_actor_with_the_rl_policy_quotes_in_a_round(cluster: None) -> None:
    rnd = _round()
    actor = bidder_actor_class().remote(_spec(f"rl:{PRETRAINED}"))
    remote = ray.get(actor.quote.remote(rnd, rnd.opened_s, 5.0), timeout=120)
    local = BidderHost(_spec(f"rl:{PRETRAINED}")).quote(rnd, rnd.opened_s, 5.0)
    assert isinstance(remote, LegQuote) and remote.agent_id == "riders-a"
    assert np.array_equal(remote.order_idx, local.order_idx) and np.allclose(remote.price, local.price)
    ray.kill(actor)
