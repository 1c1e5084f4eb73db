"""The auctioneer's pure logic: batching orders into rounds, the order ledger, regions.

No Ray here: `AuctioneerCore` drives a `MarketEngine` through whatever bidders it was
given. In-process bidders (`LocalBidders`) run each round with `engine.run_round`;
bidders that offer the pipelined protocol (`exchange` / `defer_settle` / `flush`, the
Ray runtime) get rounds opened together, one call per bidder carrying the previous
rounds' settles and the new rounds, and the engine's `close_round` / `confirm` phases.
The Ray actor shell is `runtime/auctioneer_actor.py`.

Clocks: batching runs on a wall clock (a round closes when `max_batch` orders wait or
the oldest has waited `window_s`); the market clock the bidders see is anchored to the
orders' own timestamps (`OrdersClock`, moved by the orders of each round as it opens),
so a backlog replays at its own pace and tests are reproducible.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import Field, model_validator

from market.config import CONFIG_DIR, ConfigError, Finite, FleetCfg, Strict, _read_yaml, parse_model, repeated
from market.engine import MarketEngine, RoundOutcome
from market.geo import CityGrid
from market.round import Round
from market.types import AwardLine, Order, Quote

#: Round ids are `region_index << ROUND_ID_BITS | sequence`: globally unique across
#: auctioneers, because a bidder shared by two regions keys its holds by round id.
ROUND_ID_BITS = 40


def round_id_base(region_index: int) -> int:
    """The first round id of a region's auctioneer (its engine counts up from here)."""
    if region_index < 0 or region_index >= 1 << 22:
        raise ValueError(f"region index {region_index} out of range")
    return region_index << ROUND_ID_BITS


def region_of_round(round_id: int) -> int:
    """The region index encoded in a round id."""
    return round_id >> ROUND_ID_BITS


# -- regions -----------------------------------------------------------------------------------
class RegionCfg(Finite):
    """One auctioneer's territory: the orders it takes and the bidders it asks.

    Attributes:
        bbox_km: (x0, y0, x1, y1) in km from the city origin, x0 < x1 and y0 < y1; orders
            delivered inside go here (NaN would send every order to it: finite only).
        bidders: explicit bidder ids; empty means every bidder located within the box
            grown by `margin_km`, plus bidders without a location (the crowd).
    """

    name: str = Field(min_length=1, max_length=64)
    bbox_km: tuple[float, float, float, float]
    bidders: tuple[str, ...] = ()
    margin_km: float = Field(3.0, ge=0)

    @model_validator(mode="after")
    def _box_has_area(self) -> RegionCfg:
        x0, y0, x1, y1 = self.bbox_km
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"bbox_km is (x0, y0, x1, y1) with x0 < x1 and y0 < y1, got {self.bbox_km}")
        return self


