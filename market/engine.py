"""One round, end to end: quote, clear, realise, commit. Shared by every shell.

`Bidders` is the only seam: in-process agents here, Ray actors in the runtime. The
engine itself never changes per shell, which is what keeps awards identical.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from agents.base import Agent
from agents.fleet import Fleet
from market.book import CategoryTable, QuoteBook
from market.clearing import Allocation, clear_round, exact_winners, total_cost
from market.config import ProfileCfg
from market.kpis import KpiTracker
from market.recorder import NullRecorder, Recorder
from market.round import Round, build_round
from market.types import AwardLine, Kind, Order, Quote
from market.world import realise
from policies.base import BiddingStrategy
from policies.registry import NetworkPolicy


COMMIT_REFUSED = "commit_refused"


class Bidders(Protocol):
    """How the engine reaches the bidders: ask for quotes, then commit or release holds.

    `settle` may return the indices (in the round) of awarded orders whose commit a
    winner refused or never confirmed (a lost hold, a dead bidder); the engine then
    treats them as unserved with reason `commit_refused`, so they are retried and never
    counted as awarded. Returning None means every commit went through. A bidders
    object may also offer `utilization(now) -> list[(Kind, float)]` when the agents'
    live state is not in this process (the Ray runtime).
    """

    def quote_all(self, rnd: Round, now: float, hold_ttl_s: float) -> list[Quote]: ...
    def settle(
        self, round_id: int, awards: dict[str, list[AwardLine]], quoted: list[str], now: float
    ) -> Collection[int] | None: ...


@dataclass(frozen=True)
class Refusal:
    """Why a round's awards did not all take, where the bidders can tell (Ray runtime).

    Attributes:
        refused_by: the winners that refused their commit or never confirmed it.
        cancelled: per winner that had committed its side of a refused order, the
            order indices whose line it was told to cancel.
    """

    refused_by: list[str]
    cancelled: dict[str, list[int]]


class LocalBidders:
    """The fleet's agents called in-process, in fleet order."""

    def __init__(self, agents: list[Agent], strategy: BiddingStrategy) -> None:
        self.agents = agents
        self.by_id = {a.agent_id: a for a in agents}
        self.strategy = strategy

    def quote_all(self, rnd: Round, now: float, hold_ttl_s: float) -> list[Quote]:
        """Every agent's quote for the round (agents with nothing to offer are skipped)."""
        quotes = (a.quote(rnd, now, self.strategy, hold_ttl_s) for a in self.agents)
        return [q for q in quotes if q is not None]

    def settle(self, round_id: int, awards: dict[str, list[AwardLine]], quoted: list[str], now: float) -> None:
        """Winners commit their awards; every other quoting bidder releases its hold."""
        for agent_id in quoted:
            lines = awards.get(agent_id)
            if lines:
                self.by_id[agent_id].commit(round_id, lines, now)
            else:
                self.by_id[agent_id].release(round_id, now)


@dataclass
class RoundOutcome:
    """What happened to each order of a round."""

    rnd: Round
    book: QuoteBook
    alloc: Allocation
    clear_ms: float
    delivered_s: dict[int, float] = field(default_factory=dict)
    award_facts: list[tuple[int, tuple[bool, float, bool, Kind]]] = field(default_factory=list)  # counted on confirm


