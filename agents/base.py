"""The shared shape of every resource agent: quote a round, hold, commit, release.

Subclasses supply the physics (costs, times, capacity); this class owns the protocol,
so hold and commit rules cannot drift between resource kinds.
"""
from __future__ import annotations

import heapq
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from agents.holds import HoldBook, HoldError
from market.catalogue import Catalogue
from market.config import AgentCfg
from market.geo import CityGrid
from market.round import Round
from market.types import CATEGORY_CODES, AwardLine, Kind, Quote
from policies.base import BidContext, BiddingStrategy, BidDecision

RELIABILITY_ALPHA = 0.02  # EWMA weight of one delivery in the reliability estimate
WIN_RATE_ALPHA = 0.05
PRICE_ALPHA = 0.05  # EWMA weight of one award in the recent clearing price
RETRY_AGE_S = 30.0  # an order older than this when its round opens is a retry: nobody could take it


@dataclass(frozen=True)
class AgentEnv:
    """What every agent needs from the market around it."""

    grid: CityGrid
    catalogue: Catalogue
    seed: int = 0


def agent_seed(seed: int, agent_id: str) -> list[int]:
    """A per-agent RNG seed that does not depend on Python's salted hash."""
    return [seed, zlib.crc32(agent_id.encode())]


def nearest_pairs(
    rnd: Round, sources: np.ndarray, orders: np.ndarray, k: int, dist: Callable[[], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest sources able to handle each order's category.

    Args:
        dist: returns the [len(sources), len(orders)] distances used to rank sources.
            It is called only when more than k sources compete: with a fleet's handful
            of warehouses there is nothing to rank, and the distances cost a round's
            quote several NumPy calls.

    Returns:
        Flattened (source index, order index) pairs, sources-major.
    """
    able = rnd.sources.can_handle(rnd.category[orders])[sources]
    if len(sources) > k:
        keep = np.argpartition(np.where(able, dist(), np.inf), k - 1, axis=0)[:k]
        keep.sort(axis=0)
        s_idx, o_idx = sources[keep], np.broadcast_to(orders, keep.shape)
        ok = np.take_along_axis(able, keep, axis=0)
        return s_idx[ok], o_idx[ok]
    rows, cols = able.nonzero()  # row-major, the order a meshgrid mask gives, ~10x cheaper
    return sources[rows], orders[cols]


class Agent(ABC):
    """A fulfilment resource that bids in rounds from its own live state."""

    kind: ClassVar[Kind]
    #: Where a bidder host's snapshot store (`agents.durable`) has the agent record each
    #: change to its pending completions: a job added (its heap entry), a committed line
    #: booked to it (``((round, order index), seq)``) or a job finished (its seq). None,
    #: and so free, everywhere else.
    completion_log: list[Any] | None = None
    #: Attributes that only cache what the rest of the state gives: a snapshot leaves them
    #: out (`agents.durable`), and a restored agent starts them empty (None).
    CACHES: ClassVar[tuple[str, ...]] = ("_peeked",)

    def __init__(self, cfg: AgentCfg, env: AgentEnv) -> None:
        self.cfg = cfg
        self.agent_id = cfg.id
        self.env = env
        self.category_ok = np.zeros(len(CATEGORY_CODES), dtype=bool)
        self.category_ok[[CATEGORY_CODES[c] for c in cfg.categories]] = True
        self.reliability = float(cfg.reliability)
        self.win_rate = 0.5
        self.recent_price = 0.0  # EWMA of what this agent was paid per award line
        self.holds = HoldBook()
        self.now_s = 0.0
        self.rng = np.random.default_rng(agent_seed(env.seed, cfg.id))
        self._completions: list[tuple[float, int, Any]] = []
        self._completion_seq = 0
        #: (round, order index) -> seq of the completion its committed line scheduled,
        #: so a line can be cancelled (`cancel`); pruned to the pending jobs as it grows.
        self._booked: dict[tuple[int, int], int] = {}
        self.committed_units = 0
        self.holds_expired = 0
        self._peeked: tuple[Round, float, tuple[BidContext, np.ndarray] | None] | None = None

    # -- capacity -------------------------------------------------------------------
    @abstractmethod
    def capacity_total(self) -> int:
        """Nominal capacity (riders, compartments, picks in the queue window...)."""

    @abstractmethod
    def capacity_free(self) -> int:
        """Capacity not committed, before holds."""

    def available(self) -> int:
        """Capacity a new round may hold: free minus what open rounds hold."""
        return max(0, self.capacity_free() - self.holds.units)

    @abstractmethod
    def utilization(self, now: float) -> float:
        """Time-averaged share of capacity in use since the start."""

    # -- time -----------------------------------------------------------------------
    def advance(self, now: float) -> None:
        """Brings live state up to `now`: expired holds, finished jobs, refills."""
        for hold in self.holds.expire(now):
            self.holds_expired += 1
            self._on_release(hold.payload)
        while self._completions and self._completions[0][0] <= now:
            done_s, seq, payload = heapq.heappop(self._completions)
            if self.completion_log is not None:
                self.completion_log.append(seq)
            self._on_complete(done_s, payload)
        self._advance(now)
        self.now_s = max(self.now_s, now)

    def _advance(self, now: float) -> None:
        """Kind-specific dynamics; default none."""

    def schedule_completion(self, done_s: float, payload: Any) -> None:
        """Registers when a committed job frees its capacity (called by the world)."""
        self._completion_seq += 1
        entry = (done_s, self._completion_seq, payload)
        heapq.heappush(self._completions, entry)
        if self.completion_log is not None:
            self.completion_log.append(entry)

    def _on_complete(self, done_s: float, payload: Any) -> None:
        """Frees capacity of a finished job; default nothing."""

    def record_outcome(self, on_time: bool) -> None:
        """Updates the reliability estimate the agent quotes with."""
        self.reliability += RELIABILITY_ALPHA * (float(on_time) - self.reliability)

    # -- the bidding protocol ---------------------------------------------------------
    def context(self, rnd: Round, now: float, available: int) -> BidContext:
        """The strategy's view of this agent and round."""
        total = max(1, self.capacity_total())
        return BidContext(
            kind=self.kind,
            agent_id=self.agent_id,
            now_s=now,
            hour_of_day=(now / 3600.0) % 24.0,
            load=min(1.0, max(0.0, 1.0 - available / total)),
            available=available,
            capacity_total=total,
            round_size=rnd.size,
            round_vip_share=rnd.vip_share,
            win_rate=self.win_rate,
            reliability=self.reliability,
            market_load=int(np.count_nonzero(rnd.created_s < now - RETRY_AGE_S)) / max(1, rnd.size),
            recent_price=self.recent_price,
        )

    def bid_context(self, rnd: Round, now: float) -> BidContext | None:
        """What the strategy will be shown for this round, or None when the agent sits it out.

        `quote` goes through the same steps; a step-wise driver (the Gymnasium env) may
        call this first to learn whether, and in what state, the agent will bid. It only
        brings the agent's state up to `now`, which `quote` does anyway, so calling it
        changes nothing. The answer is kept for the `quote` of the same round that
        follows, so the driver's look costs the round nothing extra.
        """
        ready = self._prepare(rnd, now)
        self._peeked = (rnd, now, ready)
        return None if ready is None else ready[0]

    def _prepared(self, rnd: Round, now: float) -> tuple[BidContext, np.ndarray] | None:
        """`_prepare` for this round, reusing the answer `bid_context` just gave for it."""
        peeked, self._peeked = self._peeked, None
        if peeked is not None and peeked[0] is rnd and peeked[1] == now:
            return peeked[2]
        return self._prepare(rnd, now)

    def _prepare(self, rnd: Round, now: float) -> tuple[BidContext, np.ndarray] | None:
        """Brings state up to `now`; the strategy's context and the reachable orders, or None."""
        self.advance(now)
        avail = self.available()
        if avail <= 0 or rnd.size == 0:
            return None
        reach = self.category_ok[rnd.category] & self._reach(rnd)
        if not np.count_nonzero(reach):  # a quarter of the cost of reach.any() on a round's few orders
            return None
        return self.context(rnd, now, avail), reach

    def quote(self, rnd: Round, now: float, strategy: BiddingStrategy, hold_ttl_s: float) -> Quote | None:
        """Prices the round, holds the capacity offered, and returns the quote (or None).

        Raises:
            HoldError: The round was quoted already. Refused before pricing, which takes
                stock (a warehouse's held stock) that only the round's one hold gives back.
        """
        if rnd.round_id in self.holds:
            self._peeked = None
            raise HoldError(f"round {rnd.round_id} already holds capacity")
        # A bidder shared by regions sees each region's market clock; its own time never
        # goes back, so a job another region's later round freed it from is not sold twice.
        now = max(now, self.now_s)
        ready = self._prepared(rnd, now)
        if ready is None:
            return None
        ctx, reach = ready
        avail = ctx.available
        decision = strategy.decide(ctx).clipped()
        eligible = self._after_holdback(rnd, reach, avail, decision)
        quote, payload = (None, None)
        if np.count_nonzero(eligible):
            quote, payload = self._price(rnd, now, eligible, decision.markup)
        if quote is None or len(quote.order_idx) == 0:
            self._on_release(payload)
            return None
        quote.capacity = min(avail, int(np.count_nonzero(np.bincount(quote.order_idx, minlength=rnd.size))))
        self.holds.place(rnd.round_id, quote.capacity, now, hold_ttl_s, payload)
        return quote

    def _reach(self, rnd: Round) -> np.ndarray:
        """Orders this agent can physically serve (area, consent, size); default all."""
        return np.ones(rnd.size, dtype=bool)

    def _after_holdback(self, rnd: Round, reach: np.ndarray, avail: int, decision: BidDecision) -> np.ndarray:
        """When only the VIP reserve is left, only VIP orders are quoted."""
        if avail <= int(decision.holdback * self.capacity_total()):
            return reach & rnd.vip
        return reach

    @abstractmethod
    def _price(self, rnd: Round, now: float, eligible: np.ndarray, markup: float) -> tuple[Quote | None, Any]:
        """Kind-specific quote for the eligible orders, plus the hold payload."""

    def commit(self, round_id: int, lines: list[AwardLine], now: float) -> None:
        """Turns the round's hold into committed work; refuses awards beyond the hold."""
        self._peeked = None
        self.advance(now)
        hold = self.holds.take(round_id, len(lines), now)
        self._on_release(hold.payload)
        for line in lines:
            self._commit_line(line, now, hold.payload)
            self.book((round_id, line.order_idx), self._completion_seq)
        self.committed_units += len(lines)
        if len(self._booked) > 2 * len(self._completions) + 64:
            self._prune_booked()
        for line in lines:
            self.recent_price += PRICE_ALPHA * (line.payment - self.recent_price)
        self._update_win_rate(len(lines) / max(1, hold.units))

    def book(self, line: tuple[int, int], seq: int) -> None:
        """Notes that the committed line (round, order index) scheduled job `seq`, so `cancel`
        can find it. A bidder's store logs the booking beside the job instead of pickling
        the whole map at every save (`agents.durable`)."""
        self._booked[line] = seq
        if self.completion_log is not None:
            self.completion_log.append((line, seq))

    def _update_win_rate(self, won_share: float) -> None:
        self.win_rate += WIN_RATE_ALPHA * (won_share - self.win_rate)

    @abstractmethod
    def _commit_line(self, line: AwardLine, now: float, payload: Any) -> None:
        """Applies one award to live state and schedules exactly one completion for it."""

    def cancel(self, round_id: int, order_idxs: Iterable[int], now: float) -> int:
        """Undoes committed lines of a round whose order the market gave up; returns how many.

        An order needs both its source and its leg: when one side refuses its commit, the
        order goes back to the queue and the side that did commit is told to cancel, so its
        capacity (and a warehouse's stock) is free again at once instead of at the job's
        end. A line already cancelled, already finished or never committed is skipped, so
        a cancel sent twice changes nothing the second time.
        """
        self._peeked = None
        self.advance(now)
        seqs = {self._booked.pop((round_id, o), -1) for o in order_idxs}
        gone = [job for job in self._completions if job[1] in seqs]
        if not gone:
            return 0
        self._completions = [job for job in self._completions if job[1] not in seqs]
        heapq.heapify(self._completions)
        for _, seq, payload in gone:
            if self.completion_log is not None:
                self.completion_log.append(seq)
            self._uncommit(payload, now)
        self.committed_units -= len(gone)
        return len(gone)

    @abstractmethod
    def _uncommit(self, payload: Any, now: float) -> None:
        """Frees what one committed line took (its completion's payload says what)."""

    def _prune_booked(self) -> None:
        """Forgets lines whose job has ended: only pending ones can be cancelled."""
        pending = {job[1] for job in self._completions}
        self._booked = {key: seq for key, seq in self._booked.items() if seq in pending}

    def release(self, round_id: int, now: float) -> None:
        """Drops the round's hold without an award."""
        self._peeked = None
        hold = self.holds.release(round_id)
        if hold is not None:
            self._on_release(hold.payload)
            self._update_win_rate(0.0)

    def _on_release(self, payload: Any) -> None:
        """Frees a hold's payload (stock for warehouses); default nothing."""

    def forget_rounds(self) -> int:
        """Drops what only an earlier run's rounds meant: their holds (a warehouse's held
        stock freed) and the bookings a cancel of their lines would look up; returns the
        units that were held.

        A service restarted on this agent's state (`agents.actor`, carried snapshots)
        numbers its rounds from the start again and can no longer commit or cancel an
        earlier round, so keeping either would only let a new round hit an old entry.
        The committed work itself stays: it is what the resource is still doing.
        """
        held = self.holds.units
        for hold in self.holds.release_all():
            self._on_release(hold.payload)
        self._booked = {}
        self._peeked = None
        return held


__all__ = ["Agent", "AgentEnv", "HoldError", "agent_seed"]