class RegionsCfg(Strict):
    """The regions of one fleet, one auctioneer each."""

    fleet: str = "default"
    regions: tuple[RegionCfg, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> RegionsCfg:
        dupes = repeated(r.name for r in self.regions)
        if dupes:
            raise ValueError(f"region names must be unique, repeated: {', '.join(dupes)}")
        return self


def load_regions(name_or_path: str | Path | None = None) -> RegionsCfg:
    """Loads configs/regions.yaml (or a given file)."""
    path = Path(name_or_path) if name_or_path else CONFIG_DIR / "regions.yaml"
    return parse_model(RegionsCfg, _read_yaml(path), str(path))


def _located(fleet: FleetCfg) -> list[tuple[str, float | None, float | None]]:
    groups = (fleet.warehouses, fleet.rider_pools, fleet.crowd, fleet.lockers)
    return [(a.id, getattr(a, "x_km", None), getattr(a, "y_km", None)) for g in groups for a in g]


def region_bidders(region: RegionCfg, fleet: FleetCfg) -> list[str]:
    """The bidder ids a region's auctioneer asks, in fleet order.

    Raises:
        ConfigError: unknown bidder ids, or a region without a warehouse or without a
            last-mile bidder (no order of it could ever be served).
    """
    every = _located(fleet)
    known = {i for i, _, _ in every}
    if region.bidders:
        unknown = sorted(set(region.bidders) - known)
        if unknown:
            raise ConfigError(f"region {region.name}: unknown bidders {', '.join(unknown)}")
        wanted = set(region.bidders)
        chosen = [i for i, _, _ in every if i in wanted]
    else:
        x0, y0, x1, y1 = region.bbox_km
        m = region.margin_km
        chosen = [i for i, x, y in every
                  if x is None or y is None or (x0 - m <= x <= x1 + m and y0 - m <= y <= y1 + m)]
    warehouses = {w.id for w in fleet.warehouses}
    if not warehouses.intersection(chosen) or not set(chosen) - warehouses:
        raise ConfigError(f"region {region.name} needs a warehouse and a last-mile bidder, has "
                          f"{', '.join(chosen) or 'none'} (grow bbox_km or margin_km, or list its bidders)")
    return chosen


def assign_regions(orders: Sequence[Order], regions: Sequence[RegionCfg], grid: CityGrid) -> np.ndarray:
    """Index of the region each order goes to: the first box holding its destination, else the nearest box."""
    if not orders:
        return np.zeros(0, dtype=np.int64)
    x, y = grid.to_km(np.array([o.lat for o in orders]), np.array([o.lon for o in orders]))
    box = np.array([r.bbox_km for r in regions], dtype=np.float64)  # [region, 4]
    dx = np.maximum(np.maximum(box[:, None, 0] - x, 0.0), x - box[:, None, 2])
    dy = np.maximum(np.maximum(box[:, None, 1] - y, 0.0), y - box[:, None, 3])
    return np.argmin(np.hypot(dx, dy), axis=0)  # the first box at distance 0 wins ties


#: How many times `AuctioneerCore.drain` delivers what is left to settle before it gives up.
DRAIN_FLUSHES = 3


# -- batching ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchPolicy:
    """How orders become rounds.

    Attributes:
        window_s: a round closes once its oldest order has waited this long (wall clock)...
        max_batch: ...or once this many orders wait.
        max_rounds_per_call: rounds that may share one call per bidder when orders queue up
            (pipelined bidders only); 1 keeps one round per call.
        in_flight: calls to the bidders outstanding at once (pipelined bidders only). With 2,
            the auctioneer clears one call's rounds while the bidders quote the next; their
            settles then ride one call later (more capacity held at once; the awards may
            differ from one-at-a-time rounds, never the guarantees).
        retry_after_s: wall-clock pause before an unserved order is tried again.
        max_attempts: rounds an order may take part in before it ends unfulfilled.
    """

    window_s: float = 0.005
    max_batch: int = 64
    max_rounds_per_call: int = 1
    in_flight: int = 1
    retry_after_s: float = 0.05
    max_attempts: int = 10


class Batcher:
    """Gathers orders into rounds of at most `max_batch`, closing on size or on the window."""

    def __init__(self, window_s: float, max_batch: int) -> None:
        if max_batch < 1 or window_s < 0:
            raise ValueError("max_batch must be >= 1 and window_s >= 0")
        self.window_s = window_s
        self.max_batch = max_batch
        self._queue: list[tuple[float, int, Order, int, bool]] = []  # heap: (ready at, seq, order, attempts, alone)
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, order: Order, attempts: int, now: float, delay_s: float = 0.0, alone: bool = False) -> None:
        """Queues an order that may join a round from `now + delay_s` (a retry waits).

        `alone` gives the order a round, and a call to the bidders, of its own: a shell
        that suspects it of failing its rounds tries it where it can take no other order
        down with it.
        """
        heapq.heappush(self._queue, (now + delay_s, next(self._seq), order, attempts, alone))

    def _ready(self, now: float) -> int:
        return sum(1 for t, *_ in self._queue if t <= now)

    def due_in(self, now: float) -> float | None:
        """Seconds until a round is due (0: now), None when nothing waits."""
        if not self._queue:
            return None
        if self._ready(now) >= self.max_batch:
            return 0.0
        oldest = self._queue[0][0]
        return max(0.0, oldest + self.window_s - now)

    def take(self, now: float, max_rounds: int = 1, flush: bool = False) -> list[list[tuple[Order, int]]]:
        """Closes up to `max_rounds` rounds: full ones first; a partial one once its window passed.

        Orders keep their queue order (arrival, retries by due time) within and across rounds.
        """
        rounds: list[list[tuple[Order, int]]] = []
        while len(rounds) < max_rounds and self._queue:
            ready = self._ready(now)
            if ready == 0:
                break
            oldest = self._queue[0][0]
            if ready < self.max_batch and not flush and now < oldest + self.window_s:
                break
            if rounds and self._queue[0][4]:
                break  # an order traded alone goes in a call of its own
            n = min(ready, self.max_batch)
            batch = [heapq.heappop(self._queue)]
            while len(batch) < n and not batch[0][4] and not self._queue[0][4]:
                batch.append(heapq.heappop(self._queue))
            rounds.append([(o, a) for _, _, o, a, _ in batch])
            if batch[0][4]:
                break
        return rounds


