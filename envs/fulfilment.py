"""A Gymnasium environment in which one bidder of the real market learns how to bid.

The env drives the real simulator (`market.simulator.Simulator.rounds()`, the same
engine, agents, clearing and world as `bidhive simulate`): no market logic is forked
here. It pauses the day at every round the learning bidder takes part in, asks the
agent for that round's bid, and resumes.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from agents.base import Agent
from agents.fleet import build_fleet
from market.clearing import ScoringAuction
from market.config import FleetCfg, ProfileCfg, ScenarioCfg, load_fleet, load_profile, load_scenario
from market.engine import RoundOutcome
from market.simulator import PendingRound, SimSetup, Simulator
from market.types import Category, Item, Kind, Order, Tier
from policies.base import BidContext, BidDecision, BiddingStrategy, CostPricing
from policies.registry import NetworkPolicy, make_policy
from policies.rl import OBS_HIGH, OBS_LOW, RLPolicy, action_dim, decode_action, encode_obs

RewardMode = Literal["profit", "network"]
OTHERS = ("heuristic", "truthful", "static", "exact")
DEFAULT_REWARD_SCALE = {"profit": 0.1, "network": 0.05}
_NO_BID_OBS = np.clip(np.zeros(len(OBS_LOW), dtype=np.float32), OBS_LOW, OBS_HIGH)
TRAIN_SEEDS = 2**30  # reset() draws simulator seeds below this...
HELD_OUT_BASE = 2**30  # ...so evaluation seeds from here on are never seen in training


class _LearnerSlot:
    """The learning bidder's strategy: it bids whatever the env's last action says."""

    name = "learner"

    def __init__(self) -> None:
        self.decision = BidDecision()
        self.decided = False

    def decide(self, ctx: BidContext) -> BidDecision:
        """The decision set by `step`, clipped as the agent will clip it."""
        self.decided = True
        return self.decision


@dataclass(frozen=True)
class _Dispatch:
    """Routes each bidder to its strategy: the learner, its peers (self-play) or the rest."""

    learner_id: str
    learner: BiddingStrategy
    kind: Kind
    peers: BiddingStrategy | None
    rest: BiddingStrategy
    name: str = "env"

    def decide(self, ctx: BidContext) -> BidDecision:
        """The strategy of the bidder named in the context decides."""
        if ctx.agent_id == self.learner_id:
            return self.learner.decide(ctx)
        if self.peers is not None and ctx.kind == self.kind:
            return self.peers.decide(ctx)
        return self.rest.decide(ctx)


def _order_from_record(rec: dict[str, Any]) -> Order:
    """An `Order` from a journal `order_received` record (fields as market/journal_recorder.py writes them)."""
    return Order(
        order_id=rec["order_id"], created_s=float(rec["created_s"]), customer_id=rec["customer_id"],
        tier=Tier(rec["tier"]), channel=rec["channel"], items=tuple(Item(s, int(q)) for s, q in rec["items"]),
        lat=float(rec["lat"]), lon=float(rec["lon"]), promise_s=float(rec["promise_s"]), value=float(rec["value"]),
        category=Category(rec["category"]), locker_ok=bool(rec["locker_ok"]), reserve=float(rec["reserve"]),
    )


def orders_from_journal(path: str | Path) -> list[Order]:
    """The order stream of a journaled run: each `order_received` once, by creation time."""
    from market.journal import read_journal

    seen: dict[str, Order] = {}
    for rec in read_journal(path):
        if rec.get("type") == "order_received" and rec["order_id"] not in seen:
            seen[rec["order_id"]] = _order_from_record(rec)
    return sorted(seen.values(), key=lambda o: (o.created_s, o.order_id))


def base_policy(others: str, payment: str) -> NetworkPolicy:
    """The network policy the other bidders follow (and the mechanism that clears).

    `exact` is the reference: cost quotes cleared by the exact min-cost assignment.
    """
    if others == "exact":
        return NetworkPolicy("exact", CostPricing(), ScoringAuction(payment=payment, method="exact"))  # type: ignore[arg-type]
    if others not in OTHERS:
        raise ValueError(f"unknown policy for the other bidders '{others}' (known: {', '.join(OTHERS)})")
    return make_policy(others, payment)  # type: ignore[arg-type]


class FulfilmentAuctionEnv(gym.Env[np.ndarray, np.ndarray]):
    """One bidder (a rider pool by default) learns to price its capacity in the real auction.

    Every other bidder follows a configured policy (the heuristic by default), and the
    rounds clear with that policy's mechanism. An episode is one simulated day of the
    scenario; `n_orders` shortens the day (same arrival profile, fewer orders).

    ## Action Space

    `Box(-1, 1, (2,), float32)` (or `(1,)` with `holdback=False`), mapped by
    `policies.rl.decode_action`:

    | index | meaning | range after mapping |
    |---|---|---|
    | 0 | markup on own cost: price = cost x markup | 1.0 .. 3.0 (linear, 0 -> 2.0) |
    | 1 | share of capacity kept back for VIP orders | 0.0 .. 0.5 |

    ## Observation Space

    `Box(OBS_LOW, OBS_HIGH, (10,), float32)`, built by `policies.rl.encode_obs` from the
    `BidContext` the bidder is shown, so live inference sees exactly the same thing:
    own load, time of day (sin, cos), round size / 64, round VIP share, own recent win
    rate, own reliability estimate, the competitor load index (share of the round's
    orders that are retries: orders nobody could take before), own recent clearing
    price (EWMA of payment per award / 20) and own capacity / 500.

    ## Rewards

    Per step, for the round the action priced (the rounds traded on the way to the
    learner's next bid earn it nothing), times `reward_scale`:

    - `profit`: the learner's payments - its costs (price / markup) - a lateness
      penalty (the profile's, times its VIP multiplier) for each of its awards
      delivered after the promise.
    - `network`: the learner's marginal saving to the network (a difference reward):
      for each order it won, the best score that order could have had without it (or
      the profile's penalty for leaving it unserved) minus the score it won with.
      Scores are the profile's money-valued cost (price, value of time, expected
      lateness, reliability). The fleet's realised cost, -(what the retailer pays for
      every award + the lateness penalty of every late delivery + the unfulfilled
      penalty of every order that ends unserved), is what evaluation compares; it is
      not the per-step signal because the learner's own share of it is drowned in the
      fleet's noise and it would pay the learner to cut steps short
      (policies/pretrained/README.md).

    ## Starting State

    A fresh fleet and order stream drawn from `np_random` (or `options["sim_seed"]`);
    the day runs up to the learner's first bid.

    ## Episode End

    Terminated when the day is over (every order awarded or given up). Never truncated
    by the env itself. The final `info` holds the day's KPIs and reward totals.

    ## Arguments

    `scenario`, `n_orders`, `fleet` (name or path; default the scenario's), `kind` of
    the learner, `learner_id` (default the largest bidder of that kind), `reward`,
    `others` (`heuristic`, `truthful`, `static` or `exact`), `holdback`, `peers` (a
    strategy or `rl:PATH` for the learner's kind: self-play), `journal` (draw the
    order stream from a journal's `order_received` records instead), `reward_scale`,
    `exact_every` (rounds between exact-assignment comparisons for the
    `efficiency_vs_exact` KPI: 0, the default, skips them, since training never reads
    the KPI and each costs about 2 ms; None uses the scenario's, as evaluation does).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        scenario: str | ScenarioCfg = "peak",
        n_orders: int | None = None,
        fleet: str | FleetCfg | None = None,
        kind: str | Kind = Kind.RIDER_POOL,
        learner_id: str | None = None,
        reward: RewardMode = "profit",
        others: str = "heuristic",
        holdback: bool = True,
        peers: str | BiddingStrategy | None = None,
        journal: str | Path | None = None,
        reward_scale: float | None = None,
        profile: str | ProfileCfg | None = None,
        exact_every: int | None = 0,
    ) -> None:
        if reward not in DEFAULT_REWARD_SCALE:
            raise ValueError(f"unknown reward mode '{reward}' (known: profit, network)")
        self.scenario = load_scenario(scenario) if isinstance(scenario, str) else scenario
        self.fleet_cfg = fleet if isinstance(fleet, FleetCfg) else load_fleet(fleet or self.scenario.fleet)
        self.profile = profile if isinstance(profile, ProfileCfg) else load_profile(profile or self.scenario.profile)
        self.kind = Kind(kind)
        self.learner_id = learner_id or self._largest_of_kind(self.kind)
        self.reward_mode: RewardMode = reward
        self.reward_scale = DEFAULT_REWARD_SCALE[reward] if reward_scale is None else float(reward_scale)
        self.others = base_policy(others, self.scenario.payment)
        self.peers = RLPolicy(peers[3:]) if isinstance(peers, str) and peers.startswith("rl:") else peers
        if isinstance(self.peers, str):
            raise ValueError("peers must be a bidding strategy or rl:PATH")
        self.trace = orders_from_journal(journal) if journal else None
        self.n_orders = n_orders
        self.holdback = holdback
        self.exact_every = exact_every

        self.observation_space = spaces.Box(OBS_LOW, OBS_HIGH, dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(action_dim(holdback),), dtype=np.float32)

        self._slot = _LearnerSlot()
        self._policy = NetworkPolicy(
            f"{self.others.name}+learner",
            _Dispatch(self.learner_id, self._slot, self.kind, self.peers, self.others.strategy),
            self.others.mechanism,
        )
        self.sim: Simulator | None = None
        self._gen: Iterator[PendingRound] | None = None
        self._pending: PendingRound | None = None
        self._learner: Agent | None = None
        self._obs = _NO_BID_OBS.copy()
        self._done = True
        self._totals: dict[str, float] = {}
        self.context: BidContext | None = None  # what the learner is shown for the pending round

    def _largest_of_kind(self, kind: Kind) -> str:
        agents = [a for a in build_fleet(self.fleet_cfg).agents if a.kind == kind]
        if not agents:
            raise ValueError(f"the fleet has no bidder of kind '{kind.value}'")
        return max(agents, key=lambda a: a.capacity_total()).agent_id

    # -- Gymnasium API ---------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Starts a new day; every random number comes from `np_random` (or `options['sim_seed']`)."""
        super().reset(seed=seed)
        options = options or {}
        sim_seed = int(options["sim_seed"]) if "sim_seed" in options else int(self.np_random.integers(0, TRAIN_SEEDS))
        n = 1 if self.trace is not None else self.n_orders
        setup = SimSetup(self.scenario, self.fleet_cfg, self.profile, self._policy, seed=sim_seed, n_orders=n,
                         exact_every=self.exact_every)
        self.sim = Simulator(setup)
        if self.trace is not None:
            self.sim.orders = self.trace[: self.n_orders] if self.n_orders else list(self.trace)
        self._learner = self.sim.fleet.by_id()[self.learner_id]
        self._gen = self.sim.rounds()
        self._pending = None
        self._done = False
        self._totals = {"profit": 0.0, "bids": 0}
        self._obs, self.context = _NO_BID_OBS.copy(), None  # what a day the learner never bids in shows
        self._run_to_next_bid()
        return self._obs.copy(), {"sim_seed": sim_seed, "learner_id": self.learner_id}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Bids `action` in the pending round, then runs the day to the learner's next bid."""
        if self._done:
            return self._obs.copy(), 0.0, True, False, self._final_info()
        self._slot.decision = decode_action(action).clipped()
        self._slot.decided = False
        raw = self._run_to_next_bid()
        info = self._final_info() if self._done else {}
        return self._obs.copy(), float(raw * self.reward_scale), self._done, False, info

    # -- the day, step-wise -----------------------------------------------------------
    def _run_to_next_bid(self) -> float:
        """Resumes the day round by round until the learner bids again (or the day ends).

        Returns the unscaled reward of the rounds traded on the way.
        """
        assert self._gen is not None and self._learner is not None
        reward = 0.0
        while True:
            nxt = next(self._gen, None)
            if self._pending is not None:
                reward += self._account(self._pending)
            self._pending = nxt
            if nxt is None:
                self._done = True
                return reward
            ctx = self._learner.bid_context(nxt.rnd, nxt.rnd.opened_s)
            if ctx is not None:
                self.context = ctx
                self._obs = encode_obs(ctx)
                return reward

    def _account(self, pending: PendingRound) -> float:
        """Adds a traded round to the totals; returns its reward in the env's mode.

        Only the round the learner bid in earns a reward, so the others cost nothing here.
        """
        if not self._slot.decided:
            return 0.0
        self._slot.decided = False
        profit = self._learner_profit(pending)
        self._totals["profit"] += profit
        self._totals["bids"] += 1
        return profit if self.reward_mode == "profit" else self._network_contribution(pending)

    def _late_penalty(self, rnd: Any, orders: np.ndarray, delivered: dict[int, float]) -> np.ndarray:
        """The profile's lateness penalty for each given awarded order delivered after its promise."""
        p = self.profile
        late = np.array([delivered.get(o, 0.0) > rnd.promise_s[o] for o in orders.tolist()], dtype=bool)
        weight = np.where(rnd.vip[orders], p.lateness_penalty * p.vip_lateness_multiplier, p.lateness_penalty)
        return late * weight

    def _awards(self, pending: PendingRound) -> tuple[RoundOutcome, int, np.ndarray, np.ndarray] | None:
        """The round's outcome, the learner's bidder index, awarded orders and their combinations.

        None when the learner did not quote or nothing was awarded.
        """
        out = pending.outcome
        assert out is not None
        try:
            me = out.book.bidder_ids.index(self.learner_id)
        except ValueError:
            return None
        won = np.flatnonzero(out.alloc.winner >= 0)
        if len(won) == 0:
            return None
        return out, me, won, out.alloc.winner[won]

    def _learner_profit(self, pending: PendingRound) -> float:
        """Payments - costs - lateness penalties of the learner's awards in one round."""
        found = self._awards(pending)
        if found is None:
            return 0.0
        out, me, won, w = found
        alloc, c = out.alloc, out.book.combos
        if self.kind == Kind.WAREHOUSE:
            mine = c.src[w] == me
            pay, price = alloc.src_payment[won[mine]], c.src_price[w[mine]]
        else:
            mine = c.leg[w] == me
            pay, price = alloc.leg_payment[won[mine]], c.leg_price[w[mine]]
        if not mine.any():
            return 0.0
        cost = price / self._slot.decision.markup
        late = self._late_penalty(out.rnd, won[mine], out.delivered_s)
        return float((pay - cost - late).sum())

    def _network_contribution(self, pending: PendingRound) -> float:
        """The learner's marginal saving to the network in one round (a difference reward).

        For each order it won: the best score the order could have had without the
        learner (the best feasible combination not using it, else the penalty of
        leaving it unserved) minus the score it won with. Scores are the profile's
        money-valued network cost (price + value of time + expected lateness +
        reliability), so cheaper, faster and VIP-saving wins earn more.
        """
        found = self._awards(pending)
        if found is None:
            return 0.0
        out, me, won, w = found
        book, alloc, c = out.book, out.alloc, out.book.combos
        mine = (c.leg[w] == me) | (c.src[w] == me)
        if not mine.any():
            return 0.0
        without = c.feasible & (c.leg != me) & (c.src != me)
        alt = book.penalty.astype(np.float64)
        np.minimum.at(alt, c.order[without], c.score[without])
        return float((alt[won[mine]] - c.score[w[mine]]).sum())

    def _day_network_reward(self) -> float:
        """-(payments + lateness penalties + unfulfilled penalties) over the fleet's whole day.

        Read from the day's KPI counters, which already count every term (at the end
        of the day every order not fulfilled was given up), instead of summing each
        round's awards as they are traded: that per-round sum cost ~2% of a step.
        """
        assert self.sim is not None
        k, p = self.sim.engine.kpis, self.profile
        late_vip = k.vip_fulfilled - k.vip_on_time
        late_regular = k.fulfilled - k.on_time - late_vip
        unserved_vip = k.vip_orders - k.vip_fulfilled
        unserved_regular = k.orders - k.fulfilled - unserved_vip
        late = p.lateness_penalty * (late_regular + p.vip_lateness_multiplier * late_vip)
        unserved = p.unfulfilled_penalty * unserved_regular + p.vip_unfulfilled_penalty * unserved_vip
        return -(k.paid + late + unserved)

    def _final_info(self) -> dict[str, Any]:
        """The day's KPIs (no wall-clock fields) and the episode's reward totals (unscaled)."""
        assert self.sim is not None
        return {
            "kpis": self.sim.report(timing=False),
            "learner_profit": self._totals["profit"],
            "network_reward": self._day_network_reward(),
            "learner_bids": self._totals["bids"],
            "learner_id": self.learner_id,
        }

    def close(self) -> None:
        """Drops the simulator (the generator is closed with it)."""
        if self._gen is not None:
            self._gen.close()
        self._gen = self.sim = self._pending = None
        self._done = True