@dataclass
class MarketEngine:
    """Clears rounds against a fleet under a policy and a profile."""

    fleet: Fleet
    policy: NetworkPolicy
    profile: ProfileCfg
    bidders: Bidders
    seed: int = 0
    hold_ttl_s: float = 5.0
    recorder: Recorder = field(default_factory=NullRecorder)
    kpis: KpiTracker = field(default_factory=KpiTracker)
    timer: Callable[[], float] = time.perf_counter
    exact_every: int = 0
    _round_id: int = 0

    def __post_init__(self) -> None:
        self.world_rng = np.random.default_rng([self.seed, 2])
        self.kinds = self.fleet.kinds
        self.categories = CategoryTable.from_masks({a.agent_id: a.category_ok for a in self.fleet.agents})
        self.truth = {a.agent_id: a.cfg for a in self.fleet.agents}
        self.sku_index = self.fleet.env.catalogue.index
        self.sources = self.fleet.sources

    def open_round(self, orders: list[Order], now: float, attempts: list[int]) -> Round:
        """Builds the next round and journals it before any bidder sees it."""
        self._round_id += 1
        rnd = build_round(self._round_id, now, orders, self.sources, self.fleet.env.grid, self.sku_index)
        self.recorder.round_opened(rnd, attempts)
        return rnd

    def clear(self, rnd: Round, quotes: list[Quote]) -> tuple[QuoteBook, Allocation, float]:
        """Scores combinations and runs the mechanism; returns the clearing time in ms."""
        start = self.timer()
        book, alloc = clear_round(rnd, quotes, self.kinds, self.profile, self.categories, self.policy.mechanism)
        return book, alloc, (self.timer() - start) * 1000.0

    def run_round(self, orders: list[Order], now: float, attempts: list[int]) -> RoundOutcome:
        """Quote, clear, journal, realise and commit one round."""
        return self.trade(self.open_round(orders, now, attempts), now)

    def trade(self, rnd: Round, now: float) -> RoundOutcome:
        """Quote, clear, journal, realise and commit a round already opened.

        Split from `run_round` so a step-wise driver (the Gymnasium env) can look at the
        opened round before the bidders are asked.
        """
        quotes = self.bidders.quote_all(rnd, now, self.hold_ttl_s)
        outcome, awards = self.close_round(rnd, quotes)
        quoted = [q.agent_id for q in quotes]
        refused = self.bidders.settle(rnd.round_id, awards, quoted, now)
        self.confirm(outcome, awards, quoted, refused or (), now)
        return outcome

    def close_round(self, rnd: Round, quotes: list[Quote]) -> tuple[RoundOutcome, dict[str, list[AwardLine]]]:
        """Clears a round on its quotes, journals it and realises its awards (not yet committed).

        Split from `run_round` so a pipelined shell can settle and confirm later.
        """
        book, alloc, ms = self.clear(rnd, quotes)
        self.kpis.cleared(ms)
        if self.exact_every and rnd.round_id % self.exact_every == 0:
            self.kpis.compared(alloc.total_cost, total_cost(book, exact_winners(book)))
        facts = {"clear_ms": ms, "bidders": len(self.fleet.agents), **self._bidder_facts(rnd.round_id)}
        self.recorder.round_cleared(rnd, quotes, book, alloc, facts)
        outcome = RoundOutcome(rnd, book, alloc, ms)
        return outcome, self._award_lines(outcome)

    def _bidder_facts(self, round_id: int) -> dict[str, int]:
        """Who was asked and who missed the deadline, where the bidders keep such facts (Ray)."""
        facts = getattr(self.bidders, "round_facts", None)
        return facts(round_id) if facts is not None else {}

    def confirm(
        self, out: RoundOutcome, awards: dict[str, list[AwardLine]], quoted: list[str],
        refused: Collection[int], now: float,
    ) -> None:
        """Counts the awards that were committed; refused ones become unserved (`commit_refused`)."""
        refused = set(refused)
        if refused:  # a new allocation: the journal may not have written the cleared one yet
            winner, reason = out.alloc.winner.copy(), list(out.alloc.reason)
            for o in refused:
                winner[o] = -1
                reason[o] = COMMIT_REFUSED
                out.delivered_s.pop(o, None)
            out.alloc = replace(out.alloc, winner=winner, reason=tuple(reason))
        for o, facts in out.award_facts:
            if o not in refused:
                self.kpis.awarded(*facts)
        refused_ids = sorted(out.rnd.orders[o].order_id for o in refused)
        self._journal_holds(out.rnd.round_id, awards, quoted, refused_ids, now)

    def _journal_holds(self, round_id: int, awards: dict[str, list[AwardLine]], quoted: list[str],
                       refused: list[str], now: float) -> None:
        """Every bidder that quoted either commits its awards or releases its holds; awards
        whose commit was refused are journaled as such, never as committed."""
        committed: dict[str, list[str]] = {}
        released: list[str] = []
        gone = set(refused)
        for agent_id in quoted:
            lines = awards.get(agent_id)
            if not lines:
                released.append(agent_id)
                continue
            took = [ln.order_id for ln in lines if ln.order_id not in gone]
            if took:
                committed[agent_id] = took
        if committed or released or refused:
            self.recorder.holds_settled(round_id, committed, released, now, refused, **self._refusal(round_id, awards))

    def _refusal(self, round_id: int, awards: dict[str, list[AwardLine]]) -> dict[str, Any]:
        """Who refused and whose lines were cancelled, where the bidders keep such facts (Ray)."""
        ask = getattr(self.bidders, "refusal", None)
        why: Refusal | None = ask(round_id) if ask is not None else None
        if why is None:
            return {}
        order_ids = {ln.order_idx: ln.order_id for lines in awards.values() for ln in lines}
        return {"refused_by": {aid: sorted(ln.order_id for ln in awards.get(aid, ())) for aid in why.refused_by},
                "cancelled": {aid: sorted(order_ids[o] for o in idx) for aid, idx in why.cancelled.items()}}

    def _award_lines(self, out: RoundOutcome) -> dict[str, list[AwardLine]]:
        """Realises each award in the world and builds the lines each winner commits."""
        rnd, book, alloc = out.rnd, out.book, out.alloc
        won = np.flatnonzero(alloc.winner >= 0)
        if len(won) == 0:  # most rounds of a busy day; realising nothing would draw nothing
            return {}
        c, w = book.combos, alloc.winner[won]
        src_ids = [book.bidder_ids[i] for i in c.src[w].tolist()]
        leg_ids = [book.bidder_ids[i] for i in c.leg[w].tolist()]
        leg_kinds = [self.kinds[i] for i in leg_ids]
        real = realise(
            c.ready_s[w], c.pickup_s[w], c.delivery_s[w] - np.maximum(c.ready_s[w], c.pickup_s[w]),
            np.array([self.truth[i].reliability for i in src_ids]),
            np.array([self.truth[i].reliability for i in leg_ids]),
            leg_kinds,
            np.array([getattr(self.truth[i], "collect_mean_h", 0.0) * 3600.0 for i in leg_ids]),
            self.world_rng,
        )
        site = {sid: k for k, sid in enumerate(rnd.sources.ids)}
        awards: dict[str, list[AwardLine]] = {}
        for k, o in enumerate(won.tolist()):
            order, combo = rnd.orders[o], int(w[k])
            s = site[src_ids[k]]
            common = dict(
                round_id=rnd.round_id, order_id=order.order_id, order_idx=o, source_id=src_ids[k], leg_id=leg_ids[k],
                ready_s=float(c.ready_s[combo]), pickup_s=float(c.pickup_s[combo]), delivery_s=float(c.delivery_s[combo]),
                source_x=float(rnd.sources.x[s]), source_y=float(rnd.sources.y[s]),
                dest_x=float(rnd.x[o]), dest_y=float(rnd.y[o]), units=int(rnd.units[o]),
            )
            awards.setdefault(src_ids[k], []).append(AwardLine(
                price=float(c.src_price[combo]), payment=float(alloc.src_payment[o]),
                done_s=float(real.ready_s[k]), on_time=bool(real.src_on_time[k]), **common))
            awards.setdefault(leg_ids[k], []).append(AwardLine(
                price=float(c.leg_price[combo]), payment=float(alloc.leg_payment[o]),
                done_s=float(real.leg_done_s[k]), on_time=bool(real.leg_on_time[k]), **common))
            delivered = float(real.delivered_s[k])
            out.delivered_s[o] = delivered
            out.award_facts.append((o, (bool(rnd.vip[o]), float(alloc.src_payment[o] + alloc.leg_payment[o]),
                                        delivered <= order.promise_s, leg_kinds[k])))
        return awards

    def utilization(self, now: float) -> list[tuple[Kind, float]]:
        """Per-agent utilization up to `now` (from the bidders when they hold the live state)."""
        remote = getattr(self.bidders, "utilization", None)
        if remote is not None:
            return remote(now)
        return [(a.kind, a.utilization(now)) for a in self.fleet.agents]