class OrdersClock:
    """Market time anchored to the orders' timestamps, moving on with the wall clock in between.

    `now(wall)` never goes backwards; seeing an order created later than the market
    time moves the market time up to it. With `follow_wall=False` it only moves with
    the orders (reproducible rounds whatever the machine's speed: tests, replays).
    """

    def __init__(self, follow_wall: bool = True) -> None:
        self.follow_wall = follow_wall
        self._anchor_market: float | None = None
        self._anchor_wall = 0.0

    def saw(self, orders: Iterable[Order], wall: float) -> None:
        """Moves the clock up to the newest order's creation time."""
        newest = max((o.created_s for o in orders), default=None)
        if newest is None:
            return
        if self._anchor_market is None or newest > self.now(wall):
            self._anchor_market, self._anchor_wall = newest, wall

    def now(self, wall: float) -> float:
        """Market seconds at wall time `wall`."""
        if self._anchor_market is None:
            return 0.0
        return self._anchor_market + (max(0.0, wall - self._anchor_wall) if self.follow_wall else 0.0)


# -- the order ledger ----------------------------------------------------------------------------
QUEUED, IN_ROUND, AWARDED, UNFULFILLED = "queued", "in_round", "awarded", "unfulfilled"
TERMINAL = (AWARDED, UNFULFILLED)


class LedgerError(RuntimeError):
    """An order moved in a way the ledger forbids (a second terminal state, an unknown id)."""


@dataclass
class OrderState:
    """Where one order is: queued, in a round, or in exactly one terminal state."""

    status: str = QUEUED
    attempts: int = 0
    reason: str = ""
    rounds: list[int] = field(default_factory=list)
    award: tuple[str, str] | None = None  # (source id, leg id)


class OrderLedger:
    """The orders the auctioneer accepted and their states; enforces exactly one terminal state.

    Args:
        keep_ended: the most ended orders kept (a service runs for days); None keeps all.
            A forgotten order is unknown: moving it again is still an error.
    """

    def __init__(self, keep_ended: int | None = None) -> None:
        self.orders: dict[str, OrderState] = {}
        self.open = 0
        self.keep_ended = keep_ended
        self._ended: collections.deque[str] = collections.deque()
        self._forgotten: dict[str, int] = {}  # terminal status -> orders forgotten with it

    def submit(self, order_id: str) -> None:
        """Registers a new order (a known id is an error: idempotency lives above)."""
        if order_id in self.orders:
            raise LedgerError(f"order {order_id} submitted twice")
        self.orders[order_id] = OrderState()
        self.open += 1

    def _get(self, order_id: str) -> OrderState:
        st = self.orders.get(order_id)
        if st is None:
            raise LedgerError(f"unknown order {order_id}")
        if st.status in TERMINAL:
            raise LedgerError(f"order {order_id} is already {st.status}")
        return st

    def in_round(self, order_id: str, round_id: int) -> None:
        """The order joined a round."""
        st = self._get(order_id)
        st.status = IN_ROUND
        st.attempts += 1
        st.rounds.append(round_id)

    def awarded(self, order_id: str, source_id: str, leg_id: str) -> None:
        """Terminal: a source and a leg committed to it."""
        st = self._get(order_id)
        st.status, st.award, st.reason = AWARDED, (source_id, leg_id), ""
        self._end(order_id)

    def unserved(self, order_id: str, reason: str, final: bool) -> None:
        """Not served in its round: queued again, or terminal when `final`."""
        st = self._get(order_id)
        st.reason = reason
        st.status = UNFULFILLED if final else QUEUED
        if final:
            self._end(order_id)

    def _end(self, order_id: str) -> None:
        self.open -= 1
        if self.keep_ended is None:
            return
        self._ended.append(order_id)
        while len(self._ended) > self.keep_ended:
            status = self.orders.pop(self._ended.popleft()).status
            self._forgotten[status] = self._forgotten.get(status, 0) + 1

    def counts(self) -> dict[str, int]:
        """Orders per status, forgotten ones included."""
        out = dict(self._forgotten)
        for st in self.orders.values():
            out[st.status] = out.get(st.status, 0) + 1
        return out


