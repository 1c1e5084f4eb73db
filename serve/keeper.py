"""Keeps a replica's order desk running: a desk whose round loop died is restarted in place.

A round loop dies on an exception inside a round: a bug, or a journal that cannot be
written. Its orders then wait for nothing, and their idempotency keys stay in flight
(409) until someone restarts the service. The keeper does that restart itself, inside the
replica: it closes the dead desk (its journal synced), stops its bidder fleet (its state
saved beside the journal), and starts a fleet on that state and a desk on the same
journal, exactly as a restart of the whole service would.
The new desk answers for the orders the old one ended and trades again the ones it left
open. While it starts (seconds), requests get the dead desk's 503 with ``Retry-After``.

An order whose round always fails (a poison order) would take every new desk down in
turn. So the keeper counts, per order, the rounds that died with it in them (not those
that died of the machine: a full disk is nobody's order), and the new desk trades those
orders in rounds of their own, then gives up one whose own round died too: it ends
unfulfilled, reason ``round_failed`` (`serve.desk.DROP_AFTER_FAILED_ROUNDS`). The counts
live in the replica's memory: a restart of the whole service starts them again.

Why not Serve's own health check, which would replace the replica: on the embedded
cluster the replica itself listens on the service's one port (direct ingress), and Serve
2.60 gave a replacement replica no port (`NoAvailablePortError`) while the old one was
still stopping, and held the port back after that (a 150 s quarantine, then a block once a
start had failed on it). Restarting inside the replica keeps the port, and the restart is
the same code path a whole-service restart is tested with.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from runtime import gc_pauses
from serve.config import ServeCfg
from serve.desk import OrderDesk, SpawnedFleet, spawn_fleet

logger = logging.getLogger("bidhive.serve")

#: How often the keeper looks at the round loop; how long a desk must have run for its
#: death to be restarted at once; the waits before restarting one that died sooner, and
#: between failed restarts (doubling from the first to the last).
WATCH_PERIOD_S = 0.5
STABLE_S = 60.0
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 60.0


class DeskKeeper:
    """Owns the replica's desk and its bidder fleet, and restarts them when the round loop dies.

    A desk that dies again within `STABLE_S` of its start (an order whose round always
    fails, say) is restarted only after a wait that doubles each time, up to `RETRY_MAX_S`:
    the service stays up, answering 503 for new orders, and the log says why each time.

    Args:
        cfg: the service settings (the same for every desk it starts).
        fleet: starts the bidder fleet; None runs the agents in-process.
        watch_period_s: how often the watchdog thread looks at the round loop.
    """

    def __init__(self, cfg: ServeCfg,
                 fleet: Callable[[ServeCfg], SpawnedFleet] | None = spawn_fleet,
                 watch_period_s: float = WATCH_PERIOD_S) -> None:
        self.cfg = cfg
        self._fleet = fleet if cfg.bidders == "ray" else None
        self.restarts = 0
        self.desk, self._state_dir = self._start()
        self._started_at = time.monotonic()
        self._running = True  # the current desk and fleet are not stopped yet
        self._swap = threading.Lock()  # `_running` and the desk change together, also against `close`
        self._quit = threading.Event()
        self._period_s = watch_period_s
        self._thread = threading.Thread(target=self._watch, name="desk-keeper", daemon=True)
        self._thread.start()

    def _start(self, failed_rounds: dict[str, int] | None = None) -> tuple[OrderDesk, str | None]:
        handles, state, origin = self._fleet(self.cfg) if self._fleet is not None else (None, None, None)
        try:
            return OrderDesk(self.cfg, handles, failed_rounds=failed_rounds, fleet_origin=origin), state
        except Exception:  # an interrupt ends the process, and the actors with their owner
            _stop_fleet(handles, state)
            raise

    def _watch(self) -> None:
        retry_s = RETRY_FIRST_S
        failed_rounds: dict[str, int] | None = None  # the dead desk's, once counted
        while not self._quit.wait(self._period_s):
            failure = self.desk.host.failure
            if failure is None:
                continue
            if failed_rounds is None:
                failed_rounds = _count_failed_round(self.desk)
            if time.monotonic() - self._started_at >= STABLE_S:
                retry_s = RETRY_FIRST_S
            else:  # it died soon after a start: do not restart it in a tight loop
                logger.error("the round loop died again (%s); restarting the desk in %g s", failure, retry_s)
                if self._quit.wait(retry_s):
                    return
                retry_s = min(2.0 * retry_s, RETRY_MAX_S)
            logger.error("the round loop died (%s): restarting the desk on %s", failure, self.cfg.journal)
            try:
                self._restart(failed_rounds)
                failed_rounds = None
            except Exception:  # noqa: BLE001 - logged; the dead desk keeps answering 503 meanwhile
                logger.exception("the desk did not restart; trying again")
                self._started_at = time.monotonic()  # so the next try waits (above)

    def _restart(self, failed_rounds: dict[str, int]) -> None:
        with self._swap:
            if self._running:  # a retry after a failed start finds the old desk stopped already
                self._running = False
                _stop_desk(self.desk, self._state_dir)
        desk, state = self._start(failed_rounds)
        with self._swap:
            if self._quit.is_set():  # `close` ran while this desk started: nobody else stops it
                _stop_desk(desk, state)
                return
            self.desk, self._state_dir, self._running = desk, state, True
            self._started_at = time.monotonic()
        gc_pauses.refreeze()  # the old desk's cycles were frozen with the process: walk them once
        self.restarts += 1  # counted once the restart is complete (only this thread writes it)
        logger.warning("desk restarted (%d so far): resuming the orders the journal holds open", self.restarts)

    def close(self) -> None:
        """Stops the watchdog, then the desk (journal closed) and its fleet; idempotent.

        It does not wait for a restart in progress (starting a fleet waits on Ray, which may
        be going down too): that restart stops its own desk once it has one (`_restart`)."""
        self._quit.set()
        self._thread.join(timeout=1.0)
        with self._swap:
            if self._running:
                self._running = False
                _stop_desk(self.desk, self._state_dir)


def _count_failed_round(desk: OrderDesk) -> dict[str, int]:
    """The dead desk's counts of failed rounds per order, with the round it died in added.

    A round of several orders makes each of them a suspect (a count of 1) and no more:
    only a round an order had to itself counts past that, so an order is given up only
    once a round of its own has died too.
    """
    counts, blamed = dict(desk.failed_rounds), desk.host.blamed
    for oid in blamed:
        counts[oid] = counts.get(oid, 0) + 1 if len(blamed) == 1 else max(counts.get(oid, 0), 1)
    if blamed:
        logger.error("the round that failed held %d orders: %s", len(blamed), ", ".join(blamed[:8]))
    return counts


def _stop_desk(desk: OrderDesk, state_dir: str | None) -> None:
    """Closes the desk, stops its fleet and, where the desk closed cleanly, saves the fleet's
    state beside the journal for the next start (`serve.fleet_state`)."""
    closed = False
    try:
        desk.close()
        closed = True
    except Exception:  # noqa: BLE001 - the journal lock is released whatever close raised
        logger.exception("the desk did not close cleanly")
    kill = getattr(desk.host.core.bidders, "kill_all", None)  # Ray bidders (and their channels)
    try:
        if kill is not None:
            kill()
        if closed and state_dir:
            desk.save_fleet(state_dir)
    finally:
        _stop_fleet(None, state_dir)


def _stop_fleet(handles: dict[str, Any] | None, state_dir: str | None) -> None:
    """Kills bidder actors (no restart) and removes the fleet's snapshot dir."""
    try:
        if handles:
            import ray

            for handle in handles.values():
                ray.kill(handle, no_restart=True)
    finally:
        if state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)
