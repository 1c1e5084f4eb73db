"""Re-clearing a journal's one-order rounds as columns: a chunk of rounds per NumPy call.

A one-order round costs replay a fixed number of NumPy calls and Python objects
(`Round`, `QuoteColumns`, a book, an allocation, award arrays) whatever its size, and
that fixed cost, not arithmetic, is its re-clearing time. Here a chunk of such rounds is
decoded straight from the journal's flat ``round_cleared`` layout into one stack of
columns (`market.book.OneOrderQuotes`), joined and scored in one pass
(`market.book.one_order_book`), cleared with the greedy one-order rule for every round
at once (`market.clearing.one_order_allocations`) and compared with the log in one
pass. Nothing here decides an award: the join, the scores and the winner rule are the
engine's own, applied to more rounds per call.

The columns only ever say "this round re-clears to its log bit for bit". A round they
cannot vouch for goes to the per-round path (`market.replay`), which reports it as it
always has: a round with a layout the per-round path would reject or read differently
(see `_plain`), a tie on the best score or a winner without capacity (``decided`` is
False), and any round of a chunk in which the columns find a difference.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from market.book import CategoryTable, OneOrderQuotes, _site_index, one_order_book
from market.clearing import one_order_allocations
from market.config import ProfileCfg
from market.round import SourceSites
from market.types import CATEGORY_CODES, Order, Tier

__all__ = ["BidderRows", "OneOrderCheck", "OneOrderColumns"]

_I4, _I8, _F8 = np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.float64)
_NUMBER = (float, int)
_QTY_MAX = 1 << 31  # far below int64 overflow in build_round's units and lines


@dataclass(frozen=True)
class BidderRows:
    """A run's bidder table as the columns need it: per journaled bidder row, two lookups.

    Attributes:
        ids: the bidder table (``run_started``), in row order.
        award_row: per row, the row an award names (`award_arrays` looks the id up
            again, so a repeated id names its last row).
        category_row: per row, its row in the run's `CategoryTable`.
    """

    ids: tuple[str, ...]
    award_row: np.ndarray
    category_row: np.ndarray

    @classmethod
    def of(cls, ids: tuple[str, ...], index: dict[str, int], categories: CategoryTable) -> BidderRows:
        """The lookups for a run's bidder table, its id index and its category table."""
        return cls(ids, np.array([index[b] for b in ids], dtype=np.int64),
                   np.array([categories.index[b] for b in ids], dtype=np.int64))

    def sites(self, sources: SourceSites) -> np.ndarray:
        """Per row, the source site that bidder is (-1: none), as `_join` looks quotes up."""
        site_of = _site_index(tuple(sources.ids))
        return np.array([site_of.get(b, -1) for b in self.ids], dtype=np.int64)


@dataclass(slots=True)
class OneOrderCheck:
    """What the columns found for a chunk of one-order rounds: per round, the re-clear and the verdict.

    Attributes:
        decided: per round, whether the columns re-cleared it (False: the per-round
            path must; the other columns then mean nothing for it).
        same: per round, whether the re-clear is its log bit for bit.
        award_i: [3, rounds] (int64): winning combination, source and leg rows of the
            bidder table (-1: none), as `award_arrays` lays them out.
        award_f: [4, rounds] (float64): source payment, leg payment, the winner's score
            and its predicted delivery (NaN where unserved).
        reason: per round, why its order went unserved ('' when awarded).
        total_cost: per round (float64).
    """

    decided: np.ndarray
    same: np.ndarray
    award_i: np.ndarray
    award_f: np.ndarray
    reason: list[str]
    total_cost: np.ndarray

    @classmethod
    def none(cls, n: int) -> OneOrderCheck:
        """A chunk of ``n`` rounds none of which the columns re-cleared."""
        return cls(np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), np.full((3, n), -1, dtype=np.int64),
                   np.full((4, n), math.nan), [""] * n, np.full(n, math.nan))


def _buildable(order: Order) -> bool:
    """Whether `build_round` takes this order as a plain one (what the columns skip building).

    The columns read only an order's promise, reserve, tier and category, so they
    vouch only for orders whose every field `build_round` converts is a plain number
    (a string or an oversized quantity would fail, or convert, there).
    """
    if not (type(order.lat) in _NUMBER and type(order.lon) in _NUMBER and type(order.created_s) in _NUMBER
            and type(order.promise_s) in _NUMBER and type(order.reserve) in _NUMBER
            and type(order.locker_ok) is bool):
        return False
    for item in order.items:
        if type(item.sku) is not str or type(item.qty) is not int or not 0 <= item.qty < _QTY_MAX:
            return False
    return True


