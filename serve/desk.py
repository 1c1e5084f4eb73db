"""The order desk: the HTTP service's core, without HTTP.

It turns a validated order into a market order, journals it (with its idempotency key)
before any bidder hears of it, hands it to the auctioneer's round loop, and answers the
waiting client once the journal holds the award and is synced. The auction never runs on
the request: a client that disconnects or times out neither cancels nor loses its order.

Every answer comes from `OrderIndex`, which is fed the records as the journal writes
them and, after a restart, the journal read back; orders accepted and not ended before
the restart are traded again in the new run. One desk owns one journal (its writer
holds a file lock), so the Serve deployment runs one replica per journal.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from agents.actor import AgentSpec, default_state_root, fleet_specs
from agents.base import Agent
from market.auctioneer import AuctioneerCore, RoundRecord
from market.config import ConfigError, load_fleet, load_profile, load_profiles
from market.clearing import NO_CAPACITY, NO_FEASIBLE, NO_QUOTE
from market.engine import COMMIT_REFUSED, LocalBidders
from market.journal import journal_head
from market.journal_recorder import JournalRecorder
from market.replay import order_from_record
from runtime import gc_pauses
from runtime.auctioneer_actor import AuctioneerHost, AuctioneerSpec, LoopBusy, LoopEnded
from serve.config import FLEET_DIR_PREFIX, FLEET_DIR_PREFIX_ENV, BatchCfg, ServeCfg
from serve.fleet_state import (
    FleetOrigin, as_taken, carry_fleet, carry_into, claim_state_dir, fleet_fingerprint, rescue_dead_fleets,
    save_agents, save_fleet,
)
from serve.idempotency import IdempotencyConflict, IdempotencyStore
from serve.index_checkpoint import CheckpointWriter, Cut, Rebuilt, checkpoint_path, rebuild_index
from serve.metrics import Metrics
from serve.models import OrderIn
from serve.order_index import AWARDED, HOT_ENDED, PENDING, UNFULFILLED, OrderIndex

logger = logging.getLogger("bidhive.serve")

#: At a stop, the journal starts a new file (and the index is checkpointed) once its last
#: file holds this fraction of `journal_rotate_mb`: 1/16.
STOP_ROTATES_AT = 16

#: Orders may be delivered this far outside the city square (km) before they are refused.
SERVICE_MARGIN_KM = 5.0


#: Counters `/metrics` shows from the start, at 0 until they happen (a scrape tells 0 from
#: "not reported"), with their help text; `SERIES` names those with labels.
COUNTERS = {
    "orders_received_total": "Orders journaled (a resumed order counts again).",
    "orders_ended_total": "Orders ended, by status and reason.",
    "rounds_total": "Rounds cleared.",
    "quotes_total": "Quotes taken into rounds.",
    "bidder_misses_total": "Bidders absent from a round, by why.",
    "profile_changes_total": "Strategy profile switches.",
    "orders_shed_total": "Orders refused with 503 because too many were open.",
}
MISS_REASONS = ("timed_out", "failed", "invalid")

#: A resumed order that was in the round a desk died in this many times, the last of them
#: a round of its own (`serve.keeper`), is given up (``order_dropped``, reason
#: `ROUND_FAILED`) instead of traded again: it is the cause, and trading it again would
#: take the new desk down too. Until then it is traded in a round of its own, so that it
#: cannot take other orders down with it.
DROP_AFTER_FAILED_ROUNDS = 2
ROUND_FAILED = "round_failed"

#: The labelled series of `COUNTERS`, each shown from the start: one per why a bidder
#: missed a round, and one per way an order ends (awarded; unfulfilled, by reason).
SERIES: dict[str, tuple[dict[str, str], ...]] = {
    "bidder_misses_total": tuple({"why": why} for why in MISS_REASONS),
    "orders_ended_total": ({"status": AWARDED, "reason": ""}, *({"status": UNFULFILLED, "reason": why} for why in (
        NO_QUOTE, NO_FEASIBLE, NO_CAPACITY, COMMIT_REFUSED, ROUND_FAILED))),
}


class DeskError(Exception):
    """A request the desk refuses; `status` is the HTTP code, `detail` says why."""

    def __init__(self, status: int, detail: str, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.retry_after_s = status, detail, retry_after_s


@dataclass
class Placed:
    """A placed order: its id, and either the stored answer (a repeat) or a future for it."""

    order_id: str
    answer: dict[str, Any] | None = None
    future: Future[dict[str, Any]] | None = None


class OrderDesk:
    """Accepts orders, runs the auctioneer's round loop, answers from the journal.

    Args:
        cfg: the service settings.
        handles: bidder actor per agent id; None runs the agents in this process.
        wall: wall clock in Unix seconds (injectable for tests).
        failed_rounds: per order id, the rounds with that order in them that killed the
            round loops of the desks before this one (`serve.keeper` counts them); see
            `DROP_AFTER_FAILED_ROUNDS`.
        fleet_origin: where the bidder actors' state came from (`spawn_fleet`); agents
            run in this process take up the state saved at the last stop here instead.

    Attributes:
        failed_rounds: those counts for the orders this desk trades again.
        fleet_origin: where the bidders' state came from (`serve.fleet_state`).
    """

    def __init__(self, cfg: ServeCfg, handles: dict[str, Any] | None = None,
                 wall: Callable[[], float] = time.time, failed_rounds: Mapping[str, int] | None = None,
                 fleet_origin: FleetOrigin | None = None) -> None:
        self.cfg = cfg
        self.wall = wall
        self.fleet_origin = fleet_origin or FleetOrigin(False, "the bidders' state was not looked for")
        self.failed_rounds: dict[str, int] = dict(failed_rounds or {})
        self.fleet_cfg = load_fleet(cfg.fleet)
        journal = Path(cfg.journal)
        journal.parent.mkdir(parents=True, exist_ok=True)
        if handles is None:  # a killed service's Ray bidders left state this fleet can take up
            rescue_dead_fleets(default_state_root())
        # the writer's lock first: a replica still stopping could otherwise append what
        # the index below never reads (accepted orders, keys) before it lets go
        self.recorder = JournalRecorder(journal, fsync=cfg.fsync, rotate_bytes=cfg.journal_rotate_bytes)
        try:
            self._open_desk(journal, handles)
        except BaseException:  # a start that fails lets go of the journal (the keeper tries again)
            self._abandon()
            raise

    # -- start-up --------------------------------------------------------------------------
    def _open_desk(self, journal: Path, handles: dict[str, Any] | None) -> None:
        """Everything after the journal's lock: the index, then the round loop, resumed."""
        cfg = self.cfg
        self.rebuilt = self._rebuild(journal, fresh=self.recorder.writer.next_seq == 0)
        self.index = self.rebuilt.index
        self.idem = IdempotencyStore(self.index.by_key)
        self.metrics = Metrics()
        for name, text in COUNTERS.items():
            for labels in SERIES.get(name, ({},)):
                self.metrics.inc(name, 0.0, help=text, **labels)
        self._lock = threading.Lock()
        self._waiters: dict[str, tuple[Future[dict[str, Any]], float, str | None]] = {}  # future, accepted at, key
        self._open = 0
        self._next = 0
        self.epoch = float(self.index.config.get("epoch_unix") or math.floor(self.wall() / 86400.0) * 86400.0)
        self.recorder.writer.on_append = self._on_record
        self.checkpoints = CheckpointWriter(checkpoint_path(journal))
        self.recorder.writer.on_rotate = self._on_rotate
        self.profile = self._profile_to_resume()
        spec = AuctioneerSpec(region_index=0, fleet=self.fleet_cfg, policy=cfg.policy, profile=self.profile,
                              seed=cfg.seed, name="serve", batch=cfg.batch.policy(),
                              deadline_s=cfg.deadline_ms / 1000.0, hold_ttl_s=cfg.hold_ttl_s,
                              keep_ended=HOT_ENDED)  # the index answers for ended orders
        self.host = AuctioneerHost(spec, handles, start=False, recorder=self.recorder, on_end=self._ended,
                                   on_round=self._round_settled)
        if handles is None:  # before `run_started`: the saved state must be what the journal ends with
            self.fleet_origin = carry_into(self._agents(), self._specs(), journal, self._fingerprint())
            logger.info("bidders in the service: %s", self.fleet_origin.why)
        self.recorder.run_started(self._run_info())
        self.segment = self.index.segments
        self._resume()
        self.host.start()

    def _abandon(self) -> None:
        """Undoes a start that failed part way: the round loop, the checkpoint thread, and
        the journal's lock last (its close lets go of the lock even when it raises)."""
        host, checkpoints = self.__dict__.get("host"), self.__dict__.get("checkpoints")
        try:
            if host is not None:
                host.stop()
            if checkpoints is not None:
                checkpoints.close()
            self.recorder.close()
        except Exception:  # noqa: BLE001 - the start's own error is the one to raise
            logger.exception("cleaning up after a failed start")

    def _rebuild(self, journal: Path, fresh: bool) -> Rebuilt:
        """The order index of the journal so far (a restart), or an empty one (`fresh`: no record)."""
        hot = ended_kept_live(self.cfg.batch)
        if fresh:
            return Rebuilt(OrderIndex(retain=self.cfg.retain_orders, hot=hot), "empty", 0, 0.0)
        rebuilt = rebuild_index(journal, self.cfg.retain_orders, hot)
        logger.info("order index from the %s: %d journal records in %.2f s", rebuilt.source, rebuilt.records,
                    rebuilt.seconds)
        return rebuilt

    def _run_info(self) -> dict[str, Any]:
        engine = self.host.core.engine
        return {
            "fleet": self.fleet_cfg.model_dump(mode="json"), "seed": self.cfg.seed, "policy": engine.policy.name,
            "mechanism": engine.policy.mechanism.name, "profile": engine.profile, "profile_name": self.profile,
            "max_attempts": self.cfg.batch.max_attempts, "epoch_unix": self.epoch, "shell": "serve",
            "started_unix": self.wall(),  # also what tells this journal from another (`journal_head`)
            "serve": self.cfg.model_dump(mode="json", exclude={"token"}),
        }

    def _profile_to_resume(self) -> str:
        """The profile last in force in the journal (an operator's live switch outlives a
        restart), else the configured one."""
        journaled = self.index.profile
        return journaled if self.index.segments and journaled in load_profiles() else self.cfg.profile

    def _resume(self) -> None:
        """Trades again the orders an earlier run accepted and did not end. Those that the
        rounds which failed point at (`failed_rounds`) are dropped, or traded alone."""
        failed = self.failed_rounds
        self._drop([v.order_id for v in self.index.unfinished()
                    if failed.get(v.order_id, 0) >= DROP_AFTER_FAILED_ROUNDS])
        again = self.index.unfinished()
        self.failed_rounds = {v.order_id: failed[v.order_id] for v in again if v.order_id in failed}
        for view in again:
            self.recorder.tag_order(view.order_id, idempotency_key=view.key, body_hash=view.body_hash)
            self._open += 1
        if again:
            logger.warning("resuming %d orders accepted before the restart", len(again))
        orders = {v.order_id: order_from_record({**v.order, "order_id": v.order_id}) for v in again}
        others = [o for oid, o in orders.items() if oid not in self.failed_rounds]
        suspects = [o for oid, o in orders.items() if oid in self.failed_rounds]
        if others:
            self.host.submit(others)
        if suspects:
            self.host.submit(suspects, alone=True)

    def _drop(self, order_ids: list[str]) -> None:
        """Ends these resumed orders unfulfilled (`ROUND_FAILED`), journaled and synced."""
        for oid in order_ids:
            n = self.failed_rounds[oid]
            logger.error("order %s was in %d rounds that failed: dropped, unfulfilled (%s)", oid, n, ROUND_FAILED)
            self.recorder.order_dropped(oid, ROUND_FAILED, n, self.market_now())
        if order_ids:
            self._open += len(order_ids)  # as if resumed, so that `_ended` counts them out
            self._ended(order_ids)

    # -- the journal's records -------------------------------------------------------------
    def _on_rotate(self, file_index: int, seq: int, finished_bytes: int) -> None:
        """A journal file has just been finished: checkpoint the index, which holds exactly
        the finished files (written on the checkpoint's own thread). Runs inside the
        journal's append, so nothing here may fail it: a checkpoint only speeds a restart."""
        try:
            with self._lock:
                state = self.index.state()
            self.checkpoints.submit(Cut(journal_head(self.recorder.path), file_index, seq, finished_bytes), state)
        except Exception:  # noqa: BLE001 - see above
            logger.exception("order index checkpoint at journal file %d skipped", file_index)

    def _on_record(self, rec: dict[str, Any]) -> None:
        """Runs for each record the journal writes (under the writer's lock, in seq order)."""
        with self._lock:
            self.index.apply(rec)
            self._count(rec)

    def _count(self, rec: dict[str, Any]) -> None:
        kind, m = rec["type"], self.metrics
        if kind == "order_received":
            m.inc("orders_received_total")
        elif kind == "round_cleared":
            m.inc("rounds_total")
            m.inc("quotes_total", float(rec["q_counts"][0]) if "q_counts" in rec else float(len(rec["quotes"])))
            facts = rec.get("facts") or {}
            m.observe_ms("clear_latency_ms", float(facts.get("clear_ms", 0.0)), help="Clearing time per round (ms).")
            for what in MISS_REASONS:
                if facts.get(what):
                    m.inc("bidder_misses_total", float(facts[what]), why=what)
        elif kind == "profile_changed":
            m.inc("profile_changes_total")

    def _round_settled(self, rec: RoundRecord) -> None:
        """Where a round's time went: asking the bidders and clearing, then confirming the commits."""
        with self._lock:
            self.metrics.observe_ms("round_quote_ms", (rec.cleared - rec.opened) * 1000.0,
                                    help="Round opened to cleared: the bidders quoting, then clearing (ms).")
            self.metrics.observe_ms("round_settle_ms", (rec.confirmed - rec.cleared) * 1000.0,
                                    help="Round cleared to its winners' commits confirmed (ms).")

    def _ended(self, order_ids: list[str]) -> None:
        """The core ended these orders: sync the journal, then answer their clients."""
        self.recorder.flush()  # writes the round's hold commits and syncs: an award is on disk before anyone hears
        now = time.perf_counter()
        with self._lock:
            for oid in order_ids:
                answer = self.index.answer(oid)
                if answer is None:
                    continue
                self._open -= 1
                self.metrics.inc("orders_ended_total", status=answer["status"], reason=answer["reason"] or "")
                waiter = self._waiters.pop(oid, None)
                if waiter is None:  # resumed from the journal after a restart: nobody waits here
                    continue
                fut, accepted, key = waiter
                if key is not None:
                    self.idem.release(key)
                self.metrics.observe_ms("order_latency_ms", (now - accepted) * 1000.0,
                                        help="Order accepted to its answer ready, rounds and retries included (ms).")
                if not fut.done():
                    fut.set_result(answer)

    # -- requests --------------------------------------------------------------------------
    def market_now(self) -> float:
        """Market seconds: wall seconds since the journal's epoch (UTC midnight of its first day)."""
        return self.wall() - self.epoch

    def place(self, order: OrderIn, digest: str, key: str | None) -> Placed:
        """Accepts an order (or finds the answer its key already has).

        Raises:
            DeskError: 409 / 422 for a key conflict or a bad order, 503 when overloaded.
        """
        if not self.host.alive:  # before the key: a dead desk's claims are not in flight
            raise DeskError(503, "the auctioneer is not running", retry_after_s=5)
        with self._lock:
            stored = None
            if key is not None:
                try:
                    stored = self.idem.begin(key, digest)
                except IdempotencyConflict as err:
                    raise DeskError(err.status, err.detail) from None
            if stored is None:
                try:
                    return self._accept(order, digest, key)
                except BaseException:
                    if key is not None:
                        self.idem.release(key)
                    raise
        self._on_disk(stored)
        return Placed(str(stored["order_id"]), answer=stored)

    def _on_disk(self, answer: dict[str, Any] | None) -> None:
        """Syncs the journal before an ended order's answer goes out, if it may not be synced
        yet: the index shows an award as its record is appended, and `_ended` syncs only
        after. Called without the desk's lock (the writer's lock comes first)."""
        if answer is not None and answer["status"] != PENDING and self.recorder.writer.unsynced:
            if not self._synced():
                raise DeskError(503, "the journal cannot be synced now (the desk is restarting); retry",
                                retry_after_s=5)

    def _accept(self, body: OrderIn, digest: str, key: str | None) -> Placed:
        if self._open >= self.cfg.max_open_orders:
            self.metrics.inc("orders_shed_total")
            raise DeskError(503, f"overloaded: {self._open} orders in the market; retry shortly", retry_after_s=1)
        self._check(body)
        oid = body.order_id or self._new_id()
        if self.index.knows(oid) or oid in self._waiters:
            raise DeskError(409, f"order_id {oid} already exists")
        order = body.to_order(oid, self.market_now(), self.cfg.reserve_base, self.cfg.reserve_share)
        fut: Future[dict[str, Any]] = Future()
        self._waiters[oid] = (fut, time.perf_counter(), key)
        self._open += 1
        self.recorder.tag_order(oid, idempotency_key=key, body_hash=digest)
        self.host.submit([order])
        return Placed(oid, future=fut)

    def _new_id(self) -> str:
        while True:
            self._next += 1
            oid = f"o-{self.segment}-{self._next:07d}"
            if not self.index.knows(oid) and oid not in self._waiters:  # a client may have chosen it
                return oid

    def _check(self, body: OrderIn) -> None:
        """What the request model cannot know: the catalogue and the service area."""
        known = self.host.core.engine.sku_index  # the engine's catalogue, built once with its fleet
        for i, item in enumerate(body.items):
            if item.sku not in known:
                raise DeskError(422, f"items.{i}.sku: unknown SKU {item.sku!r} (not in the fleet's catalogue)")
        x, y = self.host.core.engine.fleet.env.grid.to_km(body.destination.lat, body.destination.lon)
        reach = self.fleet_cfg.city.size_km / 2.0 + SERVICE_MARGIN_KM  # x/y are km from the city centre
        if abs(float(x)) > reach or abs(float(y)) > reach:
            raise DeskError(422, f"destination: outside the service area ({float(x):.1f}, {float(y):.1f}) km "
                                 f"from the city centre")

    def sync(self, order_id: str, timeout_s: float = 30.0) -> bool:
        """Syncs the journal once it holds the order: a 202 says the order is accepted, and
        only the journal makes that survive a crash. The round loop writes the order when
        it takes it in, which a long round may delay past the answer's timeout.

        Returns:
            False when the loop stopped, or did not take the order in `timeout_s` (it is
            then taken back out of the inbox, so it is not traded later either), or the
            journal closed with it unsynced: the order is not known to be on disk, and the
            client must not be told it was accepted.
        """
        end = time.monotonic() + timeout_s
        while True:
            stopped = not self.host.alive  # read first: a loop journals an order before it can die
            with self._lock:
                journaled = self.index.knows(order_id)
            if journaled:
                return self._synced()
            if stopped:
                return False
            if time.monotonic() >= end:
                if self._withdraw(order_id):
                    return False
                end = time.monotonic() + timeout_s  # taken in just now: it is being journaled
            time.sleep(0.005)

    def _withdraw(self, order_id: str) -> bool:
        """Takes back an order the loop has not taken in, as if it had never been placed:
        its key is free again, and it no longer counts as open."""
        with self._lock:
            if not self.host.withdraw(order_id):
                return False
            waiter = self._waiters.pop(order_id, None)
            self._open -= 1
            if waiter is not None and waiter[2] is not None:
                self.idem.release(waiter[2])
            self.recorder.untag_order(order_id)
            return True

    def _synced(self) -> bool:
        """Syncs the journal. On a journal closed meanwhile (the keeper restarted this desk)
        or one that failed: whether what it holds was synced before."""
        writer = self.recorder.writer
        try:
            writer.flush()
        except (ValueError, OSError):  # closed, or failed (JournalError is a ValueError)
            return not writer.unsynced
        return True

    def order(self, order_id: str) -> dict[str, Any] | None:
        """The order, its answer and its timeline, or None (unknown, or past `retain_orders`)."""
        with self._lock:
            detail = self.index.detail(order_id)
        self._on_disk(detail)
        return detail

    def strategy(self) -> dict[str, Any]:
        """The profile in force (as the journal has it) and the profiles a switch may name."""
        with self._lock:
            name = self.index.profile
        return {"profile": name, "known": sorted(load_profiles())}

    def set_profile(self, name: str, timeout_s: float = 10.0) -> dict[str, str]:
        """Switches the scoring profile between two rounds, journaled."""
        try:
            profile = load_profile(name)
        except ConfigError:
            known = ", ".join(sorted(load_profiles()))
            raise DeskError(422, f"profile: unknown profile {name!r} (known: {known})") from None

        def switch(core: AuctioneerCore) -> str:
            previous = self.index.profile
            self.recorder.profile_changed(name, core.market.now(core.clock()))  # journaled, then live
            core.engine.profile = profile
            return previous

        try:
            previous = self._on_loop(switch, timeout_s)
        except DeskError:
            raise
        except Exception as err:  # noqa: BLE001 - the journal refused it: nothing switched
            logger.exception("the switch to profile %s could not be journaled", name)
            raise DeskError(503, f"the switch to {name} could not be journaled ({type(err).__name__}); the "
                                 "profile is unchanged; retry", retry_after_s=5) from None
        if not self._synced():
            raise DeskError(503, f"switched to {name}, but the journal cannot be synced, so a restart may "
                                 "not keep it; retry", retry_after_s=5)
        return {"profile": name, "previous": previous}

    def _on_loop(self, fn: Callable[[AuctioneerCore], Any], timeout_s: float) -> Any:
        """`fn(core)` run on the round loop between two steps (`AuctioneerHost.run_on_loop`).

        Raises:
            DeskError: 503 when the loop is not running, ends before it gets to `fn`, or
                has not started `fn` within `timeout_s`; `fn` then never runs, so the
                caller was told the truth.
        """
        try:
            return self.host.run_on_loop(fn, timeout_s)
        except LoopEnded as err:
            raise DeskError(503, str(err), retry_after_s=5) from None
        except LoopBusy as err:
            raise DeskError(503, str(err), retry_after_s=1) from None

    # -- health and metrics ----------------------------------------------------------------
    def health(self, timeout_s: float = 2.0) -> tuple[bool, dict[str, Any]]:
        """Whether the auctioneer runs and enough bidders answer; and the facts."""
        bidders = self.host.core.bidders
        pings = getattr(bidders, "ping", None)
        alive = pings(timeout_s) if pings is not None else {a.agent_id: True for a in bidders.agents}
        up = sum(alive.values())
        quarantined = bidders.quarantined() if hasattr(bidders, "quarantined") else []
        ok = self.host.alive and up > 0
        with self._lock:
            facts = {"open_orders": self._open, "orders": len(self.index),
                     "orders_forgotten": self.index.forgotten, "rounds": self.index.rounds,
                     "profile": self.index.profile, "segment": self.segment}
        files, size = self.recorder.writer.footprint()
        facts["journal"] = {"files": files, "bytes": size}
        facts["index"] = {**self.rebuilt.facts(), "checkpoints_written": self.checkpoints.written}
        return ok, {"status": "ok" if ok else "degraded", "auctioneer": "running" if self.host.alive else "stopped",
                    "bidders": {"total": len(alive), "answering": up, "quarantined": quarantined,
                                "silent": sorted(k for k, v in alive.items() if not v)}, **facts}

    def metrics_text(self, timeout_s: float = 5.0) -> str:
        """Prometheus text: counters fed by the journal, plus gauges read now."""
        m = self.metrics
        gauges: dict[str, float] = {}
        try:
            util = self._on_loop(lambda core: core.engine.utilization(core.market.now(core.clock())), timeout_s)
            per_kind: dict[str, list[float]] = {}
            for kind, u in util:
                per_kind.setdefault(str(kind), []).append(u)
            gauges = {kind: sum(v) / len(v) for kind, v in per_kind.items()}
        except Exception as err:  # noqa: BLE001 - a scrape still answers without the gauge
            logger.warning("utilization unavailable: %s", err)
        bidders = self.host.core.bidders
        totals = dict(getattr(bidders, "totals", {}))
        channels = len(getattr(bidders, "channels", {}))
        channel_events = dict(getattr(bidders, "channel_events", {}))
        files, size = self.recorder.writer.footprint()
        with self._lock:
            m.set("open_orders", float(self._open), help="Orders accepted and not yet ended.")
            m.set("orders_kept", float(len(self.index)),
                  help="Orders GET /orders/{id} and their idempotency keys still answer (retain_orders).")
            m.set_total("orders_forgotten_total", float(self.index.forgotten),
                        help="Ended orders past retain_orders: no longer answered; the journal still has them.")
            m.set("journal_files", float(files), help="Files of the journal (journal_rotate_mb starts a new one).")
            m.set("journal_bytes", float(size), help="Bytes of the journal, every file, the unsynced tail included.")
            for ms in gc_pauses.take_pauses():
                m.observe_ms("gc_full_pause_ms", ms, help="Pauses of this process's full garbage collections.")
            m.set("gc_frozen_objects", float(gc_pauses.frozen()),
                  help="Objects the full collections no longer walk (runtime/gc_pauses.py).")
            for kind, u in gauges.items():
                m.set("utilization", u, help="Time-averaged utilization by kind.", kind=kind)
            for what, n in sorted(totals.items()):
                m.set_total("bidder_calls_total", float(n), help="Bidder call outcomes since start, by outcome.",
                            outcome=what)
            m.set("bidder_channels", float(channels),
                  help="Bidders reached over a direct channel now; the others get Ray calls (runtime/channel.py).")
            for event in ("opened", "broken"):
                m.set_total("bidder_channel_events_total", float(channel_events.get(event, 0)),
                            help="Bidder channels opened and broken since start.", event=event)
            return m.render()

    def close(self) -> None:
        """Stops the round loop and closes the journal. The rounds in flight are settled
        first, so their orders end and their clients get answers; orders still queued get
        none and stay open, for the next start to trade.

        A rotating journal whose last file has grown past a sixteenth of a full one starts
        its next file first, so the index is checkpointed as it ends and the next start
        reads no record. Below that, reading the file costs a start about a second at most
        (16 MB at the default size), and stops do not pile up small files. A crash leaves
        the last rotation's checkpoint and one file to read."""
        self.host.stop(drain=True)
        try:
            limit = self.cfg.journal_rotate_bytes
            if limit is not None:
                self.recorder.writer.rotate(min_bytes=limit // STOP_ROTATES_AT)
        except Exception:  # noqa: BLE001 - the journal stays whole; the next start reads more of it
            logger.exception("the journal could not start a new file at shutdown")
        self.recorder.close()
        self.checkpoints.close()
        if self._local:
            self.save_fleet()

    def save_fleet(self, state_dir: str | None = None) -> None:
        """Saves the bidders' state beside the closed journal for the next start
        (`serve.fleet_state`): the bidder actors' snapshots in `state_dir` (once the actors
        are stopped), or the agents run in this process. Only once the round loop has
        ended, which may still commit otherwise; a failure costs only the carry-over."""
        if self.host.alive or (state_dir is None and not self._local):
            return
        journal, fingerprint = Path(self.cfg.journal), self._fingerprint()
        try:
            saved = save_fleet(state_dir, journal, fingerprint) if state_dir else \
                save_agents(self._agents(), self._specs(), journal, fingerprint)
            logger.info("saved the state of %d bidders beside the journal for the next start", saved)
        except Exception:  # noqa: BLE001 - the stop goes on
            logger.exception("the bidders' state could not be saved: the next start begins with a new fleet")

    @property
    def _local(self) -> bool:
        return isinstance(self.host.core.bidders, LocalBidders)

    def _agents(self) -> list[Agent]:
        return self.host.core.engine.fleet.agents

    def _specs(self) -> list[AgentSpec]:
        # the agents' own specs, with a strategy that loads nothing: the in-process bidders
        # bid through LocalBidders' strategy, and a carried spec's strategy is never used
        return fleet_specs(self.fleet_cfg, self.cfg.seed, "cost")

    def _fingerprint(self) -> str:
        return fleet_fingerprint(self.fleet_cfg, self.cfg.seed)


def ended_kept_live(batch: BatchCfg) -> int:
    """How many ended orders the index keeps as live views: a round's hold records come
    after its orders have ended, with the other rounds in flight between (twice that)."""
    return max(HOT_ENDED, 2 * batch.max_batch * batch.max_rounds_per_call * batch.in_flight)


def _carried_as_told(origin: FleetOrigin, handles: dict[str, Any]) -> FleetOrigin:
    """The origin as the bidders themselves report it: one whose carried snapshot did not
    load started new (its actor logged why), and the answer says so."""
    import ray

    states = ray.get([h.state.remote() for h in handles.values()], timeout=60)
    return as_taken(origin, {s["agent_id"] for s in states if s["carried"]})


class SpawnedFleet(NamedTuple):
    """A service's bidder actors, their snapshot dir, and where their state came from."""

    handles: dict[str, Any]
    state_dir: str
    origin: FleetOrigin


def spawn_fleet(cfg: ServeCfg) -> SpawnedFleet:
    """Starts one bidder actor per resource of the fleet, on the state saved at the last
    stop where the journal ends with it (`serve.fleet_state`), else new."""
    from runtime.ray_bidders import spawn_bidders

    run_prefix = os.environ.get(FLEET_DIR_PREFIX_ENV)
    state = tempfile.mkdtemp(prefix=run_prefix or FLEET_DIR_PREFIX, dir=default_state_root())
    try:
        fleet = load_fleet(cfg.fleet)
        fingerprint = fleet_fingerprint(fleet, cfg.seed)
        claim_state_dir(state, fingerprint, run_prefix, Path(cfg.journal))
        origin = carry_fleet(Path(cfg.journal), fingerprint, state)
        handles = spawn_bidders(fleet_specs(fleet, cfg.seed, cfg.policy), state_dir=state)
        if origin.carried:
            origin = _carried_as_told(origin, handles)
        logger.info("bidder fleet: %s", origin.why)
        return SpawnedFleet(handles, state, origin)
    except BaseException:
        shutil.rmtree(state, ignore_errors=True)
        raise
