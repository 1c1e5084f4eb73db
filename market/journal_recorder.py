"""The auction journal as a `Recorder`: every shell that drives `MarketEngine` writes it.

Each hook becomes one record (``docs/JOURNAL.md`` lists every field). ``round_cleared``
holds everything replay needs to re-clear the round without the bidders: the round's
orders come from the ``order_received`` records named by ``round_opened``, the fleet's
bidder table (ids, kinds, declared category masks), the source sites and the city grid
go once into ``run_started``, and the round's quotes go into ``round_cleared`` as a few
flat arrays: the book's own columns, in its bidder order (source quotes first), which
decides bidder indices and therefore tie-breaks.

Compactness matters because the journal sits on the clearing path: a round's quotes
are four arrays whatever the number of bidders, and a round's hold commits and
releases are one record each rather than one per bidder.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from agents.fleet import Fleet, build_fleet
from market.book import QuoteBook, QuoteColumns
from market.clearing import Allocation
from market.config import ConfigError, FleetCfg, ProfileCfg, load_profile, load_profiles
from market.journal import FsyncPolicy, JournalWriter
from market.round import Round, SourceSites
from market.types import CATEGORY_CODES, Order, Quote, SourceQuote

__all__ = ["JOURNAL_SCHEMA", "RESERVE_CAP_SCHEMA", "JournalRecorder", "award_arrays", "bidder_table", "versions"]

JOURNAL_SCHEMA = 4
"""Version of the record fields written here (``run_started.schema``); 2 added
``hold_released.refused`` and left refused awards out of ``hold_committed``; 3 added
``hold_released.refused_by`` and ``hold_released.cancelled``; 4 caps ``second_score``
payments at each order's reserve (`RESERVE_CAP_SCHEMA`): the records are the same."""

RESERVE_CAP_SCHEMA = 4
"""The first schema whose ``second_score`` payments are capped at the reserve."""