def _is(dtype: np.dtype, want: np.dtype) -> bool:
    """dtype check; identity first (NumPy reuses its builtin dtype objects)."""
    return dtype is want or dtype == want


def _plain(rec: dict[str, Any]) -> bool:
    """Whether a round_cleared record has the journal's flat layout as the writer makes it.

    That is: three plain counts, quote arrays of the writer's dtypes and of the lengths
    the counts give, one order's award arrays, a float total cost. Anything else
    (quotes one map each, other dtypes, missing fields) goes to the per-round path,
    which reads, rejects or reports it.
    """
    counts = rec.get("q_counts")
    if type(counts) is not list or len(counts) != 3:
        return False
    n_q, n_rows, n_leg = counts
    if not (type(n_q) is int and type(n_rows) is int and type(n_leg) is int and n_q >= 0 and n_rows >= 0
            and n_leg >= 0):
        return False
    qi, qf, ai, af = rec.get("quotes_i"), rec.get("quotes_f"), rec.get("award_i"), rec.get("award_f")
    return (type(qi) is np.ndarray and _is(qi.dtype, _I4) and qi.shape == (4 * n_q + 2 * n_rows,)
            and type(qf) is np.ndarray and _is(qf.dtype, _F8) and qf.shape == (n_q + 2 * n_rows + n_leg,)
            and type(ai) is np.ndarray and (_is(ai.dtype, _I4) or _is(ai.dtype, _I8)) and ai.shape == (3, 1)
            and type(af) is np.ndarray and _is(af.dtype, _F8) and af.shape == (4, 1)
            and type(rec.get("total_cost")) is float)


@dataclass(slots=True)
class _Stack:
    """A chunk's flat quote arrays cut into quotes and rows (their contents not yet checked)."""

    quote_round: np.ndarray
    bidder: np.ndarray
    rows: np.ndarray
    capacity: np.ndarray
    is_leg: np.ndarray
    reliability: np.ndarray
    row_round: np.ndarray
    row_quote: np.ndarray
    leg_row: np.ndarray  # per row: it is a leg quote's
    order_idx: np.ndarray
    source_idx: np.ndarray
    values: np.ndarray  # [2, rows]: price, ready_s or pickup_s
    travel_s: np.ndarray  # per leg row


def _segments(sizes: np.ndarray) -> np.ndarray:
    """Which part of its round each element of the chunk's concatenated arrays is.

    ``sizes`` is [rounds, parts]: each round's array is its parts laid end to end, and
    the chunk's arrays are the rounds' laid end to end, so one ``repeat`` labels them all.
    """
    kinds = np.tile(np.arange(sizes.shape[1], dtype=np.int8), sizes.shape[0])
    return np.repeat(kinds, sizes.ravel())


def _cut(counts: np.ndarray, qi: list[np.ndarray], qf: list[np.ndarray]) -> _Stack | np.ndarray:
    """Cuts a chunk's ``quotes_i`` / ``quotes_f`` (lengths checked) into quotes and rows.

    The flat layout is, per round: ``quotes_i`` = quote heads (bidder, rows, capacity,
    is_leg), order_idx, source_idx; ``quotes_f`` = reliability, price, ready_s or
    pickup_s, travel_s of the leg rows (``JournalRecorder._quote_fields``).

    Returns:
        The stack, or, where some round's quote rows do not add up to its counts (the
        per-round path rejects that round), per round whether they do.
    """
    n_q, n_rows, n_leg = counts[:, 0], counts[:, 1], counts[:, 2]
    ints, floats = np.concatenate(qi), np.concatenate(qf)
    part_i = _segments(np.stack([4 * n_q, n_rows, n_rows], axis=1))
    part_f = _segments(np.stack([n_q, n_rows, n_rows, n_leg], axis=1))
    head = ints[part_i == 0].astype(np.int64).reshape(-1, 4)
    rows, is_leg = head[:, 1], head[:, 3] != 0
    quote_round = np.repeat(np.arange(len(counts)), n_q)
    fits = (np.bincount(quote_round, rows, len(counts)) == n_rows) \
        & (np.bincount(quote_round, rows * is_leg, len(counts)) == n_leg)
    if (rows < 0).any():
        fits &= np.bincount(quote_round[rows < 0], minlength=len(counts)) == 0
    if not fits.all():
        return fits
    row_quote = np.repeat(np.arange(len(rows)), rows)
    return _Stack(
        quote_round=quote_round, bidder=head[:, 0], rows=rows, capacity=head[:, 2], is_leg=is_leg,
        reliability=floats[part_f == 0], row_round=np.repeat(np.arange(len(counts)), n_rows), row_quote=row_quote,
        leg_row=is_leg[row_quote], order_idx=ints[part_i == 1], source_idx=ints[part_i == 2].astype(np.int64),
        values=np.stack([floats[part_f == 1], floats[part_f == 2]]), travel_s=floats[part_f == 3],
    )


