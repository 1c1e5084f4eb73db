"""The auctioneer as a Ray actor: one per region, owning a MarketEngine over `RayBidders`.

`AuctioneerHost` wraps `market.auctioneer.AuctioneerCore` (the batching and ledger
logic, pure) with a background thread that runs rounds as they fall due, and an inbox
that `submit` fills without waiting for a round in progress. Every region's round ids
start at `round_id_base(region_index)`, so two auctioneers sharing a bidder never
collide on its holds; the bidder, the single writer of its capacity, keeps them from
double-booking it.

Usage (driver)::

    regions = load_regions()                      # configs/regions.yaml
    handles = spawn_bidders(fleet_specs(fleet_cfg, seed, "heuristic"), state_dir=run_dir)
    auctioneers = start_auctioneers(regions, fleet_cfg, handles, seed=seed)
    for r, part in route(orders, regions, fleet_cfg).items():
        auctioneers[r].submit.remote(part)
    ray.get([a.wait_idle.remote(30) for a in auctioneers])

Limitation: the auctioneer keeps its open orders in memory; it is started with
`max_restarts=0`, and a dead auctioneer's open orders are lost (its bidders' holds
expire by themselves). Bidders are the fault-tolerant part.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from agents.fleet import Fleet, build_fleet
from market.auctioneer import (AuctioneerCore, BatchPolicy, OrdersClock, RegionsCfg, RoundRecord, assign_regions,
                               region_bidders, round_id_base)
from market.config import FleetCfg, load_profile
from market.engine import Bidders, LocalBidders, MarketEngine
from market.recorder import NullRecorder, Recorder
from market.geo import CityGrid
from market.journal import JournalError
from market.types import Order
from policies.registry import make_policy
from runtime.ray_bidders import RayBidders

logger = logging.getLogger("bidhive.auctioneer")
T = TypeVar("T")

#: How long a query waits for the round loop to run it (a round takes milliseconds).
READ_WAIT_S = 30.0

#: Failures of the machine rather than of a round's orders: a disk that is full or gone
#: (OSError), or a journal that stopped after one (JournalError). No order is blamed for them.
MACHINE_FAULTS = (OSError, JournalError)


class LoopEnded(RuntimeError):
    """The round loop is not running, or ended before it ran a call: the call never ran."""


class LoopBusy(RuntimeError):
    """The round loop did not start a call in time; the call was taken back and never runs."""


@dataclass(frozen=True)
class AuctioneerSpec:
    """What one region's auctioneer is built from.

    Attributes:
        bidders: the region's bidder ids (None: the whole fleet).
        deadline_s: how long a round waits for quotes (wall clock).
        prefilter: skip bidders that cannot reach any order of the round.
        keep_ended: the most ended orders the core's ledger keeps (None: all).
    """

    region_index: int
    fleet: FleetCfg
    policy: str = "heuristic"
    profile: str = "balanced"
    seed: int = 0
    name: str = ""
    bidders: tuple[str, ...] | None = None
    batch: BatchPolicy = field(default_factory=BatchPolicy)
    deadline_s: float = 0.25
    hold_ttl_s: float = 5.0
    quarantine_after: int = 3
    quarantine_rounds: int = 10
    prefilter: bool = True
    keep_ended: int | None = None


def region_fleet(fleet: Fleet, bidders: tuple[str, ...] | None) -> Fleet:
    """The fleet restricted to a region's bidders (same objects, fleet order)."""
    if bidders is None:
        return fleet
    keep = set(bidders)
    return Fleet(fleet.cfg, fleet.env, [a for a in fleet.agents if a.agent_id in keep])


def build_core(spec: AuctioneerSpec, handles: dict[str, Any] | None, *, recorder: Recorder | None = None,
               on_end: Callable[[list[str]], None] | None = None, market: OrdersClock | None = None,
               on_round: Callable[[RoundRecord], None] | None = None) -> AuctioneerCore:
    """The auctioneer's engine over Ray bidders (in-process agents when `handles` is None).

    Round ids start at the region's base, so regions sharing bidders never collide.
    """
    fleet = region_fleet(build_fleet(spec.fleet, spec.seed), spec.bidders)
    policy = make_policy(spec.policy)
    bidders: Bidders = LocalBidders(fleet.agents, policy.strategy) if handles is None else RayBidders(
        fleet, {a.agent_id: handles[a.agent_id] for a in fleet.agents}, deadline_s=spec.deadline_s,
        quarantine_after=spec.quarantine_after, quarantine_rounds=spec.quarantine_rounds, prefilter=spec.prefilter,
    )
    engine = MarketEngine(
        fleet=fleet, policy=policy, profile=load_profile(spec.profile), bidders=bidders,
        seed=spec.seed + spec.region_index, hold_ttl_s=spec.hold_ttl_s, exact_every=0,
        recorder=recorder or NullRecorder(), _round_id=round_id_base(spec.region_index),
    )
    return AuctioneerCore(engine, spec.batch, market=market, on_end=on_end, on_round=on_round,
                          keep_ended=spec.keep_ended)


