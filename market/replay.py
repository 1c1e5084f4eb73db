"""Replay: re-clear every journaled round without the bidders, verify it, ask what-if.

A journal written by `market.journal_recorder.JournalRecorder` holds each round's
orders (``order_received`` + ``round_opened``) and quotes (``round_cleared``), so a
round can be rebuilt and cleared again with the very functions the live run used:
`market.round.build_round`, and `market.clearing.clear_round` (``build_book`` and the
mechanism's ``allocate``). Nothing here re-implements clearing: a round's quotes are
decoded straight into the flat columns `build_book` scores (`QuoteColumns`, the
journal's own layout), which is all replay does differently from the engine.

Most rounds of a quiet market hold one order, and such a round's clearing time is a
fixed cost per NumPy call and per Python object, not arithmetic. So replay reads
``CHUNK_ROUNDS`` rounds ahead and re-clears a chunk's one-order rounds as columns
(`market.replay_columns`: the engine's join, scores and winner rule over many rounds per
call); a round the columns cannot vouch for (a tie on score, a winner without capacity,
anything unusual) and every round of a chunk in which they find a difference take the
per-round path, in journal order, so reports are the per-round pass's to the byte.

- `verify` re-clears with the logged mechanism and profile and compares every award,
  payment, score and predicted delivery bit for bit with the logged result.
- `replay` does that and computes KPIs for the logged and the re-cleared outcome;
  with another profile or payment rule it also re-clears a *what-if* and reports its
  KPIs next to the logged ones. ``workers=N`` shares the re-clearing of a verify
  among N processes; the report is the one-process report.
- `explain` lists every quote combination of one order, its score and feasibility,
  and why the winner won.

What-if replays are counterfactual only in the clearing: the bidders' quotes and the
retry schedule are the logged ones. An order the what-if serves earlier than the live
run did is dropped from its later rounds; an order the what-if leaves unserved is only
tried again if the live run tried it again (replay cannot ask bidders for new quotes).

KPIs count each order once, by its final outcome (awarded in some round, or never):
a retried order appears in several rounds, so a per-round award rate
(``round_award_rate``, awards / order slots in rounds) is lower than
``fulfilled_rate`` (awarded orders / orders received) whenever retries happen.
"""
from __future__ import annotations

import copy
import math
import multiprocessing
import os
import struct
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import compress, islice
from pathlib import Path
from typing import Any

import numpy as np

from market.book import CategoryTable, QuoteBook, QuoteColumns
from market.catalogue import Catalogue
from market.clearing import PAYMENT_RULES, Allocation, Mechanism, ScoringAuction, clear_round, priority_sequence
from market.config import CatalogueCfg, ProfileCfg
from market.engine import COMMIT_REFUSED
from market.geo import CityGrid
from market.journal import JournalReader, TornTailWarning
from market.journal_recorder import JOURNAL_SCHEMA, RESERVE_CAP_SCHEMA, award_arrays, versions
from market.replay_columns import BidderRows, OneOrderColumns
from market.round import Round, SourceSites, build_round
from market.types import LEG_KINDS, Category, Item, Kind, LegQuote, Order, Quote, SourceQuote, Tier
from policies.static import StaticRule

__all__ = [
    "JournalReplay",
    "LoggedRound",
    "Mismatch",
    "ReplayError",
    "ReplayReport",
    "ReplayRound",
    "RunHeader",
    "explain",
    "make_mechanism",
    "replay",
    "verify",
]

Progress = Callable[[int, int | None], None]
_F64 = struct.Struct("<d")

AWARD_INT_FIELDS = ("winner", "source", "leg")
AWARD_FLOAT_FIELDS = ("src_payment", "leg_payment", "score", "delivery_s")
TIMING_KEYS = ("p50_clear_ms", "p99_clear_ms")
_REBUILT_ROUNDS = 1024  # rounds kept for their retries: a retry comes within minutes of the market clock
CHUNK_ROUNDS = 128  # rounds read ahead and re-cleared as columns together: NumPy's fixed cost per call, shared
_NOTHING_TO_REPLAY = frozenset(("hold_committed", "hold_released"))  # counted, nothing more
_HEARD = frozenset(("order_received", "order_dropped", "run_started"))  # records with an event (`ReadStep.events`)
_BY_COLUMNS = "auction/greedy/first_score"  # the mechanism whose one-order rounds clear as columns


class ReplayError(ValueError):
    """A journal that cannot be replayed, or a replay request that makes no sense (one line)."""


# --------------------------------------------------------------------------- the journal


@dataclass(frozen=True)
class RunHeader:
    """What ``run_started`` says about the run: who bids, where, how rounds clear."""

    seed: int | None
    policy: str | None
    mechanism: str
    profile_name: str
    profile: ProfileCfg | None
    bidder_ids: tuple[str, ...]
    kinds: dict[str, Kind]
    categories: CategoryTable
    sources: SourceSites
    grid: CityGrid
    sku_index: dict[str, int]
    versions: dict[str, str]
    config: dict[str, Any]
    expected_orders: int | None
    schema: int

    @cached_property
    def index(self) -> dict[str, int]:
        """Bidder id to its row in the bidder table: the rows the journaled awards name."""
        return {b: i for i, b in enumerate(self.bidder_ids)}

    @cached_property
    def clearing(self) -> Mechanism:
        """The mechanism the run cleared its rounds with."""
        return make_mechanism(self.mechanism, schema=self.schema)

    @cached_property
    def leg_labels(self) -> tuple[str, ...]:
        """Per bidder row, the name of its kind, as KPIs count awards by it ('unknown': the run did not say)."""
        return tuple(k.value if (k := self.kinds.get(b)) is not None else "unknown" for b in self.bidder_ids)

    @cached_property
    def bidder_rows(self) -> BidderRows:
        """The bidder table's lookups for re-clearing rounds as columns."""
        return BidderRows.of(self.bidder_ids, self.index, self.categories)


@dataclass(slots=True)
class LoggedResult:
    """A round's result as journaled (or as re-cleared, in the same layout)."""

    award_i: np.ndarray  # [3, n] int: winner combination, source row, leg row (-1: none)
    award_f: np.ndarray  # [4, n] float64: src_payment, leg_payment, score, delivery_s
    reason: tuple[str, ...]
    total_cost: float

    @property
    def won(self) -> np.ndarray:
        """Per order: awarded?"""
        return self.award_i[0] >= 0


@dataclass(slots=True)
class LoggedRound:
    """One journaled round as logged: its orders and result, all the logged KPIs need."""

    seq: int  # of its round_cleared record
    round_id: int
    opened_s: float
    orders: tuple[Order, ...]
    attempts: list[int]
    profile: ProfileCfg
    profile_name: str
    logged: LoggedResult
    facts: dict[str, Any]


@dataclass(slots=True)
class ReplayRound(LoggedRound):
    """One journaled round, rebuilt to be cleared again: its Round and quotes too."""

    rnd: Round
    quotes: QuoteColumns


def _float_bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _f64(x: float) -> bytes:
    """The 8 bytes of a float64, so -0.0 and NaN payloads compare exactly."""
    return _F64.pack(x)


_TIERS = {t.value: t for t in Tier}  # a dict lookup costs a fraction of Tier(value)
_CATEGORIES = {c.value: c for c in Category}


def order_from_record(rec: dict[str, Any]) -> Order:
    """The `Order` an ``order_received`` record journaled (bit for bit: floats are float64)."""
    return Order(
        order_id=rec["order_id"], created_s=rec["created_s"], customer_id=rec["customer_id"],
        tier=_TIERS[rec["tier"]], channel=rec["channel"], items=tuple([Item(s, q) for s, q in rec["items"]]),
        lat=rec["lat"], lon=rec["lon"], promise_s=rec["promise_s"], value=rec["value"],
        category=_CATEGORIES[rec["category"]], locker_ok=rec["locker_ok"], reserve=rec["reserve"],
    )