def _layout_ok(s: _Stack, site: np.ndarray, n_sites: int, n: int) -> np.ndarray:
    """Per round, whether its quotes meet `OneOrderQuotes`' preconditions.

    Every bidder row in the table, every row for the round's order (0), every source
    quote one row for a site no other source quote of the round is for, and every leg
    row collecting from a site of the round.
    """
    n_bidders = len(site)
    known = (s.bidder >= 0) & (s.bidder < n_bidders)
    quote_site = np.append(site, -1)[np.where(known, s.bidder, n_bidders)]  # -1: not a site, or no such bidder
    bad_quote = ~known | (~s.is_leg & ((s.rows != 1) | (quote_site < 0)))
    bad_row = (s.order_idx != 0) | (s.leg_row & ((s.source_idx < 0) | (s.source_idx >= n_sites)))
    ok = np.bincount(s.quote_round[bad_quote], minlength=n) == 0
    ok &= np.bincount(s.row_round[bad_row], minlength=n) == 0
    sited = ~s.is_leg & (quote_site >= 0)
    taken = np.bincount(s.quote_round[sited] * n_sites + quote_site[sited], minlength=n * n_sites)
    ok[np.flatnonzero(taken > 1) // max(n_sites, 1)] = False  # two source quotes for one site
    return ok


def _one_order_quotes(s: _Stack, site: np.ndarray, rows: BidderRows, orders: Sequence[Order],
                      opened_s: Sequence[float], n_sites: int) -> OneOrderQuotes:
    """The stack as `one_order_book` takes it (its preconditions checked by `_layout_ok`).

    A source quote has exactly one row, so the source rows, in order, are the source quotes.
    """
    src, leg = ~s.leg_row, s.leg_row
    src_quote = s.row_quote[src]
    times = np.array([[o.promise_s for o in orders], [o.reserve for o in orders], opened_s], dtype=np.float64)
    return OneOrderQuotes(
        opened_s=times[2], promise_s=times[0], reserve=times[1],
        vip=np.array([o.tier == Tier.VIP for o in orders], dtype=bool),
        category=np.array([CATEGORY_CODES[o.category] for o in orders], dtype=np.int8),
        sites=n_sites, bidder=rows.category_row[s.bidder], capacity=s.capacity, reliability=s.reliability,
        src_round=s.row_round[src], src_site=site[s.bidder[src_quote]], src_quote=src_quote,
        src_values=s.values[:, src], leg_round=s.row_round[leg], leg_site=s.source_idx[leg],
        leg_quote=s.row_quote[leg], leg_values=s.values[:, leg], travel_s=s.travel_s,
    )


def _recleared(s: _Stack, rows: BidderRows, q: OneOrderQuotes, profile: ProfileCfg,
               categories: CategoryTable) -> OneOrderCheck:
    """Clears the stack: per round the awards as `award_arrays` lays them out (``same`` not yet known)."""
    book = one_order_book(q, profile, categories)
    alloc = one_order_allocations(book)
    c = book.combos
    won = alloc.combo >= 0
    w = alloc.combo[won]
    award_i = np.full((3, len(q)), -1, dtype=np.int64)
    award_i[0] = alloc.winner
    award_i[1, won] = rows.award_row[s.bidder[c.src[w]]]
    award_i[2, won] = rows.award_row[s.bidder[c.leg[w]]]
    award_f = np.full((4, len(q)), math.nan)
    award_f[0], award_f[1] = alloc.src_payment, alloc.leg_payment
    award_f[2, won], award_f[3, won] = c.score[w], c.delivery_s[w]
    return OneOrderCheck(alloc.decided, np.zeros(len(q), dtype=bool), award_i, award_f, alloc.reason,
                         alloc.total_cost)


def _same(recs: Sequence[dict[str, Any]], reasons: Sequence[tuple[str, ...]], got: OneOrderCheck) -> np.ndarray:
    """Per round, whether the re-clear is its log bit for bit, compared as `market.replay.compare` does.

    Integer fields by value, float fields and the total cost by their bits, reasons by equality.
    """
    want_i = np.concatenate([r["award_i"] for r in recs], axis=1).astype(np.int64)
    want_f = np.concatenate([r["award_f"] for r in recs], axis=1)
    costs = np.array([r["total_cost"] for r in recs], dtype=np.float64)
    same = ((want_i == got.award_i).all(axis=0) & (want_f.view(np.int64) == got.award_f.view(np.int64)).all(axis=0)
            & (costs.view(np.int64) == got.total_cost.view(np.int64)))
    return same & np.array([want == (r,) for want, r in zip(reasons, got.reason)], dtype=bool)


class OneOrderColumns:
    """Re-clears chunks of one replay's one-order rounds as columns (`check`).

    It remembers what it has checked once: whether `build_round` takes an order
    plainly (a retried order comes back), and each run's site of every bidder row.
    """

    def __init__(self) -> None:
        self._orders: dict[int, tuple[Order, bool]] = {}  # id(order): the order (kept: the id stays its) and the answer
        self._sites: dict[tuple[int, int], tuple[BidderRows, SourceSites, np.ndarray]] = {}

    def _buildable(self, order: Order) -> bool:
        hit = self._orders.get(id(order))
        if hit is None:
            hit = self._orders[id(order)] = (order, _buildable(order))
        return hit[1]

    def _site(self, rows: BidderRows, sources: SourceSites) -> np.ndarray:
        key = (id(rows), id(sources))
        hit = self._sites.get(key)
        if hit is None:
            hit = self._sites[key] = (rows, sources, rows.sites(sources))
        return hit[2]

    def check(
        self,
        recs: Sequence[dict[str, Any]],
        orders: Sequence[Order],
        opened_s: Sequence[float],
        reasons: Sequence[tuple[str, ...]],
        profile: ProfileCfg,
        sources: SourceSites,
        rows: BidderRows,
        categories: CategoryTable,
    ) -> OneOrderCheck:
        """Re-clears one-order rounds cleared by greedy first-score with one profile and one set of sites.

        Args:
            recs: each round's ``round_cleared`` record.
            orders: each round's order.
            opened_s: each round's opening time (as `build_round` takes it: a float).
            reasons: each round's logged reasons (as the per-round comparison reads them).
            profile: the profile every round was cleared with.
            sources: the source sites every round was broadcast with.
            rows: the run's bidder table lookups.
            categories: the run's declared category abilities.

        Returns:
            Per round, whether the columns re-cleared it and whether that matches its log.
        """
        n = len(recs)
        out = OneOrderCheck.none(n)
        keep = np.array([k for k in range(n) if _plain(recs[k]) and self._buildable(orders[k])], dtype=np.int64)
        site = self._site(rows, sources)
        n_sites = len(sources.ids)
        while len(keep):  # a pass that finds rounds it cannot take drops them and stacks the rest again
            taken = keep.tolist()
            counts = np.array([recs[k]["q_counts"] for k in taken], dtype=np.int64)
            s = _cut(counts, [recs[k]["quotes_i"] for k in taken], [recs[k]["quotes_f"] for k in taken])
            if not isinstance(s, _Stack):
                keep = keep[s]
                continue
            ok = _layout_ok(s, site, n_sites, len(taken))
            if not ok.all():
                keep = keep[ok]
                continue
            q = _one_order_quotes(s, site, rows, [orders[k] for k in taken], [opened_s[k] for k in taken], n_sites)
            got = _recleared(s, rows, q, profile, categories)
            got.same = _same([recs[k] for k in taken], [reasons[k] for k in taken], got)
            out.decided[keep], out.same[keep] = got.decided, got.same
            out.award_i[:, keep], out.award_f[:, keep], out.total_cost[keep] = got.award_i, got.award_f, got.total_cost
            for k, r in zip(taken, got.reason):
                out.reason[k] = r
            break
        return out