class AuctioneerHost:
    """One region's auctioneer: an inbox, a round loop thread, and queries for drivers and tests.

    Args:
        handles: bidder actor per agent id; None runs the agents in this process.
        recorder, on_end, on_round, market: passed to the core (see `AuctioneerCore`).
    """

    def __init__(self, spec: AuctioneerSpec, handles: dict[str, Any] | None, start: bool = True, *,
                 recorder: Recorder | None = None, on_end: Callable[[list[str]], None] | None = None,
                 market: OrdersClock | None = None, on_round: Callable[[RoundRecord], None] | None = None) -> None:
        self.spec = spec
        self.core = build_core(spec, handles, recorder=recorder, on_end=on_end, market=market, on_round=on_round)
        self.name = spec.name or f"region-{spec.region_index}"
        self._inbox: collections.deque[tuple[list[Order], bool]] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[AuctioneerCore], Any], Future[Any]]] = collections.deque()
        self._wake = threading.Condition()
        self._stop = self._drain = self._closed = False
        self._error: str | None = None
        self._blamed: tuple[str, ...] = ()
        self._submitted = self._accepted = 0
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    def start(self) -> None:
        """Starts the round loop (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"auctioneer-{self.name}", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        core = self.core
        try:
            while not self._stop:
                with self._wake:
                    while not self._inbox and not self._calls and not self._stop:
                        due = core.due_in()
                        if due == 0.0:
                            break
                        self._wake.wait(timeout=0.05 if due is None else min(due, 0.05))
                    batches = list(self._inbox)
                    self._inbox.clear()
                    calls = list(self._calls)
                    self._calls.clear()
                for fn, fut in calls:
                    _run_call(fn, core, fut)
                for orders, alone in batches:
                    core.submit(self._new_only(orders), alone)
                    self._accepted += len(orders)
                if core.due_in() == 0.0:
                    core.step()
            if self._drain:
                core.drain()
        except Exception as err:  # noqa: BLE001 - reported by status() and wait_idle()
            logger.exception("auctioneer %s: round loop died", self.name)
            self._blamed = () if isinstance(err, MACHINE_FAULTS) else core.in_hand
            self._error = f"{type(err).__name__}: {err}"
        finally:
            self._close_calls()

    def _close_calls(self) -> None:
        """Cancels the calls the loop will never run, now and from now on, so their callers
        hear at once instead of waiting out their timeouts."""
        with self._wake:
            self._closed = True
            left = list(self._calls)
            self._calls.clear()
        for _, fut in left:
            fut.cancel()

    def _new_only(self, orders: list[Order]) -> list[Order]:
        """The orders the core has not seen: a driver that sends a batch again (a retry
        after a timeout) must not end the round loop, and every open order with it, on
        the ledger's "submitted twice"."""
        seen = self.core.ledger.orders
        new: dict[str, Order] = {}
        for o in orders:
            if o.order_id not in seen:
                new.setdefault(o.order_id, o)
        if len(new) < len(orders):
            logger.warning("auctioneer %s: %d order(s) submitted again, ignored", self.name, len(orders) - len(new))
        return list(new.values())

    def submit(self, orders: list[Order], alone: bool = False) -> int:
        """Queues orders for the next rounds (`alone`: a round each); returns how many."""
        with self._wake:
            self._inbox.append((list(orders), alone))
            self._submitted += len(orders)
            self._wake.notify()
        return len(orders)

    def call(self, fn: Callable[[AuctioneerCore], Any]) -> Future[Any]:
        """Runs `fn(core)` on the round loop between two steps (e.g. a profile switch)."""
        fut: Future[Any] = Future()
        with self._wake:
            if self._closed:  # the loop has ended: it would never run
                fut.cancel()
                return fut
            self._calls.append((fn, fut))
            self._wake.notify()
        return fut

    def withdraw(self, order_id: str) -> bool:
        """Takes an order back out of the inbox, if the loop has not taken it in yet (nor
        journaled it); whether it did. A caller that could not tell its client the order
        was accepted makes "not accepted" true this way."""
        with self._wake:
            for i, (orders, alone) in enumerate(self._inbox):
                kept = [o for o in orders if o.order_id != order_id]
                if len(kept) < len(orders):
                    if kept:
                        self._inbox[i] = (kept, alone)
                    else:
                        del self._inbox[i]
                    self._submitted -= len(orders) - len(kept)
                    return True
        return False

    @property
    def alive(self) -> bool:
        """The round loop is running and has not failed."""
        return self.failure is None

    @property
    def failure(self) -> str | None:
        """Why the round loop is not running: its exception, or that it never started or
        was stopped; None while it runs."""
        if self._error is not None:
            return self._error
        if self._thread is None:
            return "not started"
        return None if self._thread.is_alive() else "stopped"

    @property
    def blamed(self) -> tuple[str, ...]:
        """The orders of the round that the loop died in, when that round may be why: empty
        while it runs, and when it died of the machine (`MACHINE_FAULTS`) or between rounds."""
        return self._blamed

    def wait_idle(self, timeout_s: float = 60.0) -> bool:
        """Blocks until every submitted order has ended and every commit is confirmed."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self._error:
                raise RuntimeError(f"auctioneer {self.name} failed: {self._error}")
            # every order handed to the core (not just out of the inbox), and the core idle
            if self._accepted == self._submitted and self.core.idle:
                return True
            time.sleep(0.01)
        return False

    def stop(self, drain: bool = False) -> None:
        """Stops the round loop after the current step (`drain`: and settles the rounds in
        flight, `AuctioneerCore.drain`)."""
        self._stop, self._drain = True, drain
        with self._wake:
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def outcomes(self) -> dict[str, tuple[str, str, tuple[str, str] | None]]:
        """Per order id: (status, reason, (source id, leg id) when awarded)."""
        return self._read(lambda core: {oid: (st.status, st.reason, st.award)
                                        for oid, st in core.ledger.orders.items()})

    def status(self) -> dict[str, Any]:
        """Counts, round latencies, bidder facts and KPIs (without utilization)."""
        def read(core: AuctioneerCore) -> dict[str, Any]:
            bidders: RayBidders = core.bidders  # type: ignore[assignment]
            return {
                "name": self.name, "error": self._error, "orders": core.ledger.counts(),
                "latency": core.latencies_ms(), "bidders": bidders.summary(), "orphaned": dict(bidders.orphaned),
                "kpis": core.engine.kpis.report({}, timing=True),
            }
        return self._read(read)

    def round_records(self) -> list[dict[str, Any]]:
        """Every settled round's timing."""
        return self._read(lambda core: [asdict(r) for r in core.records])

    def round_facts(self) -> list[dict[str, Any]]:
        """Every round's bidder facts (asked, received, timed out, ...)."""
        return self._read(lambda core: [asdict(f) for f in core.bidders.facts])  # type: ignore[attr-defined]

    def run_on_loop(self, fn: Callable[[AuctioneerCore], T], timeout_s: float) -> T:
        """`fn(core)` run on the round loop between two steps, waited for.

        Raises:
            LoopEnded: the loop is not running, or ended before it got to `fn`.
            LoopBusy: the loop did not start `fn` within `timeout_s`.
            In both cases `fn` never runs, so a caller can say "nothing changed"; what
            `fn` itself raises comes through as it is.
        """
        if not self.alive:
            raise LoopEnded("the auctioneer is not running")
        fut = self.call(fn)
        try:
            return fut.result(timeout=timeout_s)
        except CancelledError:
            raise LoopEnded("the auctioneer stopped before it got to it; nothing changed") from None
        except FutureTimeout:
            if fut.cancel():
                raise LoopBusy(f"the auctioneer did not get to it within {timeout_s:g} s; nothing changed") from None
        return fut.result()  # it started just now (or ended with a TimeoutError of its own): as it finishes

    def _read(self, fn: Callable[[AuctioneerCore], T]) -> T:
        """`fn(core)` on the round loop, between two steps: the actor answers queries on
        other threads, and a read while a round settles could see its dicts change size.
        From the loop itself, or once the loop is not running, nothing else touches the
        core: read it here."""
        if threading.current_thread() is not self._thread:
            try:
                return self.run_on_loop(fn, READ_WAIT_S)
            except LoopEnded:
                pass
        return fn(self.core)


