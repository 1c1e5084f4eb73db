"""The journal in bursts, for a run whose bidders all live in the journal's own process.

A `JournalRecorder` called once a hook costs a simulation about 1.6 times what the same
calls cost made back to back: between two rounds the simulation evicts the journal's code
and data from the caches (`bench.journal_ablation`). `BatchedRecorder` keeps a run's hook
calls and plays them into the journal a burst at a time, in the order they were made, so
the file holds the same records, byte for byte, as when every hook writes at once.

Only for a run where nobody outside the process can act on a round before its records
are written: ``bidhive simulate`` with in-process bidders. A crash there takes the
bidders with it, and loses at most one burst more than ``interval`` fsync already could.
A shell whose bidders or clients are elsewhere (Ray, the HTTP service) writes each
record at once, so an award is in the journal before anyone hears of it.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from market.book import QuoteBook
from market.clearing import Allocation
from market.journal import FsyncPolicy
from market.journal_recorder import JournalRecorder
from market.round import Round
from market.types import Order, Quote

__all__ = ["BURST_CALLS", "BatchedRecorder", "simulation_journal"]

BURST_CALLS = 320
"""Hook calls kept before a burst: about 80 single-order rounds (four hook calls, about
five records each; some 30 ms of a `weekday` simulation, more for slower rounds).
Measured in place (the `bench.journal_ablation` estimator), 320 calls took the journal's
cost to a simulation from about 10.2% to 7.7%; 32 calls gave 9.1%, and 640 or 1,280 gave
about 9% (the kept rounds no longer stay in the caches)."""


class BatchedRecorder:
    """A `Recorder` that hands its calls to a `JournalRecorder` in bursts of `BURST_CALLS`.

    The calls' arguments are kept as they were passed, not copied: the simulator and the
    engine never change what they have told a recorder of (a round, its quotes, book,
    allocation, facts, the lists of a hook call; the engine copies an allocation before
    taking back a refused award). `tests/test_journal_batch.py` holds them to it: the
    journal in bursts is byte-identical to the journal written at once.

    A burst that fails (a full disk, a value the codec rejects) raises from the hook call
    that started it, and the calls after the failing one are dropped, so the journal
    stays a prefix of the run with no record missing in its middle.

    Args:
        journal: The recorder the calls go to; closed by `close`.
        burst_calls: Calls kept before a burst.
    """

    def __init__(self, journal: JournalRecorder, burst_calls: int = BURST_CALLS) -> None:
        if burst_calls < 1:
            raise ValueError(f"burst_calls must be at least 1, got {burst_calls}")
        self.journal = journal
        self.burst_calls = burst_calls
        self._calls: list[tuple[Callable[..., None], tuple[Any, ...]]] = []

    def _keep(self, hook: Callable[..., None], args: tuple[Any, ...]) -> None:
        calls = self._calls
        calls.append((hook, args))
        if len(calls) >= self.burst_calls:
            self._burst()

    def _burst(self) -> None:
        """Plays the kept calls in order; after a failure the rest are dropped.

        Ctrl-C or SIGTERM (`KeyboardInterrupt`) in the middle puts the calls not yet
        written back, for `close` to write: a call counts as written once the journal's
        ``seq`` has moved since the call before it.
        """
        writer = self.journal.writer
        done, seq = 0, writer.next_seq
        calls, self._calls = self._calls, []
        try:
            for hook, args in calls:
                hook(*args)
                done, seq = done + 1, writer.next_seq
        except KeyboardInterrupt:
            self._calls = calls[done + (writer.next_seq != seq):]
            raise

    def run_started(self, info: dict[str, Any]) -> None:
        """Written at once: it checks the run can be journaled at all."""
        self._burst()
        self.journal.run_started(info)

    def order_received(self, order: Order, now: float) -> None:
        """Kept for the next burst."""
        self._keep(self.journal.order_received, (order, now))

    def round_opened(self, rnd: Round, attempts: list[int]) -> None:
        """Kept for the next burst."""
        self._keep(self.journal.round_opened, (rnd, attempts))

    def round_cleared(self, rnd: Round, quotes: list[Quote], book: QuoteBook, alloc: Allocation,
                      facts: dict[str, Any]) -> None:
        """Kept for the next burst."""
        self._keep(self.journal.round_cleared, (rnd, quotes, book, alloc, facts))

    def holds_settled(self, round_id: int, committed: dict[str, list[str]], released: list[str], now: float,
                      refused: list[str], refused_by: dict[str, list[str]] | None = None,
                      cancelled: dict[str, list[str]] | None = None) -> None:
        """Kept for the next burst."""
        self._keep(self.journal.holds_settled, (round_id, committed, released, now, refused, refused_by, cancelled))

    def profile_changed(self, name: str, now: float) -> None:
        """Kept for the next burst."""
        self._keep(self.journal.profile_changed, (name, now))

    def flush(self) -> None:
        """Writes the kept calls and syncs the journal (per its fsync policy)."""
        self._burst()
        self.journal.flush()

    def close(self) -> None:
        """Writes the kept calls, then syncs and closes the journal; idempotent."""
        try:
            self._burst()
        finally:
            self.journal.close()


def simulation_journal(path: str | os.PathLike[str], fsync: FsyncPolicy = "interval") -> BatchedRecorder:
    """The journal `bidhive simulate` writes with in-process bidders (the benches measure this one)."""
    return BatchedRecorder(JournalRecorder(path, fsync=fsync))