# -- the core ------------------------------------------------------------------------------------
class PipelinedBidders(Protocol):
    """Bidders that let settles ride on the next call (the Ray runtime's `RayBidders`)."""

    def exchange(self, rounds: list[Round], now: float, hold_ttl_s: float) -> Any: ...
    def send(self, rounds: list[Round], now: float, hold_ttl_s: float) -> Any: ...
    def receive(self, flight: Any) -> Any: ...
    def defer_settle(self, round_id: int, awards: dict[str, list[AwardLine]], quoted: list[str], now: float) -> None: ...
    def flush(self, now: float, commits_only: bool = True) -> dict[int, set[int]]: ...
    @property
    def unsettled(self) -> bool: ...


@dataclass
class RoundRecord:
    """Timing and size of one round (wall-clock seconds from the core's clock)."""

    round_id: int
    orders: int
    opened: float
    cleared: float = 0.0
    confirmed: float = 0.0
    awarded: int = 0
    refused: int = 0

    @property
    def latency_s(self) -> float:
        """Open to commits confirmed."""
        return self.confirmed - self.opened


@dataclass
class _Open:
    outcome: RoundOutcome
    awards: dict[str, list[AwardLine]]
    quoted: list[str]
    now: float
    batch: list[tuple[Order, int]]
    record: RoundRecord