@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    out: dict[str, str] = {}
    for dist in ("bidhive", "numpy", "scipy", "msgpack"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    out["python"] = platform.python_version()
    return tuple(out.items())


def versions() -> dict[str, str]:
    """Versions of what decides the bits of a re-clear: bidhive, NumPy, SciPy, msgpack, Python."""
    return dict(_versions())


def bidder_table(fleet: Fleet) -> dict[str, Any]:
    """The fleet as replay needs it: ids in fleet order, kinds, declared category masks."""
    agents = fleet.agents
    return {
        "ids": [a.agent_id for a in agents],
        "kinds": [a.kind.value for a in agents],
        "category_ok": np.stack([a.category_ok for a in agents]).astype(bool)
        if agents else np.zeros((0, len(CATEGORY_CODES)), dtype=bool),
        "categories": [c.value for c in CATEGORY_CODES],
    }


def _sources_dict(sites: SourceSites) -> dict[str, Any]:
    """Every field of the source sites (ids, x, y, and whatever else they carry)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(sites):
        value = getattr(sites, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _same_sites(a: SourceSites, b: SourceSites) -> bool:
    """Same ids and bit-identical arrays, field by field."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            x, y = np.asarray(x), np.asarray(y)
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                return False
        elif x != y:
            return False
    return True


def _profile_name(given: str | None, weights: dict[str, Any] | None) -> str:
    """The configured name whose weights are these (the given name first), else 'custom'."""
    if weights is None:
        return given or "custom"
    try:
        known = load_profiles()
    except ConfigError:
        return given or "custom"
    if given in known and known[given].model_dump(mode="json") == weights:
        return given
    for name, cfg in known.items():
        if cfg.model_dump(mode="json") == weights:
            return name
    return "custom"


def award_arrays(book: QuoteBook, alloc: Allocation, index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """A round's result per order, as journaled and as replay compares it.

    Returns ``award_i`` [3, n_orders] int32: winning combination (-1: none), winning
    source and leg as rows of the bidder table (``index``; -1: none), and ``award_f``
    [4, n_orders] float64: source payment, leg payment, the winner's score and its
    predicted delivery time (NaN where unserved).

    Replay calls this once per round, most of which hold one order, so the rows are
    filled as Python lists and each array is made from one flat list by one NumPy call.
    """
    winner = alloc.winner
    winners = winner.tolist()
    n = len(winners)
    src, leg = [-1] * n, [-1] * n
    score, delivery = [math.nan] * n, [math.nan] * n
    ids, c = book.bidder_ids, book.combos
    for o, w in enumerate(winners):
        if w >= 0:
            src[o], leg[o] = index.get(ids[c.src.item(w)], -1), index.get(ids[c.leg.item(w)], -1)
            score[o], delivery[o] = c.score.item(w), c.delivery_s.item(w)
    award_i = np.array(winners + src + leg, dtype=np.int32).reshape(3, n)
    payments = alloc.src_payment.tolist() + alloc.leg_payment.tolist()
    award_f = np.array(payments + score + delivery, dtype=np.float64).reshape(4, n)
    return award_i, award_f


class JournalRecorder:
    """Writes the auction journal through a `JournalWriter` (see ``docs/JOURNAL.md``).

    Args:
        path: The journal's first file (created, or continued if it exists).
        fsync: ``"always"``, ``"interval"`` (default) or ``"never"`` (see `JournalWriter`).
        rotate_bytes: Start a new file past this size (None: never).
        fleet: The fleet, if the shell has it; otherwise `run_started` builds the bidder
            table from the ``fleet`` config in its info dict (or takes ``bidders``,
            ``sources`` and ``grid`` from it as written here).
        timing: Journal wall-clock facts (``clear_ms``). False makes the journal of a
            seeded simulation byte-identical from run to run.

    Raises:
        ValueError: From `run_started`: neither ``fleet`` nor enough fleet information
            in the info dict.
        RuntimeError: An order or a round before `run_started` (the journal would not
            be replayable).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fsync: FsyncPolicy = "interval",
        rotate_bytes: int | None = None,
        *,
        fleet: Fleet | None = None,
        timing: bool = True,
        fsync_interval_s: float = 0.2,
    ) -> None:
        self.path = Path(path)
        self.writer = JournalWriter(self.path, fsync=fsync, rotate_bytes=rotate_bytes, fsync_interval_s=fsync_interval_s)
        self.timing = timing
        self._fleet = fleet
        self._index: dict[str, int] = {}
        self._sites: SourceSites | None = None
        self._profile: ProfileCfg | None = None
        self._profile_name = "custom"
        self._started = False
        self._order_tags: dict[str, dict[str, Any]] = {}

    def _require_start(self, hook: str) -> None:
        """A journal without run_started cannot be replayed: fail at the shell's first mistake."""
        raise RuntimeError(f"JournalRecorder.{hook} before run_started: a shell must call run_started first "
                           "(with the policy, mechanism, profile and fleet) so the journal can be replayed")

    # -- run and orders -----------------------------------------------------------------
    def run_started(self, info: dict[str, Any]) -> None:
        """Journals the run: configs, seed, policy, mechanism, profile, bidders, versions."""
        info = dict(info)
        bidders, sources, grid = self._fleet_facts(info)
        self._index = {b: i for i, b in enumerate(bidders["ids"])}
        profile = info.pop("profile", None)
        if isinstance(profile, ProfileCfg):
            profile = profile.model_dump(mode="json")
        if profile is not None:
            self._profile = ProfileCfg.model_validate(profile)
        name = _profile_name(info.pop("profile_name", None), profile)
        self._profile_name = name
        fields = {
            "schema": JOURNAL_SCHEMA,
            "seed": info.pop("seed", None),
            "policy": info.pop("policy", None),
            "mechanism": info.pop("mechanism", None),
            "profile_name": name,
            "profile": profile,
            "bidders": bidders,
            "sources": sources,
            "grid": grid,
            "versions": versions(),
            "config": {k: v for k, v in info.items() if k not in ("bidders", "sources", "grid")},
        }
        self.writer.append("run_started", **fields)
        self._started = True

    def _fleet_facts(self, info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Bidder table, source sites and grid: from the fleet, or from the info dict."""
        fleet = self._fleet
        if fleet is None and "bidders" not in info and info.get("fleet") is not None:
            cfg = info["fleet"]
            cfg = cfg if isinstance(cfg, FleetCfg) else FleetCfg.model_validate(cfg)
            info["fleet"] = cfg.model_dump(mode="json")
            fleet = build_fleet(cfg, int(info.get("seed") or 0))
        if fleet is not None:
            self._sites = fleet.sources
            grid = fleet.env.grid
            return bidder_table(fleet), _sources_dict(self._sites), {
                "origin_lat": float(grid.origin_lat), "origin_lon": float(grid.origin_lon)}
        if all(k in info for k in ("bidders", "sources", "grid")):
            return info["bidders"], info["sources"], info["grid"]
        raise ValueError("JournalRecorder needs the fleet: pass fleet=..., or put the 'fleet' config "
                         "(or 'bidders', 'sources' and 'grid') in the run_started info")

    def tag_order(self, order_id: str, **fields: Any) -> None:
        """Extra fields for an order's coming ``order_received`` record (the HTTP service's
        idempotency key and body hash), so the record that accepts it also carries them."""
        self._order_tags[order_id] = fields

    def untag_order(self, order_id: str) -> None:
        """Forgets `tag_order`'s fields for an order that will not be journaled after all."""
        self._order_tags.pop(order_id, None)

    def order_received(self, order: Order, now: float) -> None:
        """Journals an order in full, before any bidder is asked about it."""
        if not self._started:
            self._require_start("order_received")
        tags = self._order_tags.pop(order.order_id, None) if self._order_tags else None
        self.writer.append_record({
            "seq": None, "type": "order_received", **(tags or {}),
            "order_id": order.order_id, "received_s": now, "created_s": order.created_s,
            "customer_id": order.customer_id, "tier": str(order.tier), "channel": order.channel,
            "items": [[it.sku, it.qty] for it in order.items], "lat": order.lat, "lon": order.lon,
            "promise_s": order.promise_s, "value": order.value, "category": str(order.category),
            "locker_ok": order.locker_ok, "reserve": order.reserve,
        })

    # -- rounds -------------------------------------------------------------------------
    def round_opened(self, rnd: Round, attempts: list[int]) -> None:
        """Journals which orders a round broadcasts (and new source sites, if they moved)."""
        if not self._started:
            self._require_start("round_opened")
        fields: dict[str, Any] = {}
        if rnd.sources is not self._sites:
            if self._sites is None or not _same_sites(rnd.sources, self._sites):
                fields["sources"] = _sources_dict(rnd.sources)
            self._sites = rnd.sources
        self.writer.append_record({
            "seq": None, "type": "round_opened", "round_id": rnd.round_id, "opened_s": rnd.opened_s,
            "orders": [o.order_id for o in rnd.orders], "attempts": list(attempts), **fields,
        })

    def round_cleared(self, rnd: Round, quotes: list[Quote], book: QuoteBook, alloc: Allocation, facts: dict[str, Any]) -> None:
        """Journals the round's quotes and its result, before anyone hears of an award."""
        if book.profile is not self._profile:
            if self._profile is None or book.profile != self._profile:
                weights = book.profile.model_dump(mode="json")
                self._profile_name = _profile_name(self._profile_name, weights)
                self.writer.append("profile_changed", name=self._profile_name, now_s=rnd.opened_s,
                                   profile=weights, observed=True)
            self._profile = book.profile
        quote_fields = self._quote_fields(book.quotes, quotes)
        award_i, award_f = award_arrays(book, alloc, self._index)
        kept = facts if self.timing else {k: v for k, v in facts.items() if k != "clear_ms"}
        self.writer.append_record({
            "seq": None, "type": "round_cleared", "round_id": rnd.round_id, **quote_fields, "award_i": award_i,
            "award_f": award_f, "reason": list(alloc.reason), "total_cost": alloc.total_cost, "facts": kept,
        })

    def _quote_fields(self, cols: QuoteColumns, quotes: list[Quote]) -> dict[str, Any]:
        """A round's quotes as two flat arrays (or one map per quote if they cannot be).

        ``q_counts`` = [n_quotes, n_rows, n_leg_rows]. ``quotes_i`` int32, concatenated:
        per quote [bidder (row of the run's bidder table), rows, capacity, 1 if last-mile]
        (n_quotes x 4), then order_idx (n_rows), then source_idx (n_rows; -1 on source
        rows). ``quotes_f`` float64, concatenated: reliability (n_quotes), price
        (n_rows), ready_s for source rows or pickup_s for leg rows (n_rows), then
        travel_s of the leg rows only (n_leg_rows). Quotes come in bidder-index order.

        They are the book's own columns (`QuoteBook.quotes`), what the round was scored
        on, so writing them is a handful of calls whatever the number of quotes. A bidder
        missing from the run's table, or a value int32 cannot hold, goes per quote instead.
        """
        index = self._index
        bidders = [index.get(b, -1) for b in cols.agent_ids]
        if -1 in bidders:
            return self._raw_quote_fields(quotes)
        meta = [v for quad in zip(bidders, cols.rows.tolist(), cols.capacity.tolist(), cols.is_leg) for v in quad]
        try:
            quotes_i = np.array(meta + cols.index_block().tolist(), dtype=np.int32)
        except OverflowError:  # an index or capacity int32 cannot hold: keep it exact per quote
            return self._raw_quote_fields(quotes)
        return {"q_counts": [len(bidders), len(cols.order_idx), len(cols.travel_s)], "quotes_i": quotes_i,
                "quotes_f": cols.float_block()}

    @staticmethod
    def _raw_quote_fields(quotes: list[Quote]) -> dict[str, Any]:
        """Every quote as its own map, arrays in their own dtypes: exact whatever they are."""
        raw = []
        for q in quotes:
            entry: dict[str, Any] = {"agent_id": q.agent_id, "reliability": q.reliability, "capacity": q.capacity,
                                     "order_idx": q.order_idx, "price": q.price}
            if isinstance(q, SourceQuote):
                entry.update(kind="source", ready_s=q.ready_s)
            else:
                entry.update(kind="leg", source_idx=q.source_idx, pickup_s=q.pickup_s, travel_s=q.travel_s)
            raw.append(entry)
        return {"quotes": raw}

    # -- holds and profiles -------------------------------------------------------------
    def holds_settled(self, round_id: int, committed: dict[str, list[str]], released: list[str], now: float,
                      refused: list[str], refused_by: dict[str, list[str]] | None = None,
                      cancelled: dict[str, list[str]] | None = None) -> None:
        """Journals a round's commits and releases: one record of each kind, not one per bidder.

        Awards whose commit was refused go into ``hold_released`` as ``refused``, with who
        refused (``refused_by``) and whose committed lines were cancelled (``cancelled``)
        where known; the fields are left out when nothing was refused, so a run without
        faults writes what it always did.
        """
        if committed:
            self.writer.append_record({"seq": None, "type": "hold_committed", "round_id": round_id, "now_s": now,
                                       "agents": list(committed), "orders": list(committed.values())})
        if released or refused:
            record = {"seq": None, "type": "hold_released", "round_id": round_id, "now_s": now, "agents": released}
            if refused:
                record["refused"] = list(refused)
                if refused_by:
                    record["refused_by"] = {aid: list(ids) for aid, ids in refused_by.items()}
                if cancelled:
                    record["cancelled"] = {aid: list(ids) for aid, ids in cancelled.items()}
            self.writer.append_record(record)

    def profile_changed(self, name: str, now: float) -> None:
        """Journals a live profile switch, with the weights the name stands for."""
        try:
            profile = load_profile(name)
        except ConfigError:
            profile = None
        self.writer.append("profile_changed", name=name, now_s=now,
                           profile=None if profile is None else profile.model_dump(mode="json"), observed=False)
        self._profile_name = name
        if profile is not None:
            self._profile = profile

    def order_dropped(self, order_id: str, reason: str, rounds_failed: int, now: float) -> None:
        """Journals that an accepted order ends unfulfilled without a round: the HTTP service
        gives up an order whose rounds kept failing (`serve.keeper`), so it cannot keep
        taking the service down."""
        if not self._started:
            self._require_start("order_dropped")
        self.writer.append("order_dropped", order_id=order_id, reason=reason, rounds_failed=rounds_failed, now_s=now)

    # -- lifecycle ----------------------------------------------------------------------
    def flush(self) -> None:
        """Syncs the journal (per its fsync policy)."""
        self.writer.flush()

    def close(self) -> None:
        """Syncs and closes the journal; idempotent."""
        self.writer.close()

    def __enter__(self) -> JournalRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