def _sites(d: dict[str, Any]) -> SourceSites:
    """Source sites from their journaled fields (lists back to tuples)."""
    return SourceSites(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _header(rec: dict[str, Any]) -> RunHeader:
    """Parses ``run_started``; a journal without what replay needs is a ReplayError."""
    try:
        bidders, sources, grid = rec["bidders"], rec["sources"], rec["grid"]
        ids = tuple(bidders["ids"])
        kinds = {b: Kind(k) for b, k in zip(ids, bidders["kinds"])}
        masks = np.asarray(bidders["category_ok"], dtype=bool)
        if masks.ndim != 2 or len(masks) != len(ids):
            raise ValueError(f"a bidder table of {len(ids)} ids with category masks shaped {masks.shape}")
        categories = CategoryTable.from_masks({b: masks[i] for i, b in enumerate(ids)})
        profile = ProfileCfg.model_validate(rec["profile"]) if rec.get("profile") is not None else None
        config = rec.get("config") or {}
        sku_index: dict[str, int] = {}
        fleet = config.get("fleet")
        if isinstance(fleet, dict) and "catalogue" in fleet:
            sku_index = Catalogue.build(CatalogueCfg.model_validate(fleet["catalogue"])).index
        return RunHeader(
            seed=rec.get("seed"), policy=rec.get("policy"), mechanism=str(rec.get("mechanism")),
            profile_name=str(rec.get("profile_name") or "custom"), profile=profile, bidder_ids=ids, kinds=kinds,
            categories=categories, sources=_sites(sources), grid=CityGrid(grid["origin_lat"], grid["origin_lon"]),
            sku_index=sku_index, versions=dict(rec.get("versions") or {}), config=config,
            expected_orders=config.get("orders") if isinstance(config.get("orders"), int) else None,
            schema=int(rec.get("schema", 0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ReplayError(f"run_started (seq {rec.get('seq')}) lacks what replay needs: {type(exc).__name__}: {exc}") from None


@dataclass(slots=True)
class ReadStep:
    """A round read from a journal (or the journal's end), with what reading up to it did.

    Replay reads a chunk of rounds ahead of clearing them, to clear them as columns; yet
    whatever a caller can see of the reading (``counts``, ``orders_received``, the
    ``on_order`` and ``progress`` calls, ``header``, ``segments``, a torn-tail warning,
    an error) must change as if each round were read on its turn, so that a replay
    which stops at a round reports what the per-round pass reports.
    `JournalReplay.settle` applies a step's share of it when its turn comes.

    Attributes:
        kinds: per record read since the previous step, in order, its type.
        events: what callers hear of those records, in order: per order received
            ``(order, received_s)`` (None when it was received before), per order
            dropped a `Dropped`, per run started its header.
        round: the round as logged; None at the journal's end and at an error.
        rec: its ``round_cleared`` record.
        head: its ``round_opened`` record.
        header: the run header in force for it.
        rebuild: whether it is to be cleared again (it is its shard's).
        error: what reading raised after ``kinds`` (raised when its turn comes).
        torn: at the end or an error, the reader's torn-tail warnings, to give when its turn comes.
        refused: per ``hold_released`` record read since the previous step that has
            ``refused``, a `Refused`: awards of an earlier round whose commit did not
            take, to take back from the KPIs before this step's round; and at a
            ``run_started``, those of the previous run's rounds that have no hold record.
    """

    kinds: list[str]
    events: list[Any]
    round: LoggedRound | None
    rec: dict[str, Any] | None = None
    head: dict[str, Any] | None = None
    header: RunHeader | None = None
    rebuild: bool = False
    error: Exception | None = None
    torn: list[str] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)


class JournalReplay:
    """Streams a journal and rebuilds its rounds (one pass; memory: the orders, not the rounds).

    Iterate `rounds()` (or `shard()`, or `steps()` with `settle`) once. ``counts``
    (records per type) and ``orders_received`` fill in as it goes; ``header`` is set
    once ``run_started`` has been read.

    Args:
        path: The journal's first file.
        progress: Called as ``progress(orders_received, expected_orders or None)``
            every few hundred records.
        on_order: Called with every ``(Order, received_s)`` as it is read, once per order:
            a restarted service journals again the orders it takes up, and those are
            not new orders.
        on_dropped: Called with ``(order_id, reason)`` of every ``order_dropped`` record.
    """

    def __init__(self, path: str | os.PathLike[str], progress: Progress | None = None,
                 on_order: Callable[[Order, float], None] | None = None,
                 on_dropped: Callable[[str, str], None] | None = None) -> None:
        self.path = Path(path)
        self.reader = JournalReader(self.path, defer_warnings=True)
        self.progress = progress
        self.on_order = on_order
        self.on_dropped = on_dropped
        self.header: RunHeader | None = None
        self.orders: dict[str, Order] = {}
        self.counts: Counter[str] = Counter()
        self.orders_received = 0
        self.profile: ProfileCfg | None = None  # as read, which may be ahead of the round being cleared
        self.profile_name = "custom"
        self._sources: SourceSites | None = None
        self._built: dict[tuple[int, ...], tuple[RunHeader, Round]] = {}
        self._records = 0
        self.segments = 1
        #: ``(round_id, order_id)`` of every award whose commit was refused, as settled so far,
        #: with the bidders that refused it (empty where the journal does not say; None where
        #: nobody refused: the run stopped before it journaled the commit)
        self.refused_awards: dict[tuple[int, str], list[str] | None] = {}

    def rounds(self, only_order: str | None = None) -> Iterator[ReplayRound]:
        """Every cleared round in journal order (with ``only_order``: those holding that order)."""
        for step in self._read(only_order, None):
            self.settle(step)
            if step.round is not None:
                yield self.rebuilt(step)

    def shard(self, shard: int, shards: int) -> Iterator[LoggedRound]:
        """Every cleared round in journal order, rebuilt (a `ReplayRound`) only if it is this shard's.

        Round k (0-based, in journal order) is shard ``k % shards``'s: processes that
        each take one shard re-clear every round exactly once between them.
        """
        for step in self._read(None, (shard, shards)):
            self.settle(step)
            if step.round is not None:
                yield self.rebuilt(step) if step.rebuild else step.round

    def steps(self, shard: tuple[int, int] | None = None) -> Iterator[ReadStep]:
        """Every cleared round in journal order as read, not rebuilt, then the end (or an error).

        The caller may read ahead, but must `settle` each step, in order, before it uses
        the step's round (and `rebuilt` it to clear it the per-round way).
        """
        return self._read(None, shard)

    def settle(self, step: ReadStep) -> None:
        """Applies what reading up to a step did, as if it had been read just now.

        Raises:
            Exception: What reading raised at this step (a ReplayError, a JournalError...).
        """
        progress = self.progress
        if progress is None:
            self.counts.update(step.kinds)
            self._records += len(step.kinds)
            for event in step.events:
                self._heard(event)
        else:
            events = iter(step.events)
            for kind in step.kinds:
                self.counts[kind] += 1
                if self._records % 256 == 0:
                    progress(self.orders_received, self.header.expected_orders if self.header else None)
                self._records += 1
                if kind in _HEARD:
                    event = next(events, None)  # none for a record that failed to read: an error follows
                    if event is not None:
                        self._heard(event)
        self._refused(step)
        for message in step.torn:  # the end's, or an error's: what was cut off is said either way
            warnings.warn(message, TornTailWarning, stacklevel=2)
        if step.error is not None:
            raise step.error
        if step.round is None:  # the end
            if progress is not None and self.header is not None:
                progress(self.orders_received, self.header.expected_orders)

    def settle_rounds(self, steps: list[ReadStep]) -> None:
        """`settle` of steps that each hold a round, one after the other (without ``progress``: all at once).

        Reading a round never fails once it is read, so nothing is raised here; the counts
        are the same, and callers hear of the same orders and runs in the same order.
        """
        if self.progress is not None:
            for step in steps:
                self.settle(step)
            return
        kinds = [kind for step in steps for kind in step.kinds]
        self.counts.update(kinds)
        self._records += len(kinds)
        for step in steps:
            for event in step.events:
                self._heard(event)
            self._refused(step)

    def _refused(self, step: ReadStep) -> None:
        for r in step.refused:
            self.refused_awards.update(((r.round_id, oid), None if r.never_committed else r.refused_by.get(oid, []))
                                       for oid in r.order_ids)

    def _heard(self, event: tuple[Order, float] | Dropped | RunHeader | None) -> None:
        """An order received (counted, and told to ``on_order``), one dropped, or a run started."""
        if type(event) is tuple:
            self.orders_received += 1
            if self.on_order is not None:
                self.on_order(*event)
            return
        if event is None:  # an order received again (`_other`)
            return
        if isinstance(event, Dropped):
            if self.on_dropped is not None:
                self.on_dropped(event.order_id, event.reason)
            return
        assert isinstance(event, RunHeader)
        if self.header is not None:  # a new segment
            self.segments += 1
        self.header = event

    def _read(self, only_order: str | None, shard: tuple[int, int] | None) -> Iterator[ReadStep]:
        """The one pass behind `rounds`, `shard` and `steps`; an error ends it as a step."""
        opened: dict[int, dict[str, Any]] = {}
        header: RunHeader | None = None
        kinds: list[str] = []
        events: list[Any] = []
        refused: list[Refused] = []
        unsettled: dict[int, tuple[list[str], Any]] = {}  # this segment's rounds cleared, no hold record yet
        cleared = 0
        try:
            for rec in self.reader:
                kind = rec["type"]
                kinds.append(kind)
                if kind in _NOTHING_TO_REPLAY:
                    unsettled.pop(rec.get("round_id"), None)  # type: ignore[arg-type]
                    if "refused" in rec:
                        refused.append(_refusal(rec))
                    continue
                if kind != "round_cleared":
                    if kind == "run_started" and unsettled:
                        refused.extend(_never_committed(unsettled))
                    try:
                        header = self._other(rec, kind, header, opened, events)
                    except (KeyError, TypeError, ValueError, AttributeError) as exc:
                        if isinstance(exc, ReplayError):
                            raise
                        raise ReplayError(f"malformed {kind} record at seq {rec['seq']}: "
                                          f"{type(exc).__name__}: {exc}") from None
                    continue
                if header is None:
                    raise ReplayError(f"round_cleared at seq {rec['seq']} comes before run_started")
                head = opened.pop(rec.get("round_id"), None)
                if head is None:
                    raise ReplayError(f"round {rec.get('round_id')} (seq {rec['seq']}) was cleared but never opened")
                if only_order is not None and only_order not in head["orders"]:
                    continue
                if rec.get("q_counts", (1,))[0]:  # a round nobody quoted has no hold record, and no award
                    unsettled[rec["round_id"]] = (head["orders"], rec.get("award_i"))
                rebuild = shard is None or cleared % shard[1] == shard[0]
                cleared += 1
                try:
                    rr = self._logged(rec, head)
                except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
                    if isinstance(exc, ReplayError):
                        raise
                    raise ReplayError(f"malformed round_cleared at seq {rec['seq']}: {type(exc).__name__}: {exc}") from None
                yield ReadStep(kinds, events, rr, rec, head, header, rebuild, refused=refused)
                kinds, events, refused = [], [], []
            if header is None:
                raise ReplayError(f"{self.path}: no run_started record: nothing to replay")
        except Exception as exc:  # noqa: BLE001 - raised again, unchanged, when its turn comes (`settle`)
            yield ReadStep(kinds, events, None, error=exc, torn=self.reader.take_deferred_warnings(), refused=refused)
            return
        yield ReadStep(kinds, events, None, header=header, torn=self.reader.take_deferred_warnings(), refused=refused)

    def _other(self, rec: dict[str, Any], kind: str, header: RunHeader | None,
               opened: dict[int, dict[str, Any]], events: list[Any]) -> RunHeader | None:
        """Applies a record other than round_cleared to the reading state; returns the header.

        What callers hear of it goes into ``events``, for `settle`.
        """
        if kind == "order_received":
            order = order_from_record(rec)
            again = order.order_id in self.orders  # a restarted service resumed it: not a new order
            self.orders[order.order_id] = order
            events.append(None if again else (order, rec["received_s"]))
        elif kind == "order_dropped":
            events.append(Dropped(str(rec["order_id"]), str(rec["reason"])))
        elif kind == "round_opened":
            if "sources" in rec:
                self._sources = _sites(rec["sources"])
            rec["sources_obj"] = self._sources
            opened[rec["round_id"]] = rec
        elif kind == "run_started":
            # A restarted shell continues its journal with a new run_started: a new segment
            # (new bidder table, round ids counting again); rounds still open are abandoned.
            if header is not None:
                opened.clear()
                self._built.clear()  # built with the old segment's grid and catalogue
            header = _header(rec)
            events.append(header)
            self._sources = header.sources
            self.profile, self.profile_name = header.profile, header.profile_name
        elif kind == "profile_changed":
            if rec.get("profile") is not None:
                self.profile = ProfileCfg.model_validate(rec["profile"])
            self.profile_name = str(rec.get("name") or "custom")
        return header

    def _logged(self, rec: dict[str, Any], head: dict[str, Any]) -> LoggedRound:
        """One round_cleared record as logged: all the logged KPIs and the comparison need."""
        try:
            members = tuple([self.orders[o] for o in head["orders"]])
        except KeyError as exc:
            raise ReplayError(f"round {rec['round_id']} (seq {rec['seq']}) names order {exc.args[0]}, "
                              "which was never received") from None
        if self.profile is None:
            raise ReplayError(f"round {rec['round_id']} (seq {rec['seq']}): no profile in force")
        logged = LoggedResult(rec["award_i"], rec["award_f"], tuple(rec["reason"]), rec["total_cost"])
        shapes = (getattr(logged.award_i, "shape", None), getattr(logged.award_f, "shape", None), len(logged.reason))
        if shapes != ((3, len(members)), (4, len(members)), len(members)):
            raise ReplayError(f"round {rec['round_id']} (seq {rec['seq']}): result shaped award_i {shapes[0]}, "
                              f"award_f {shapes[1]}, {shapes[2]} reasons; the round has {len(members)} orders")
        return LoggedRound(rec["seq"], rec["round_id"], float(head["opened_s"]), members, head["attempts"],
                           self.profile, self.profile_name, logged, rec.get("facts") or {})

    def rebuilt(self, step: ReadStep) -> ReplayRound:
        """A step's round rebuilt to be cleared again: its `Round` and its quotes as columns."""
        rr, rec, head, header = step.round, step.rec, step.head, step.header
        assert rr is not None and rec is not None and head is not None and header is not None
        try:
            rnd = self._rebuilt(rec["round_id"], head["opened_s"], rr.orders, head["sources_obj"], header)
            quotes = quote_columns(rec, header.bidder_ids)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            if isinstance(exc, ReplayError):
                raise
            raise ReplayError(f"malformed round_cleared at seq {rec['seq']}: {type(exc).__name__}: {exc}") from None
        return ReplayRound(rr.seq, rr.round_id, rr.opened_s, rr.orders, rr.attempts, rr.profile, rr.profile_name,
                           rr.logged, rr.facts, rnd, quotes)

    def _rebuilt(self, round_id: int, opened_s: float, members: tuple[Order, ...], sources: SourceSites,
                 header: RunHeader) -> Round:
        """The round, its arrays shared with an earlier round of the very same orders (a retry).

        A retried order comes back unchanged, so a retry round differs from the first
        only in its id and opening time, and `build_round` is most of a small round's
        rebuild. Clearing only reads a round's arrays. Keys are object ids, which stay
        valid because the cached round holds the objects (and the header it was built
        with, which must be this round's); the oldest entry goes first.
        """
        key = (id(sources), *map(id, members))
        hit = self._built.get(key)
        if hit is not None and hit[0] is header:
            return replace(hit[1], round_id=round_id, opened_s=float(opened_s))
        rnd = build_round(round_id, opened_s, members, sources, header.grid, header.sku_index)
        if len(self._built) >= _REBUILT_ROUNDS:
            del self._built[next(iter(self._built))]
        self._built[key] = (header, rnd)
        return rnd


@dataclass(frozen=True)
class Dropped:
    """An ``order_dropped`` record: the HTTP service gave the order up without a round."""

    order_id: str
    reason: str


@dataclass(frozen=True)
class Refused:
    """A ``hold_released`` record's refused awards (journal schema 2; ``refused_by`` from 3),
    or those of a round whose run stopped before it journaled the commits.

    Attributes:
        round_id: the round whose awards did not take.
        order_ids: those awards' orders.
        refused_by: order id -> the bidders that refused its commit (empty: not journaled).
        never_committed: no bidder refused: the run stopped before it journaled the
            commits (`_never_committed`).
    """

    round_id: int
    order_ids: list[str]
    refused_by: dict[str, list[str]]
    never_committed: bool = False


def _never_committed(unsettled: dict[int, tuple[list[str], Any]]) -> list[Refused]:
    """The awards of rounds a run cleared and stopped before journaling their commits (the
    HTTP service's round loop died, or it was stopped): they never took, so the next run
    traded those orders again. Read at the next ``run_started``; empties `unsettled`."""
    out = []
    for round_id, (orders, award_i) in unsettled.items():
        try:
            awarded = [orders[o] for o in np.flatnonzero(np.asarray(award_i)[0] >= 0).tolist()]
        except (IndexError, TypeError, ValueError):
            continue  # a malformed round_cleared: replay says so when it reaches that round
        if awarded:
            out.append(Refused(round_id, awarded, {}, never_committed=True))
    unsettled.clear()
    return out


def _refusal(rec: dict[str, Any]) -> Refused:
    """A ``hold_released`` record's refused awards, checked."""
    refused, by = rec["refused"], rec.get("refused_by", {})
    if not _order_ids(refused) or type(rec.get("round_id")) is not int \
            or not isinstance(by, dict) or not all(_order_ids(v) for v in by.values()):
        raise ReplayError(f"malformed {rec['type']} record at seq {rec['seq']}: 'refused' must be a list of order ids, "
                          "'refused_by' a map of bidder to order ids and 'round_id' an int")
    return Refused(rec["round_id"], refused, bidders_by_order(by))


def _order_ids(value: Any) -> bool:
    """Whether a journal field is a list of order ids."""
    return isinstance(value, list) and all(isinstance(o, str) for o in value)


def bidders_by_order(field: Any) -> dict[str, list[str]]:
    """A journal map of bidder to order ids (``hold_released.refused_by`` / ``.cancelled``)
    turned around: order id -> bidders; a bidder whose entry is not a list of order ids,
    or a field that is not a map, adds nothing."""
    out: dict[str, list[str]] = {}
    if isinstance(field, dict):
        for aid, ids in field.items():
            for oid in ids if _order_ids(ids) else ():
                out.setdefault(oid, []).append(aid)
    return out


def quote_columns(rec: dict[str, Any], bidder_ids: tuple[str, ...]) -> QuoteColumns:
    """A ``round_cleared`` record's quotes as columns, whichever of its two journaled forms it uses."""
    return _columns(rec, bidder_ids) if "q_counts" in rec else QuoteColumns.of(_raw_quotes(rec["quotes"]))


def _columns(rec: dict[str, Any], ids: tuple[str, ...]) -> QuoteColumns:
    """Quotes from the flat layout (see ``JournalRecorder._quote_fields``): views of the record's arrays."""
    n_q, n_rows, n_leg = rec["q_counts"]
    qi, qf = rec["quotes_i"], rec["quotes_f"]
    head = 4 * n_q
    meta = qi[:head].astype(np.int64).reshape(n_q, 4)  # per quote: bidder row, rows, capacity, is_leg
    bidders, rows, _, legs = meta.T.tolist()
    is_leg = tuple(map(bool, legs))
    if (len(qi) != head + 2 * n_rows or len(qf) != n_q + 2 * n_rows + n_leg or sum(rows) != n_rows
            or sum(compress(rows, legs)) != n_leg):
        raise ReplayError(f"round {rec['round_id']} (seq {rec['seq']}): quote arrays do not match q_counts {rec['q_counts']}")
    idx = qi[head:].astype(np.int64)
    return QuoteColumns(
        agent_ids=tuple([ids[b] for b in bidders]), is_leg=is_leg, rows=meta[:, 1], capacity=meta[:, 2],
        reliability=qf[:n_q], order_idx=idx[:n_rows],
        values=qf[n_q:n_q + 2 * n_rows].reshape(2, n_rows), source_idx=idx[n_rows:], travel_s=qf[n_q + 2 * n_rows:],
        floats=qf, indices=idx,
    )


def _raw_quotes(raw: list[dict[str, Any]]) -> list[Quote]:
    """Quotes journaled one map each (arrays in their own dtypes)."""
    out: list[Quote] = []
    for q in raw:
        if q["kind"] == "source":
            out.append(SourceQuote(q["agent_id"], q["order_idx"], q["price"], q["ready_s"], q["reliability"], q["capacity"]))
        else:
            out.append(LegQuote(q["agent_id"], q["order_idx"], q["source_idx"], q["price"], q["pickup_s"], q["travel_s"],
                                q["reliability"], q["capacity"]))
    return out


# --------------------------------------------------------------------------- clearing


def make_mechanism(name: str, payment: str | None = None, schema: int = JOURNAL_SCHEMA) -> Mechanism:
    """The mechanism a journal names (``auction/<method>/<payment>`` or ``static``).

    Args:
        payment: Override the payment rule (what-if); only auctions have one. A what-if
            pays by today's rule.
        schema: The journal's ``run_started.schema``: journals before `RESERVE_CAP_SCHEMA`
            paid ``second_score`` winners without the reserve cap, and re-clear so.
    """
    if payment is not None and payment not in PAYMENT_RULES:
        raise ReplayError(f"unknown payment rule '{payment}' (known: {', '.join(PAYMENT_RULES)})")
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "auction" and parts[1] in ("greedy", "exact") and parts[2] in PAYMENT_RULES:
        return ScoringAuction(payment=payment or parts[2], method=parts[1],  # type: ignore[arg-type]
                              reserve_cap=payment is not None or schema >= RESERVE_CAP_SCHEMA)
    if name == "static":
        if payment is not None:
            raise ReplayError("the journal was cleared by the static rule, which has no payment rule to change")
        return StaticRule()
    raise ReplayError(f"unknown mechanism '{name}' in the journal (known: auction/greedy|exact/<payment>, static)")


def clear(header: RunHeader, rnd: Round, quotes: QuoteColumns | list[Quote], profile: ProfileCfg,
          mechanism: Mechanism) -> tuple[QuoteBook, Allocation]:
    """Clears a rebuilt round with the engine's own clearing step."""
    return clear_round(rnd, quotes, header.kinds, profile, header.categories, mechanism)


def _result(book: QuoteBook, alloc: Allocation, index: dict[str, int]) -> LoggedResult:
    award_i, award_f = award_arrays(book, alloc, index)
    return LoggedResult(award_i, award_f, tuple(alloc.reason), alloc.total_cost)


@dataclass(frozen=True)
class Mismatch:
    """The first difference between a logged and a re-cleared round."""

    round_id: int
    seq: int
    order_id: str | None  # None for a round-level field (total_cost)
    field: str
    logged: Any
    replayed: Any

    def __str__(self) -> str:
        where = f"round {self.round_id} (seq {self.seq})"
        if self.order_id is not None:
            where += f" order {self.order_id}"
        return f"{where}: {self.field} differs: logged {self.logged!r}, replayed {self.replayed!r}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"round_id": self.round_id, "seq": self.seq, "order_id": self.order_id, "field": self.field,
                "logged": _jsonable(self.logged), "replayed": _jsonable(self.replayed)}


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def compare(rr: LoggedRound, got: LoggedResult, ids: tuple[str, ...]) -> Mismatch | None:
    """Bit-for-bit comparison; the first differing order and field, or None."""
    want = rr.logged
    same_i = want.award_i.dtype == got.award_i.dtype and want.award_i.tobytes() == got.award_i.tobytes()
    if not same_i:
        same_i = np.array_equal(want.award_i.astype(np.int64), got.award_i.astype(np.int64))
    same_f = _float_bits_equal(want.award_f, got.award_f)
    same_cost = _f64(want.total_cost) == _f64(got.total_cost)
    if same_i and same_f and want.reason == got.reason and same_cost:
        return None

    def name(row: int) -> str | None:
        return None if row < 0 else (ids[row] if row < len(ids) else f"#{row}")

    for o, order in enumerate(rr.orders):
        for f, fname in enumerate(AWARD_INT_FIELDS):
            a, b = int(want.award_i[f, o]), int(got.award_i[f, o])
            if a != b:
                if fname == "winner":
                    return Mismatch(rr.round_id, rr.seq, order.order_id, "winner (combination)", a, b)
                return Mismatch(rr.round_id, rr.seq, order.order_id, f"{fname} bidder", name(a), name(b))
        for f, fname in enumerate(AWARD_FLOAT_FIELDS):
            a, b = want.award_f[f, o], got.award_f[f, o]
            if _f64(float(a)) != _f64(float(b)):
                return Mismatch(rr.round_id, rr.seq, order.order_id, fname, float(a), float(b))
        if want.reason[o] != got.reason[o]:
            return Mismatch(rr.round_id, rr.seq, order.order_id, "reason", want.reason[o], got.reason[o])
    return Mismatch(rr.round_id, rr.seq, None, "total_cost", float(want.total_cost), float(got.total_cost))


# --------------------------------------------------------------------------- KPIs


@dataclass
class OutcomeKpis:
    """KPIs by each order's final outcome, plus a per-minute timeline for plots."""

    orders: int = 0
    vip_orders: int = 0
    fulfilled: int = 0
    vip_fulfilled: int = 0
    on_time: int = 0
    vip_on_time: int = 0
    paid: float = 0.0
    score_sum: float = 0.0
    rounds: int = 0
    slots: int = 0
    round_awards: int = 0
    duplicate_awards: int = 0
    leg_mix: Counter[str] = field(default_factory=Counter)
    last_reason: dict[str, str] = field(default_factory=dict)
    clear_ms: list[float] = field(default_factory=list)
    # per minute of the market clock: awards, money paid, predicted on time, leg kinds
    t_awards: Counter[int] = field(default_factory=Counter)
    t_paid: defaultdict[int, float] = field(default_factory=lambda: defaultdict(float))
    t_on_time: Counter[int] = field(default_factory=Counter)
    t_kind: defaultdict[int, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    # the orders awarded, each with what its award added (a refusal takes it back):
    # (round_id, minute, paid, on time, vip, leg label, score)
    won: dict[str, tuple[int, int, float, bool, bool, str, float]] = field(default_factory=dict)

    def forked(self, clear_ms: list[float]) -> OutcomeKpis:
        """A deep copy that goes on with other clearing times.

        Replay's re-cleared KPIs are the logged ones for as long as every re-cleared
        round matches its log bit for bit, so replay adds each round to the logged KPIs
        only and forks the re-cleared ones off at the first difference.
        """
        return copy.deepcopy(self, {id(self.clear_ms): clear_ms})  # the memo hands over clear_ms, uncopied

    def order_in(self, vip: bool) -> None:
        """Counts an order received."""
        self.orders += 1
        self.vip_orders += int(vip)

    def drop(self, order_id: str, reason: str) -> None:
        """An order the service gave up without a round (``order_dropped``): unfulfilled, for
        `reason`. An award it holds was never committed (the round loop died first: a
        commit would have ended the order), so it is taken back."""
        got = self.won.get(order_id)
        if got is not None:
            self.refuse(got[0], [order_id])
        self.last_reason[order_id] = reason

    def add_round(self, round_id: int, orders: tuple[Order, ...], opened_s: float, res: LoggedResult,
                  header: RunHeader) -> None:
        """Adds a round's outcome; an order already awarded in an earlier round is not counted again."""
        self.rounds += 1
        self.slots += len(orders)
        winners = res.award_i[0].tolist()
        won = self.won
        if -1 in winners:
            for o, w in enumerate(winners):
                if w < 0 and orders[o].order_id not in won:
                    self.last_reason[orders[o].order_id] = res.reason[o]
        if len(winners) == winners.count(-1):
            return
        minute = int(opened_s // 60)
        sp, lp, score, delivery = res.award_f.tolist()
        legs = res.award_i[2].tolist()
        labels = header.leg_labels
        for o, w in enumerate(winners):
            if w < 0:
                continue
            self.round_awards += 1
            oid = orders[o].order_id
            if oid in won:
                self.duplicate_awards += 1
                continue
            self.last_reason.pop(oid, None)
            vip = orders[o].tier == Tier.VIP
            pay = sp[o] + lp[o]
            on_time = delivery[o] <= orders[o].promise_s
            self.fulfilled += 1
            self.vip_fulfilled += vip
            self.on_time += on_time
            self.vip_on_time += vip and on_time
            self.paid += pay
            self.score_sum += score[o]
            b = legs[o]
            label = labels[b] if 0 <= b < len(labels) else "unknown"
            self.leg_mix[label] += 1
            self.t_awards[minute] += 1
            self.t_paid[minute] += pay
            self.t_on_time[minute] += on_time
            self.t_kind[minute][label] += 1
            won[oid] = (round_id, minute, pay, on_time, vip, label, score[o])

    def add_one_order_rounds(self, rounds: Sequence[LoggedRound], header: RunHeader) -> None:
        """`add_round` of one-order rounds, one after the other, with the chunk's arrays read once.

        Replay re-clears most rounds as columns, a chunk at a time, so it adds their
        logged outcomes a chunk at a time too: the same additions in the same order
        as `add_round` round by round (floats summed in journal order), with the award
        arrays turned into lists once per chunk and the tallies kept in locals.
        Each round's ``award_i`` must be [3, 1] and its ``award_f`` a float [4, 1] array.
        """
        if not rounds:
            return
        winners, _, legs = np.concatenate([rr.logged.award_i for rr in rounds], axis=1).tolist()
        sp, lp, score, delivery = np.concatenate([rr.logged.award_f for rr in rounds], axis=1).tolist()
        last_reason, labels = self.last_reason, header.leg_labels
        fulfilled = vip_fulfilled = on_time_n = vip_on_time = round_awards = duplicates = 0
        paid, score_sum = self.paid, self.score_sum
        leg_mix, t_awards, t_paid = self.leg_mix, self.t_awards, self.t_paid
        t_on_time, t_kind, won = self.t_on_time, self.t_kind, self.won
        for i, rr in enumerate(rounds):
            order = rr.orders[0]
            oid = order.order_id
            if winners[i] < 0:
                if winners[i] == -1 and oid not in won:
                    last_reason[oid] = rr.logged.reason[0]
                continue
            round_awards += 1
            if oid in won:
                duplicates += 1
                continue
            last_reason.pop(oid, None)
            minute = int(rr.opened_s // 60)
            vip = order.tier == Tier.VIP
            pay = sp[i] + lp[i]
            on_time = delivery[i] <= order.promise_s
            fulfilled += 1
            vip_fulfilled += vip
            on_time_n += on_time
            vip_on_time += vip and on_time
            paid += pay
            score_sum += score[i]
            b = legs[i]
            label = labels[b] if 0 <= b < len(labels) else "unknown"
            leg_mix[label] += 1
            t_awards[minute] += 1
            t_paid[minute] += pay
            t_on_time[minute] += on_time
            t_kind[minute][label] += 1
            won[oid] = (rr.round_id, minute, pay, on_time, vip, label, score[i])
        self.rounds += len(rounds)
        self.slots += len(rounds)
        self.round_awards += round_awards
        self.duplicate_awards += duplicates
        self.fulfilled += fulfilled
        self.vip_fulfilled += vip_fulfilled
        self.on_time += on_time_n
        self.vip_on_time += vip_on_time
        self.paid, self.score_sum = paid, score_sum

    def refuse(self, round_id: int, order_ids: Iterable[str]) -> None:
        """Takes back the awards round `round_id` made to these orders: their commits were
        refused (``hold_released.refused``), so they are unserved, as the live run counted them."""
        for oid in order_ids:
            got = self.won.get(oid)
            if got is None or got[0] != round_id:
                continue
            del self.won[oid]
            _, minute, pay, on_time, vip, label, score = got
            self.last_reason[oid] = COMMIT_REFUSED
            self.fulfilled -= 1
            self.vip_fulfilled -= vip
            self.on_time -= on_time
            self.vip_on_time -= vip and on_time
            self.paid -= pay
            self.score_sum -= score
            self.leg_mix[label] -= 1
            self.t_awards[minute] -= 1
            self.t_paid[minute] -= pay
            self.t_on_time[minute] -= on_time
            self.t_kind[minute][label] -= 1

    def report(self) -> dict[str, Any]:
        """The KPI dict (see the module docstring for what each rate counts)."""
        def ratio(a: float, b: float) -> float | None:
            return round(a / b, 6) if b else None

        ms = np.asarray(self.clear_ms) if self.clear_ms else None
        unfulfilled = Counter(self.last_reason.values())
        never_cleared = self.orders - self.fulfilled - len(self.last_reason)
        if never_cleared > 0:
            unfulfilled["never_cleared"] += never_cleared
        return {
            "orders": self.orders,
            "fulfilled": self.fulfilled,
            "fulfilled_rate": ratio(self.fulfilled, self.orders),
            "cost_per_order": ratio(self.paid, self.fulfilled),
            "mean_score": ratio(self.score_sum, self.fulfilled),
            "on_time_rate_predicted": ratio(self.on_time, self.fulfilled),
            "vip_orders": self.vip_orders,
            "vip_fulfilled_rate": ratio(self.vip_fulfilled, self.vip_orders),
            "vip_on_time_rate_predicted": ratio(self.vip_on_time, self.vip_fulfilled),
            "award_share": {k: ratio(self.leg_mix[k.value], self.fulfilled) or 0.0 for k in LEG_KINDS},
            "rounds": self.rounds,
            "round_award_rate": ratio(self.round_awards, self.slots),
            "duplicate_awards": self.duplicate_awards,
            "unfulfilled": dict(sorted(unfulfilled.items())),
            "p50_clear_ms": round(float(np.percentile(ms, 50)), 4) if ms is not None else None,
            "p99_clear_ms": round(float(np.percentile(ms, 99)), 4) if ms is not None else None,
        }


# --------------------------------------------------------------------------- replay


@dataclass
class ReplayReport:
    """What a replay found: verification, KPIs (logged, re-cleared, what-if), timeline, speed."""

    path: str
    header: RunHeader
    records: dict[str, int]
    rounds: int
    verified_rounds: int
    mismatched_rounds: int
    first_mismatch: Mismatch | None
    logged: OutcomeKpis
    replayed: OutcomeKpis | None
    what_if: OutcomeKpis | None
    what_if_settings: dict[str, Any] | None
    received_per_minute: Counter[int]
    seconds: float
    stopped_early: bool = False
    segments: int = 1  # runs in the journal (a restarted shell continues it)

    @property
    def ok(self) -> bool:
        """True when every re-cleared round matched the journal bit for bit."""
        return self.mismatched_rounds == 0

    def version_drift(self) -> dict[str, tuple[str, str]]:
        """Packages whose version differs between the journal's writer and this replay.

        A float may then differ in its last bit (NumPy) or an exact clearing may pick
        another optimum (SciPy's HiGHS), so a failed verify should say so.
        """
        now = versions()
        return {k: (v, now[k]) for k, v in self.header.versions.items()
                if k in now and k != "python" and v != now[k]}

    def kpi_diff(self) -> dict[str, Any]:
        """what-if minus logged for every numeric KPI (nested for award_share)."""
        if self.what_if is None:
            return {}
        diff = _diff(self.logged.report(), self.what_if.report())
        for key in TIMING_KEYS:  # live clearing vs replay clearing: not a what-if effect
            diff.pop(key, None)
        return diff

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no timeline)."""
        h = self.header
        out: dict[str, Any] = {
            "journal": self.path,
            "run": {"seed": h.seed, "policy": h.policy, "mechanism": h.mechanism, "profile": h.profile_name,
                    "bidders": len(h.bidder_ids), "versions": h.versions},
            "records": dict(sorted(self.records.items())),
            "segments": self.segments,
            "rounds": self.rounds,
            "verify": {"rounds_checked": self.verified_rounds, "mismatched_rounds": self.mismatched_rounds,
                       "ok": self.ok, "first_mismatch": self.first_mismatch.as_dict() if self.first_mismatch else None,
                       "stopped_early": self.stopped_early},
            "kpis": {"logged": self.logged.report()},
            "version_drift": {k: {"journal": a, "replay": b} for k, (a, b) in self.version_drift().items()},
            "seconds": round(self.seconds, 4),
            "rounds_per_s": round(self.rounds / self.seconds, 1) if self.seconds > 0 else None,
        }
        if self.replayed is not None:
            out["kpis"]["replayed"] = self.replayed.report()
        if self.what_if is not None:
            out["kpis"]["what_if"] = self.what_if.report()
            out["what_if"] = self.what_if_settings
            out["diff"] = self.kpi_diff()
        return out


def _diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, va in a.items():
        vb = b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out[k] = _diff(va, vb)
        elif isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
            out[k] = round(vb - va, 6)
    return {k: v for k, v in out.items() if v != {}}


def _drop_orders(rnd: Round, quotes: QuoteColumns, keep: list[int], header: RunHeader) -> tuple[Round, QuoteColumns]:
    """The round without orders the what-if already served, quotes remapped to the rest."""
    sub = build_round(rnd.round_id, rnd.opened_s, [rnd.orders[o] for o in keep], rnd.sources, header.grid, header.sku_index)
    remap = np.full(rnd.size, -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    return sub, quotes.for_orders(remap)


def replay(
    path: str | os.PathLike[str],
    *,
    profile: ProfileCfg | None = None,
    profile_name: str | None = None,
    payment: str | None = None,
    verify: bool = True,
    stop_at_first: bool = False,
    progress: Progress | None = None,
    workers: int = 1,
) -> ReplayReport:
    """Streams a journal once: re-clears every round, verifies, and computes KPIs.

    Args:
        profile: What-if scoring profile (replaces every logged profile).
        profile_name: Its name, for the report.
        payment: What-if payment rule (``first_score`` / ``second_score``).
        verify: Re-clear with the logged settings and compare bit for bit. Without a
            what-if it is always done (it is what gives the re-cleared KPIs).
        stop_at_first: Stop at the first mismatching round.
        progress: ``progress(orders_read, expected_orders or None)``.
        workers: Processes that share the re-clearing, without a what-if (forked; one
            where the platform cannot fork). Each reads the whole journal and re-clears
            every ``workers``-th round, so more only pay on a large journal with idle
            cores. The report is the one-process report: a round that differs, or an
            error, sends the journal through one process, which reports it.
    """
    if workers < 1:
        raise ReplayError(f"workers must be at least 1, not {workers}")
    what_if = profile is not None or payment is not None
    if workers > 1 and not what_if and "fork" in multiprocessing.get_all_start_methods():
        report = _sharded(path, workers, progress)
        if report is not None:
            return report
    return _replay(path, profile, profile_name, payment, verify or not what_if, stop_at_first, progress, None)


def _replay(path: str | os.PathLike[str], profile: ProfileCfg | None, profile_name: str | None, payment: str | None,
            verify: bool, stop_at_first: bool, progress: Progress | None,
            shard: tuple[int, int] | None) -> ReplayReport:
    """`replay` in one process; with ``shard`` it re-clears (and counts as verified) that shard's rounds only."""
    what_if = profile is not None or payment is not None
    logged = OutcomeKpis()
    replayed: OutcomeKpis | None = None  # None while every re-cleared round matched: then it is `logged`
    alt = OutcomeKpis() if what_if else None
    clear_ms: list[float] = []
    received: Counter[int] = Counter()

    def on_order(order: Order, now: float) -> None:
        vip = order.tier == Tier.VIP
        for k in (logged, replayed, alt):
            if k is not None:
                k.order_in(vip)
        received[int(now // 60)] += 1

    def on_dropped(order_id: str, reason: str) -> None:
        for k in (logged, replayed, alt):
            if k is not None:
                k.drop(order_id, reason)

    journal = JournalReplay(path, progress=progress, on_order=on_order, on_dropped=on_dropped)
    alt_mechs: dict[str, Mechanism] = {}
    n_rounds = verified = bad = 0
    first: Mismatch | None = None
    stopped = False
    start = time.perf_counter()
    for turn in _turns(journal, shard, verify and not what_if):
        if turn.whole:  # a chunk of one-order rounds of one run, every one verified by the columns
            journal.settle_rounds(turn.steps)
            rounds = [s.round for s in turn.steps]
            header = turn.steps[0].header
            assert header is not None and turn.columns_ms is not None
            logged.add_one_order_rounds(rounds, header)  # type: ignore[arg-type]
            if replayed is not None:
                replayed.add_one_order_rounds(rounds, header)  # type: ignore[arg-type]
            for r in rounds:
                if "clear_ms" in r.facts:  # type: ignore[union-attr]
                    logged.clear_ms.append(float(r.facts["clear_ms"]))  # type: ignore[union-attr]
            clear_ms.extend([turn.columns_ms] * len(rounds))
            n_rounds += len(rounds)
            verified += len(rounds)
            continue
        step, columns_ms = turn.steps[0], turn.columns_ms
        journal.settle(step)  # raises what reading raised here
        for r in step.refused:  # before this step's round: they came after their own
            for k in (logged, replayed, alt):
                if k is not None:
                    k.refuse(r.round_id, r.order_ids)
        rr: LoggedRound | None = step.round
        if rr is None:  # the end
            continue
        header = journal.header
        assert header is not None
        n_rounds += 1
        diff = None
        if verify and step.rebuild:
            if columns_ms is not None:  # re-cleared as columns, to its log bit for bit
                clear_ms.append(columns_ms)
                got = rr.logged
            else:
                rr = journal.rebuilt(step)
                got, diff = _reclear(rr, header, clear_ms)
            verified += 1
            if diff is not None and replayed is None:
                replayed = logged.forked(clear_ms)  # the rounds before this one matched
            if replayed is not None:
                replayed.add_round(rr.round_id, rr.orders, rr.opened_s, got, header)
        logged.add_round(rr.round_id, rr.orders, rr.opened_s, rr.logged, header)
        if "clear_ms" in rr.facts:
            logged.clear_ms.append(float(rr.facts["clear_ms"]))
        if diff is not None:
            bad += 1
            first = first or diff
            if stop_at_first:
                stopped = True
                break
        if alt is not None and step.rebuild:
            if not isinstance(rr, ReplayRound):
                rr = journal.rebuilt(step)
            if header.mechanism not in alt_mechs:
                alt_mechs[header.mechanism] = make_mechanism(header.mechanism, payment, header.schema)
            keep = [o for o, order in enumerate(rr.orders) if order.order_id not in alt.won]
            rnd, quotes = rr.rnd, rr.quotes
            if len(keep) < rnd.size:
                if not keep:
                    continue
                rnd, quotes = _drop_orders(rnd, quotes, keep, header)
            t0 = time.perf_counter()
            book, alloc = clear(header, rnd, quotes, profile or rr.profile, alt_mechs[header.mechanism])
            alt.clear_ms.append((time.perf_counter() - t0) * 1000.0)
            alt.add_round(rnd.round_id, rnd.orders, rnd.opened_s, _result(book, alloc, header.index), header)
    if verify and replayed is None:  # every round matched: the logged outcomes, with replay's clearing times
        replayed = replace(logged, clear_ms=clear_ms)  # shares counters; neither changes any more
    seconds = time.perf_counter() - start
    if journal.header is None:  # a journal with no rounds: rounds() raised already if no run_started
        raise ReplayError(f"{path}: no run_started record: nothing to replay")
    settings = None
    if what_if:
        settings = {"profile": profile_name or (journal.header.profile_name if profile is None else "custom"),
                    "payment": payment or _payment_of(journal.header.mechanism)}
    return ReplayReport(
        path=str(path), header=journal.header, records=dict(journal.counts), rounds=n_rounds, verified_rounds=verified,
        mismatched_rounds=bad, first_mismatch=first, logged=logged, replayed=replayed, what_if=alt,
        what_if_settings=settings, received_per_minute=received, seconds=seconds, stopped_early=stopped,
        segments=journal.segments,
    )


@dataclass(slots=True)
class _Turn:
    """What `_replay` takes next: one step, or a whole chunk of rounds the columns verified.

    Attributes:
        steps: the step (one), or the chunk's steps (``whole``).
        columns_ms: each round's share of the columns' clearing time where the columns
            verified it; None for a step the per-round path must clear.
        whole: every step is a one-order round of the same run that the columns
            verified, none takes back a refused award, and no progress is shown: it is
            settled and counted at once.
    """

    steps: list[ReadStep]
    columns_ms: float | None
    whole: bool = False


def _turns(journal: JournalReplay, shard: tuple[int, int] | None, columns: bool) -> Iterator[_Turn]:
    """Every step of a journal in order, read a chunk ahead, the rounds the columns verified marked.

    With ``columns``, each chunk's one-order rounds are re-cleared as columns first
    (`by_columns`). The caller must `JournalReplay.settle` each step before using it.
    """
    steps = journal.steps(shard)
    state = OneOrderColumns()
    while chunk := list(islice(steps, CHUNK_ROUNDS)):
        verified, ms = by_columns(chunk, state) if columns else ([False] * len(chunk), 0.0)
        if all(verified) and all(s.header is chunk[0].header and not s.refused for s in chunk) \
                and journal.progress is None:
            yield _Turn(chunk, ms, whole=True)
            continue
        for step, ok in zip(chunk, verified):
            yield _Turn([step], ms if ok else None)


def by_columns(chunk: list[ReadStep], columns: OneOrderColumns) -> tuple[list[bool], float]:
    """Which rounds of a chunk re-clear to their log as columns, and each one's share of the time taken.

    Only one-order rounds of greedy first-score runs are tried, grouped by what they
    share (run, profile, sites). If the columns find any round that differs from its
    log, none is vouched for: the whole chunk goes through the per-round path, which
    tells the difference the way it always has.
    """
    t0 = time.perf_counter()
    ok = [False] * len(chunk)
    groups: defaultdict[tuple[int, int, int], list[int]] = defaultdict(list)
    for i, step in enumerate(chunk):
        rr, header = step.round, step.header
        if rr is not None and step.rebuild and len(rr.orders) == 1 and header is not None \
                and header.mechanism == _BY_COLUMNS:
            assert step.head is not None
            groups[(id(header), id(rr.profile), id(step.head["sources_obj"]))].append(i)
    n = 0
    for members in groups.values():
        steps = [chunk[i] for i in members]
        first, head = steps[0], steps[0].head
        assert first.round is not None and first.header is not None and head is not None
        rounds = [s.round for s in steps]
        check = columns.check(
            [s.rec for s in steps], [r.orders[0] for r in rounds], [r.opened_s for r in rounds],  # type: ignore[misc]
            [r.logged.reason for r in rounds], first.round.profile, head["sources_obj"],  # type: ignore[union-attr]
            first.header.bidder_rows, first.header.categories)
        if (check.decided & ~check.same).any():
            return [False] * len(chunk), 0.0
        for i, good in zip(members, (check.decided & check.same).tolist()):
            ok[i] = good
            n += good
    return ok, (time.perf_counter() - t0) * 1000.0 / max(n, 1)


def _reclear(rr: ReplayRound, header: RunHeader, clear_ms: list[float]) -> tuple[LoggedResult, Mismatch | None]:
    """Clears a round again as it was cleared, timed: the result and its first difference from the log."""
    t0 = time.perf_counter()
    book, alloc = clear(header, rr.rnd, rr.quotes, rr.profile, header.clearing)
    clear_ms.append((time.perf_counter() - t0) * 1000.0)
    got = _result(book, alloc, header.index)
    return got, compare(rr, got, header.bidder_ids)


def _sharded(path: str | os.PathLike[str], workers: int, progress: Progress | None) -> ReplayReport | None:
    """A verifying replay shared by ``workers`` processes, this one included.

    This process reads every round for the KPIs and re-clears shard 0; forked workers
    re-clear the others. None where a one-process pass must tell what happened: a round
    that differs from its log, or an error anywhere.
    """
    start = time.perf_counter()
    with ProcessPoolExecutor(workers - 1, mp_context=multiprocessing.get_context("fork")) as pool:
        others = [pool.submit(_verify_shard, str(path), k, workers) for k in range(1, workers)]
        try:
            report = _replay(path, None, None, None, True, True, progress, (0, workers))
            shards = [f.result() for f in others]
        except Exception:  # noqa: BLE001 - the one-process pass raises it again, exactly
            return None
    if not report.ok or not all(ok for ok, _ in shards):
        return None
    assert report.replayed is not None
    clear_ms = [0.0] * report.rounds  # each round's clearing time, in journal order
    clear_ms[0::workers] = report.replayed.clear_ms
    for k, (_, ms) in enumerate(shards, 1):
        clear_ms[k::workers] = ms
    report.verified_rounds = report.rounds
    report.replayed = replace(report.logged, clear_ms=clear_ms)
    report.seconds = time.perf_counter() - start
    return report


def _verify_shard(path: str, shard: int, shards: int) -> tuple[bool, list[float]]:
    """A worker's part of `_sharded`: whether its rounds match their log, and their clearing times."""
    with warnings.catch_warnings():  # the parent reads the same journal and gives any warning once
        warnings.simplefilter("ignore")
        report = _replay(path, None, None, None, True, True, None, (shard, shards))
    assert report.replayed is not None
    return report.ok, report.replayed.clear_ms


def _payment_of(mechanism: str) -> str | None:
    parts = mechanism.split("/")
    return parts[2] if len(parts) == 3 else None


def verify(path: str | os.PathLike[str], progress: Progress | None = None) -> Mismatch | None:
    """Re-clears every round with the logged settings; the first difference, or None."""
    return replay(path, verify=True, stop_at_first=True, progress=progress).first_mismatch


# --------------------------------------------------------------------------- explain


def _ranking(book: QuoteBook, mechanism: Mechanism) -> tuple[tuple[np.ndarray, ...], np.ndarray, np.ndarray, str]:
    """The mechanism's preference keys (np.lexsort order), who may win, the service order, and the rule."""
    c = book.combos
    if isinstance(mechanism, StaticRule):
        from policies.static import _leg_class, _source_distance  # the rule's own keys, not a copy

        keys = (c.leg, c.leg_price, _leg_class(book), _source_distance(book))
        rule = ("static rule: orders in arrival order; per order the nearest warehouse, then the leg class "
                "(cheap locker < own riders < locker < crowd), then the cheapest leg; reserve, category and capacity "
                "respected; scores ignored")
        return keys, c.admissible, np.arange(book.rnd.size), rule
    keys = (c.leg, c.src, c.price, c.score)
    if isinstance(mechanism, ScoringAuction) and mechanism.method == "exact":
        rule = "exact clearing: the feasible assignment with the least total cost (scores + unserved penalties)"
    else:
        rule = ("greedy scoring auction: orders served VIP first, then earliest promise; each takes its lowest-score "
                "feasible combination whose source and leg still have round capacity (ties: price, then bidder)")
    return keys, c.feasible, priority_sequence(book), rule


def _why_not(book: QuoteBook, k: int, header: RunHeader, allowed: bool) -> list[str]:
    """Why combination k may not win (empty when the mechanism allows it)."""
    c, rnd, prof = book.combos, book.rnd, book.profile
    o = int(c.order[k])
    why = []
    price = float(c.src_price[k] + c.leg_price[k])
    if price > rnd.reserve[o]:
        why.append(f"price {price:.2f} over reserve {float(rnd.reserve[o]):.2f}")
    if prof.vip_hard_promise and rnd.vip[o] and c.delivery_s[k] > rnd.promise_s[o]:
        why.append("VIP promise missed under a hard-promise profile")
    cat = int(rnd.category[o])
    for role, b in (("source", int(c.src[k])), ("leg", int(c.leg[k]))):
        bid = book.bidder_ids[b]
        row = header.categories.index.get(bid)
        if row is not None and not header.categories.matrix[row, cat]:
            why.append(f"{role} {bid} has not declared category {list(Category)[cat].value}")
    if not why and not allowed and not c.feasible[k]:
        why.append(f"score {float(c.score[k]):.2f} not below the unserved penalty {float(book.penalty[o]):.2f}")
    return why


def explain_round(rr: ReplayRound, header: RunHeader, order_id: str, profile: ProfileCfg | None = None,
                  payment: str | None = None) -> dict[str, Any]:
    """Every combination for one order in one round: score, feasibility, and why the winner won."""
    mech = make_mechanism(header.mechanism, payment, header.schema)
    prof = profile or rr.profile
    book, alloc = clear(header, rr.rnd, rr.quotes, prof, mech)
    o = next(i for i, order in enumerate(rr.rnd.orders) if order.order_id == order_id)
    c = book.combos
    keys, allowed, sequence, rule = _ranking(book, mech)
    mine = np.flatnonzero(c.order == o)
    pref = mine[np.lexsort(tuple(key[mine] for key in keys))] if len(mine) else mine
    # capacity each bidder had left when this order's turn came (orders served before it)
    turn = int(np.flatnonzero(sequence == o)[0])
    used = np.zeros(len(book.bidder_ids), dtype=np.int64)
    for p in sequence[:turn].tolist():
        w = int(alloc.winner[p])
        if w >= 0:
            used[c.src[w]] += 1
            used[c.leg[w]] += 1
    left = book.capacity - used
    winner = int(alloc.winner[o])
    combos = []
    for rank, k in enumerate(pref.tolist()):
        s, lg = int(c.src[k]), int(c.leg[k])
        why = _why_not(book, k, header, bool(allowed[k]))
        if not why and not allowed[k]:
            why.append("not allowed by the mechanism")
        capacity_ok = bool(left[s] > 0 and left[lg] > 0)
        if allowed[k] and not capacity_ok and k != winner:
            short = [book.bidder_ids[b] for b in (s, lg) if left[b] <= 0]
            why.append(f"no capacity left at {', '.join(short)} (taken by orders served earlier)")
        combos.append({
            "rank": rank, "source": book.bidder_ids[s], "leg": book.bidder_ids[lg], "leg_kind": book.kinds[lg].value,
            "src_price": float(c.src_price[k]), "leg_price": float(c.leg_price[k]), "price": float(c.price[k]),
            "ready_s": float(c.ready_s[k]), "pickup_s": float(c.pickup_s[k]), "delivery_s": float(c.delivery_s[k]),
            "eta_min": round(max(0.0, float(c.delivery_s[k]) - rr.rnd.opened_s) / 60.0, 2),
            "reliability": float(c.reliability[k]), "score": float(c.score[k]),
            "admissible": bool(c.admissible[k]), "feasible": bool(c.feasible[k]), "capacity_left": capacity_ok,
            "winner": k == winner, "why_not": why if k != winner else [],
        })
    order = rr.rnd.orders[o]
    if winner >= 0:
        win = next(x for x in combos if x["winner"])
        better = [x for x in combos if x["rank"] < win["rank"]]
        verdict = f"{win['source']} + {win['leg']} won: score {win['score']:.4f}, price {win['price']:.2f}"
        if better:
            verdict += f"; {len(better)} better-ranked combination(s) could not win ({better[0]['why_not'][0] if better[0]['why_not'] else 'see why_not'})"
        else:
            verdict += "; it was the mechanism's first choice"
        runner = next((x for x in combos if x["rank"] > win["rank"] and not x["why_not"] and x["feasible"]), None)
        if runner is not None:
            verdict += f"; next choice {runner['source']} + {runner['leg']} (score {runner['score']:.4f})"
    else:
        verdict = f"unserved: {alloc.reason[o]}"
    logged_w = int(rr.logged.award_i[0, o])
    return {
        "round_id": rr.rnd.round_id, "seq": rr.seq, "opened_s": rr.rnd.opened_s, "attempt": int(rr.attempts[o]),
        "round_size": rr.rnd.size, "service_position": turn + 1, "profile": rr.profile_name if profile is None else "what-if",
        "mechanism": getattr(mech, "name", type(mech).__name__), "rule": rule,
        "order": {"order_id": order.order_id, "tier": order.tier.value, "category": order.category.value,
                  "promise_s": order.promise_s, "reserve": order.reserve, "locker_ok": order.locker_ok,
                  "unserved_penalty": float(book.penalty[o])},
        "combinations": combos, "winner": None if winner < 0 else {
            "source": book.bidder_ids[int(c.src[winner])], "leg": book.bidder_ids[int(c.leg[winner])],
            "src_payment": float(alloc.src_payment[o]), "leg_payment": float(alloc.leg_payment[o]),
            "score": float(c.score[winner])},
        "reason": alloc.reason[o], "verdict": verdict,
        "matches_log": logged_w == winner if profile is None and payment is None else None,
    }


def explain(path: str | os.PathLike[str], order_id: str, *, profile: ProfileCfg | None = None,
            payment: str | None = None) -> dict[str, Any]:
    """Explains every round an order took part in (retries included), in journal order.

    Raises:
        ReplayError: The order is not in the journal.
    """
    dropped: dict[str, str] = {}
    journal = JournalReplay(path, on_dropped=dropped.__setitem__)
    rounds = []
    for rr in journal.rounds(only_order=order_id):
        assert journal.header is not None
        rounds.append(explain_round(rr, journal.header, order_id, profile, payment))
    if order_id not in journal.orders:
        raise ReplayError(f"order '{order_id}' is not in the journal {path} ({journal.orders_received} orders)")
    if profile is None and payment is None:  # refusals are facts of the logged awards only
        for r in rounds:
            if r["winner"] and (r["round_id"], order_id) in journal.refused_awards:
                by = journal.refused_awards[(r["round_id"], order_id)]
                r["commit_refused" if by is not None else "not_committed"] = True
                r["verdict"] += ("; the run stopped before its commit was journaled" if by is None else
                                 f"; {' and '.join(by)} then refused its commit" if by else
                                 "; its winners' commit was then refused") + ", so the award did not take"
    if order_id in dropped:
        return {"order_id": order_id, "rounds": rounds, "outcome": f"unfulfilled ({dropped[order_id]})",
                "verdict": "the service gave it up without a round: the rounds that held it kept failing"}
    if not rounds:
        return {"order_id": order_id, "rounds": [], "outcome": "never cleared",
                "verdict": "received but never cleared in this journal"}
    last = rounds[-1]
    if last["winner"]:
        outcome = (f"unserved ({COMMIT_REFUSED})" if last.get("commit_refused") else
                   "not committed (the run stopped)" if last.get("not_committed") else "awarded")
    else:
        outcome = f"unserved ({last['reason']})"
    return {"order_id": order_id, "rounds": rounds, "verdict": last["verdict"], "outcome": outcome}


# --------------------------------------------------------------------------- plot


def timeline(report: ReplayReport, bins: int | None = None) -> dict[str, Any]:
    """Per-bin series for plotting: orders/min, cost per order, on-time, award share by leg kind.

    Without ``bins``: about 25 awards per bin on average, between 8 and 96 bins.
    """
    if bins is None:
        bins = int(min(96, max(8, report.logged.fulfilled / 25)))
    minutes = set(report.received_per_minute) | set(report.logged.t_awards)
    if report.what_if is not None:
        minutes |= set(report.what_if.t_awards)
    if not minutes:
        return {"t_h": [], "width_min": 1}
    lo, hi = min(minutes), max(minutes) + 1
    width = max(1, math.ceil((hi - lo) / bins))
    edges = list(range(lo, hi + width, width))
    centers = [(e + width / 2) / 60.0 for e in edges[:-1]]

    def series(k: OutcomeKpis) -> dict[str, list[float | None]]:
        n = len(centers)
        awards, paid, on_time = [0] * n, [0.0] * n, [0] * n
        kinds = {kd.value: [0] * n for kd in LEG_KINDS}
        for m, v in k.t_awards.items():
            b = (m - lo) // width
            awards[b] += v
            paid[b] += k.t_paid[m]
            on_time[b] += k.t_on_time[m]
            for kd, cnt in k.t_kind[m].items():
                if kd in kinds:
                    kinds[kd][b] += cnt
        return {
            "awards_per_min": [a / width for a in awards],
            "cost_per_order": [p / a if a else None for p, a in zip(paid, awards)],
            "on_time_rate": [t / a if a else None for t, a in zip(on_time, awards)],
            **{f"share_{kd}": [c / a if a else None for c, a in zip(v, awards)] for kd, v in kinds.items()},
        }

    received = [0] * len(centers)
    for m, v in report.received_per_minute.items():
        received[(m - lo) // width] += v
    out = {"t_h": centers, "width_min": width, "orders_per_min": [r / width for r in received],
           "logged": series(report.logged)}
    if report.what_if is not None:
        out["what_if"] = series(report.what_if)
    return out


def plot(report: ReplayReport, out: str | os.PathLike[str]) -> Path:
    """Draws KPIs over the market clock into a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = timeline(report)
    t = tl["t_h"]
    fig, axes = plt.subplots(4, 1, figsize=(12, 11), sharex=True, constrained_layout=True)
    h = report.header
    title = f"bidhive replay: {Path(report.path).name} ({h.policy}, {h.mechanism}, profile {h.profile_name})"
    if report.what_if_settings:
        title += f"\nwhat-if: profile {report.what_if_settings['profile']}, payment {report.what_if_settings['payment']}"
    fig.suptitle(title, fontsize=11)
    colors = {"rider_pool": "tab:blue", "crowd": "tab:orange", "locker": "tab:green"}

    def nan(xs: list[float | None]) -> list[float]:
        return [math.nan if x is None else x for x in xs]

    ax = axes[0]
    ax.plot(t, tl["orders_per_min"], color="0.4", label="orders received")
    ax.plot(t, tl["logged"]["awards_per_min"], color="tab:blue", label="awards (logged)")
    if "what_if" in tl:
        ax.plot(t, tl["what_if"]["awards_per_min"], color="tab:red", ls="--", label="awards (what-if)")
    ax.set_ylabel("per minute")
    ax.set_title(f"Orders and awards per minute ({tl['width_min']}-min bins)", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    for i, (key, label, unit) in enumerate((("cost_per_order", "Cost per order", "money"),
                                             ("on_time_rate", "On-time rate (predicted delivery vs promise)", "share")), 1):
        ax = axes[i]
        ax.plot(t, nan(tl["logged"][key]), color="tab:blue", label="logged")
        if "what_if" in tl:
            ax.plot(t, nan(tl["what_if"][key]), color="tab:red", ls="--", label="what-if")
        ax.set_title(label, fontsize=10)
        ax.set_ylabel(unit)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes[2].set_ylim(-0.02, 1.02)
    ax = axes[3]
    for kd, col in colors.items():
        ax.plot(t, nan(tl["logged"][f"share_{kd}"]), color=col, label=f"{kd} (logged)")
        if "what_if" in tl:
            ax.plot(t, nan(tl["what_if"][f"share_{kd}"]), color=col, ls="--", label=f"{kd} (what-if)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Award share by leg kind (utilization proxy)", fontsize=10)
    ax.set_ylabel("share of awards")
    ax.set_xlabel("market clock (hours)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


__all__ += ["CHUNK_ROUNDS", "OutcomeKpis", "ReadStep", "by_columns", "clear", "compare", "explain_round", "plot",
            "timeline"]