class AuctioneerCore:
    """Batches orders into rounds and runs them on one engine; tracks every order to one end.

    Args:
        engine: the market engine (its bidders decide sequential or pipelined rounds).
        batch: the batching policy.
        clock: wall clock in seconds (injectable for tests).
        market: the market clock bidders see (default: `OrdersClock()`).
        on_end: called with the ids of the orders that reached their terminal state in a
            settled round (awarded and committed, or unfulfilled for good), so a shell can
            answer the clients waiting on them.
        on_round: called with each settled round's `RoundRecord`, so a shell can export
            where a round's time went (quoting against settling).
        keep_records: the most recent rounds whose timing is kept (a service runs for days).
        keep_ended: the most ended orders the ledger keeps (None: all; see `OrderLedger`).

    Attributes:
        in_hand: the ids of the orders whose round (or call to the bidders) the core is
            working on, empty between them. A step that raises leaves it set, which tells a
            shell whose orders were in the round that failed (`serve.keeper`).
    """

    def __init__(self, engine: MarketEngine, batch: BatchPolicy | None = None,
                 clock: Callable[[], float] = time.perf_counter, market: OrdersClock | None = None,
                 on_end: Callable[[list[str]], None] | None = None,
                 on_round: Callable[[RoundRecord], None] | None = None, keep_records: int = 100_000,
                 keep_ended: int | None = None) -> None:
        self.engine = engine
        self.bidders = engine.bidders
        self.batch = batch or BatchPolicy()
        self.clock = clock
        self.pipelined = hasattr(self.bidders, "exchange")
        self.batcher = Batcher(self.batch.window_s, self.batch.max_batch)
        self.ledger = OrderLedger(keep_ended)
        self.market = market or OrdersClock()
        self.records: collections.deque[RoundRecord] = collections.deque(maxlen=keep_records)
        self.on_end = on_end
        self.on_round = on_round
        self._open: dict[int, _Open] = {}
        self._flight: tuple[Any, ...] | None = None  # in_flight=2: the call whose quotes are not yet taken
        self.in_hand: tuple[str, ...] = ()
        self._alone: set[str] = set()  # open orders submitted alone: their retries go alone too

    # -- intake ------------------------------------------------------------------------------
    def submit(self, orders: Iterable[Order], alone: bool = False) -> int:
        """Accepts new orders; they join the next rounds (`alone`: a round each)."""
        wall = self.clock()
        orders = list(orders)
        for o in orders:
            self.ledger.submit(o.order_id)
            self.engine.kpis.order_in(o.tier == "vip")
            self.engine.recorder.order_received(o, max(self.market.now(wall), o.created_s))
            self.batcher.add(o, 0, wall, alone=alone)
        if alone:
            self._alone.update(o.order_id for o in orders)
        return len(orders)

    @property
    def idle(self) -> bool:
        """No order is open and nothing is left to settle."""
        return (self.ledger.open == 0 and not self._open and self._flight is None
                and not (self.pipelined and self.bidders.unsettled))

    def due_in(self) -> float | None:
        """Seconds until `step` has work (0: now), None when there is none."""
        if self._open or self._flight is not None or (self.pipelined and self.bidders.unsettled):
            return 0.0
        return self.batcher.due_in(self.clock())

    # -- rounds ------------------------------------------------------------------------------
    def step(self, flush: bool = False) -> int:
        """Runs the rounds that are due (and delivers pending settles); returns rounds opened."""
        wall = self.clock()
        batches = self.batcher.take(wall, self.batch.max_rounds_per_call if self.pipelined else 1, flush)
        self.market.saw((o for b in batches for o, _ in b), wall)  # a backlog replays at its own pace
        mnow = self.market.now(wall)
        if not self.pipelined:
            for b in batches:
                self._sequential(b, mnow)
            return len(batches)
        opened = self.clock()
        rounds = []
        for b in batches:
            self._hand([b])
            rounds.append(self._open_round(b, mnow))
        self._hand(batches)  # the call carries them all
        if self.batch.in_flight > 1:
            if rounds or self._flight:
                self._overlapped(rounds, batches, mnow, opened)
            if self._flight or rounds:
                return len(rounds)
        elif rounds:
            ex = self.bidders.exchange(rounds, mnow, self.engine.hold_ttl_s)
            self._confirm_all(ex.confirmed)
            for rnd, b in zip(rounds, batches):
                self._close(rnd, ex.quotes.get(rnd.round_id, []), b, mnow, opened)
        self.in_hand = ()
        if self.bidders.unsettled and (not rounds or not self._more_due()):
            # nothing else to carry the settles: deliver the commits now (releases wait)
            self._confirm_all(self.bidders.flush(mnow, commits_only=True))
            if not self._open and self.bidders.unsettled and not len(self.batcher):
                self._confirm_all(self.bidders.flush(mnow, commits_only=False))
        return len(rounds)

    def _overlapped(self, rounds: list[Round], batches: list[list[tuple[Order, int]]], mnow: float,
                    opened: float) -> None:
        """Two calls in flight: send these rounds, then clear the previous call's while bidders quote."""
        flight = self.bidders.send(rounds, mnow, self.engine.hold_ttl_s) if rounds else None
        if self._flight is not None:
            prev_rounds, prev_batches, prev_mnow, prev_opened, prev = self._flight
            self._hand(prev_batches)
            ex = self.bidders.receive(prev)
            self._confirm_all(ex.confirmed)
            for rnd, b in zip(prev_rounds, prev_batches):
                self._close(rnd, ex.quotes.get(rnd.round_id, []), b, prev_mnow, prev_opened)
        self._flight = (rounds, batches, mnow, opened, flight) if flight is not None else None
        self.in_hand = ()

    def drain(self) -> None:
        """Settles what is in flight and opens no round: the quotes of a call on its way
        are cleared, then every cleared round's commits and releases are delivered and
        confirmed. A shell that stops after it leaves no award that the journal has not
        committed (orders still queued stay open, for the next run to trade)."""
        if not self.pipelined:  # sequential rounds settle within their step
            return
        mnow = self.market.now(self.clock())
        if self._flight is not None:
            self._overlapped([], [], mnow, self.clock())
        for _ in range(DRAIN_FLUSHES):  # one does it unless a bidder fails to answer
            if not self.bidders.unsettled:
                break
            self._confirm_all(self.bidders.flush(mnow, commits_only=False))

    def _more_due(self) -> bool:
        due = self.batcher.due_in(self.clock())
        return due is not None and due == 0.0

    def _open_round(self, batch: list[tuple[Order, int]], mnow: float) -> Round:
        rnd = self.engine.open_round([o for o, _ in batch], mnow, [a for _, a in batch])
        for o, _ in batch:
            self.ledger.in_round(o.order_id, rnd.round_id)
        return rnd

    def _hand(self, batches: list[list[tuple[Order, int]]]) -> None:
        self.in_hand = tuple([o.order_id for b in batches for o, _ in b])

    def _sequential(self, batch: list[tuple[Order, int]], mnow: float) -> None:
        opened = self.clock()
        self._hand([batch])
        rnd = self._open_round(batch, mnow)
        rec = RoundRecord(rnd.round_id, rnd.size, opened)
        out = self.engine.trade(rnd, mnow)
        rec.cleared = rec.confirmed = self.clock()
        self._account(out, batch, rec)
        self.in_hand = ()

    def _close(self, rnd: Round, quotes: list[Quote], batch: list[tuple[Order, int]], mnow: float,
               opened: float) -> None:
        self._hand([batch])
        rec = RoundRecord(rnd.round_id, rnd.size, opened)
        outcome, awards = self.engine.close_round(rnd, quotes)
        quoted = [q.agent_id for q in quotes]
        rec.cleared = self.clock()
        self._open[rnd.round_id] = _Open(outcome, awards, quoted, mnow, batch, rec)
        self.bidders.defer_settle(rnd.round_id, awards, quoted, mnow)

    def _confirm_all(self, confirmed: dict[int, set[int]]) -> None:
        for rid in sorted(confirmed):
            op = self._open.pop(rid, None)
            if op is None:
                continue
            self._hand([op.batch])
            self.engine.confirm(op.outcome, op.awards, op.quoted, confirmed[rid], op.now)
            op.record.refused = len(confirmed[rid])
            op.record.confirmed = self.clock()
            self._account(op.outcome, op.batch, op.record)
        self.in_hand = ()

    def _account(self, out: RoundOutcome, batch: list[tuple[Order, int]], rec: RoundRecord) -> None:
        """Moves every order of a settled round to awarded, back to the queue, or unfulfilled."""
        book, alloc = out.book, out.alloc
        wall = self.clock()
        ended: list[str] = []
        for o, reason in enumerate(alloc.reason):
            order, attempts = batch[o]
            if not reason:
                c = int(alloc.winner[o])
                self.ledger.awarded(order.order_id, book.bidder_ids[int(book.combos.src[c])],
                                    book.bidder_ids[int(book.combos.leg[c])])
                rec.awarded += 1
                ended.append(order.order_id)
                continue
            final = attempts + 1 >= self.batch.max_attempts
            self.ledger.unserved(order.order_id, reason, final)
            if final:
                self.engine.kpis.gave_up(reason)
                ended.append(order.order_id)
            else:
                self.batcher.add(order, attempts + 1, wall, self.batch.retry_after_s, order.order_id in self._alone)
        if self._alone:
            self._alone.difference_update(ended)
        self.records.append(rec)
        if self.on_round is not None:
            self.on_round(rec)
        if ended and self.on_end is not None:
            self.on_end(ended)

    def run_until_idle(self, timeout_s: float = 60.0, sleep: Callable[[float], None] = time.sleep) -> bool:
        """Steps until every order ended and every settle is confirmed; False on timeout."""
        end = self.clock() + timeout_s
        while not self.idle:
            if self.clock() > end:
                return False
            due = self.due_in()
            if due is None or due > 0:
                sleep(min(due or 0.001, 0.01))
                continue
            self.step()
        return True

    def latencies_ms(self) -> dict[str, float | int | None]:
        """Round latency (open to commits confirmed) percentiles over the rounds so far."""
        lat = np.array([r.latency_s for r in self.records]) * 1000.0
        if not len(lat):
            return {"rounds": 0, "p50_ms": None, "p99_ms": None}
        return {"rounds": len(lat), "p50_ms": round(float(np.percentile(lat, 50)), 2),
                "p99_ms": round(float(np.percentile(lat, 99)), 2)}