def _run_call(fn: Callable[[AuctioneerCore], Any], core: AuctioneerCore, fut: Future[Any]) -> None:
    if not fut.set_running_or_notify_cancel():  # the caller gave up waiting: it was told nothing ran
        return
    try:
        fut.set_result(fn(core))
    except Exception as err:  # noqa: BLE001 - handed to the caller through the future
        fut.set_exception(err)


def auctioneer_actor_class(**options: Any) -> Any:
    """`AuctioneerHost` as a Ray actor (threaded: `submit` never waits for a round)."""
    import ray

    opts = {"num_cpus": 0, "max_restarts": 0, "max_concurrency": 4, **options}
    return ray.remote(**opts)(AuctioneerHost)


def start_auctioneers(
    regions: RegionsCfg, fleet: FleetCfg, handles: dict[str, Any], *, policy: str = "heuristic",
    profile: str = "balanced", seed: int = 0, batch: BatchPolicy | None = None, deadline_s: float = 0.25,
) -> list[Any]:
    """One auctioneer actor per region (region index = list position), over shared bidder actors."""
    cls = auctioneer_actor_class()
    return [
        cls.remote(AuctioneerSpec(
            region_index=i, fleet=fleet, policy=policy, profile=profile, seed=seed, name=r.name,
            bidders=tuple(region_bidders(r, fleet)), batch=batch or BatchPolicy(), deadline_s=deadline_s,
        ), handles)
        for i, r in enumerate(regions.regions)
    ]


def route(orders: list[Order], regions: RegionsCfg, fleet: FleetCfg) -> dict[int, list[Order]]:
    """Orders by region index (the box holding the destination, else the nearest box)."""
    grid = CityGrid(fleet.city.origin_lat, fleet.city.origin_lon)
    out: dict[int, list[Order]] = {}
    for o, r in zip(orders, assign_regions(orders, regions.regions, grid).tolist()):
        out.setdefault(int(r), []).append(o)
    return out
