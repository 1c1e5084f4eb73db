"""The quote book: joins source and last-mile quotes into scored combinations.

One broadcast suffices because each leg quotes per source; the join is a dense
lookup of the source matrix, so there is no Python loop over combinations. The book
is built from the quotes as flat columns (`QuoteColumns`), so building it costs a
fixed number of NumPy calls whatever the number of bidders: in a one-order round that
fixed cost, not the arithmetic, is the clearing time.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from market.config import ProfileCfg
from market.round import Round
from market.scoring import score as score_fn
from market.scoring import unfulfilled_penalty
from market.types import Kind, LegQuote, Quote, SourceQuote


@dataclass(slots=True)
class Combos:
    """Source + last-mile combinations, one element per combination."""

    order: np.ndarray
    src: np.ndarray  # bidder index of the warehouse
    leg: np.ndarray  # bidder index of the last-mile bidder
    src_price: np.ndarray
    leg_price: np.ndarray
    ready_s: np.ndarray
    pickup_s: np.ndarray
    delivery_s: np.ndarray
    reliability: np.ndarray
    score: np.ndarray
    admissible: np.ndarray  # hard constraints: reserve, category, VIP promise
    feasible: np.ndarray  # admissible and better than leaving the order unserved

    @property
    def price(self) -> np.ndarray:
        """Total price the retailer pays for the combination."""
        return self.src_price + self.leg_price

    def __len__(self) -> int:
        return len(self.order)


@dataclass(slots=True)
class QuoteBook:
    """Everything a mechanism needs to clear one round."""

    rnd: Round
    profile: ProfileCfg
    bidder_ids: tuple[str, ...]
    kinds: tuple[Kind, ...]
    capacity: np.ndarray  # per bidder, units it can take this round
    reliability: np.ndarray  # per bidder, as quoted
    combos: Combos
    penalty: np.ndarray  # per order: cost of leaving it unserved
    quotes: QuoteColumns  # what was scored, in bidder-index order (the journal writes these)


@dataclass(frozen=True)
class CategoryTable:
    """Declared category abilities of every bidder, as one matrix for fast lookup."""

    index: dict[str, int]
    matrix: np.ndarray  # [bidder, category] bool

    @classmethod
    def from_masks(cls, masks: dict[str, np.ndarray]) -> CategoryTable:
        """Builds the table from per-bidder masks."""
        ids = list(masks)
        matrix = np.stack([masks[b] for b in ids]) if ids else np.zeros((0, 4), dtype=bool)
        return cls({b: i for i, b in enumerate(ids)}, matrix)

    def rows(self, ids: tuple[str, ...]) -> np.ndarray:
        """[len(ids), category] abilities of the given bidders."""
        return self.matrix[np.array([self.index[b] for b in ids], dtype=np.intp)]  # a list index costs 2x


def _read_only(dtype: type) -> np.ndarray:
    """An empty array nobody can write to, safe to share."""
    empty = np.zeros(0, dtype=dtype)
    empty.flags.writeable = False
    return empty


_NONE_I, _NONE_F, _NONE_B = _read_only(np.int64), _read_only(np.float64), _read_only(np.bool_)


@dataclass(slots=True)
class QuoteColumns:
    """A round's quotes as flat columns: quote after quote, each quote's rows consecutive.

    It is the journal's own layout (``round_cleared`` in docs/JOURNAL.md), so replay
    decodes a round straight into it instead of building an object per quote, and it is
    what `build_book` scores, with one NumPy call per column instead of one per quote.

    Attributes:
        agent_ids: per quote, the bidder.
        is_leg: per quote, whether it quotes last-mile legs (else it is a source quote).
        rows: per quote, how many rows it has (int64).
        capacity: per quote, orders the bidder can take this round (int64).
        reliability: per quote, float64.
        order_idx: per row, the order's index in the round.
        values: [2, rows] float64: the price, then ready_s on source rows or pickup_s on
            leg rows.
        source_idx: per row, the source site's index (-1 on source rows).
        travel_s: per leg row, leg rows in quote order: source to customer (float64).
        floats: reliability, values and travel_s back to back, when they are views of one
            array (the journal's ``quotes_f``); None otherwise.
        indices: order_idx then source_idx back to back, likewise (int64), or None.
    """

    agent_ids: tuple[str, ...]
    is_leg: tuple[bool, ...]
    rows: np.ndarray
    capacity: np.ndarray
    reliability: np.ndarray
    order_idx: np.ndarray
    values: np.ndarray
    source_idx: np.ndarray
    travel_s: np.ndarray
    floats: np.ndarray | None = None
    indices: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.agent_ids)

    def float_block(self) -> np.ndarray:
        """reliability, values and travel_s as one float64 array: the journal's ``quotes_f``."""
        if self.floats is not None:
            return self.floats
        return np.concatenate((self.reliability, self.values.ravel(), self.travel_s), dtype=np.float64)

    def index_block(self) -> np.ndarray:
        """order_idx then source_idx as one array: the tail of the journal's ``quotes_i``."""
        if self.indices is not None:
            return self.indices
        return np.concatenate((self.order_idx, self.source_idx))

    @classmethod
    def of(cls, quotes: Sequence[Quote]) -> QuoteColumns:
        """Flattens quote objects, source quotes first; anything that is not a quote is ignored.

        Values become float64, which is what NumPy would promote them to when they meet
        the float64 source matrix, so the scores are the same bits either way.
        """
        sources = [q for q in quotes if isinstance(q, SourceQuote)]
        legs = [q for q in quotes if isinstance(q, LegQuote)]
        ordered: list[Quote] = [*sources, *legs]
        if not ordered:
            return cls((), (), _NONE_I, _NONE_I, _NONE_F, _NONE_I, _NONE_F.reshape(2, 0), _NONE_I, _NONE_F)
        n, rows = len(ordered), [len(q.order_idx) for q in ordered]
        total = sum(rows)
        floats = np.concatenate([np.array([q.reliability for q in ordered], dtype=np.float64),
                                 *[q.price for q in ordered], *[q.ready_s for q in sources],
                                 *[q.pickup_s for q in legs], *[q.travel_s for q in legs]], dtype=np.float64)
        indices = np.concatenate([*[q.order_idx for q in ordered], np.full(sum(rows[:len(sources)]), -1, dtype=np.int64),
                                  *[q.source_idx for q in legs]])
        return cls(
            agent_ids=tuple([q.agent_id for q in ordered]),
            is_leg=(False,) * len(sources) + (True,) * len(legs),
            rows=np.array(rows, dtype=np.int64),
            capacity=np.array([q.capacity for q in ordered], dtype=np.int64),
            reliability=floats[:n],
            order_idx=indices[:total],
            values=floats[n:n + 2 * total].reshape(2, total),
            source_idx=indices[total:],
            travel_s=floats[n + 2 * total:],
            floats=floats,
            indices=indices,
        )

    def sources_first(self) -> QuoteColumns:
        """The same quotes with every source quote before every leg quote, each kind in its order.

        That order gives each bidder its index in the book, so it decides ties; quote
        objects are flattened in it already, a journaled round may interleave them.
        """
        n_src = self.is_leg.count(False)
        if not any(self.is_leg[:n_src]):
            return self
        perm = sorted(range(len(self)), key=self.is_leg.__getitem__)
        row_perm = np.argsort(np.repeat(self.is_leg, self.rows), kind="stable")
        return QuoteColumns(
            tuple(self.agent_ids[k] for k in perm), tuple(self.is_leg[k] for k in perm), self.rows[perm],
            self.capacity[perm], self.reliability[perm], self.order_idx[row_perm], self.values[:, row_perm],
            self.source_idx[row_perm], self.travel_s,
        )

    def for_orders(self, remap: np.ndarray) -> QuoteColumns:
        """The quotes for some of the round's orders, renumbered (a what-if drops served orders).

        Args:
            remap: per order of the round, its index among the kept orders, or -1 to drop
                it. A quote left without rows is dropped whole, as if its bidder had not
                quoted.
        """
        new = remap[self.order_idx]
        kept = new >= 0
        kept_rows = np.bincount(np.repeat(np.arange(len(self)), self.rows)[kept], minlength=len(self))
        quoted = kept_rows > 0
        pick = np.flatnonzero(quoted).tolist()
        return QuoteColumns(
            tuple(self.agent_ids[k] for k in pick), tuple(self.is_leg[k] for k in pick), kept_rows[quoted],
            self.capacity[quoted], self.reliability[quoted], new[kept], self.values[:, kept], self.source_idx[kept],
            self.travel_s[kept[np.repeat(np.array(self.is_leg, dtype=bool), self.rows)]],
        )


@functools.lru_cache(maxsize=64)
def _site_index(ids: tuple[str, ...]) -> dict[str, int]:
    """Site id to index; cached because a fleet's sites rarely change between rounds (do not mutate)."""
    return {sid: i for i, sid in enumerate(ids)}


@dataclass(slots=True)
class _Joined:
    """Every (source, leg) combination of a round, before scoring."""

    order: np.ndarray
    src: np.ndarray  # bidder index of the source quote
    leg: np.ndarray  # bidder index of the leg quote
    source: np.ndarray  # [2, n]: source price, ready_s
    last_mile: np.ndarray  # [2, n]: leg price, pickup_s
    travel_s: np.ndarray


def _join(rnd: Round, cols: QuoteColumns) -> _Joined | None:
    """Joins every leg row to the source quote for the same (site, order) in one lookup.

    ``cols`` has its source quotes first. A leg row whose source did not quote that
    order is no combination; None when no row makes one.
    """
    n_src = cols.is_leg.count(False)
    src_rows = len(cols.order_idx) - len(cols.travel_s)
    if not n_src or src_rows == len(cols.order_idx):
        return None
    n_sites = len(rnd.sources.ids)
    matrix = np.empty((2, n_sites, rnd.size))  # [price | ready_s, site, order]
    matrix.fill(np.inf)
    site_of = _site_index(tuple(rnd.sources.ids))
    site = np.array([site_of[a] for a in cols.agent_ids[:n_src]], dtype=np.intp)  # as a list, indexing costs 2x
    site_rows = site if src_rows == n_src else np.repeat(site, cols.rows[:n_src])  # mostly one row each
    matrix[:, site_rows, cols.order_idx[:src_rows]] = cols.values[:, :src_rows]
    bidder = np.empty(n_sites, dtype=np.int64)
    bidder.fill(-1)
    bidder[site] = np.arange(n_src)
    order, site_l, travel = cols.order_idx[src_rows:], cols.source_idx[src_rows:], cols.travel_s
    leg = np.repeat(np.arange(n_src, len(cols)), cols.rows[n_src:])
    source, last_mile = matrix[:, site_l, order], cols.values[:, src_rows:]
    ok = np.isfinite(source[0])
    n_ok = np.count_nonzero(ok)  # a third of ok.all()'s cost
    if not n_ok:
        return None
    if n_ok < len(ok):
        order, site_l, leg, travel = order[ok], site_l[ok], leg[ok], travel[ok]
        source, last_mile = source[:, ok], last_mile[:, ok]
    return _Joined(order, bidder[site_l], leg, source, last_mile, travel)


def _combos(rnd: Round, cols: QuoteColumns, profile: ProfileCfg, categories: CategoryTable | None,
            penalty: np.ndarray) -> Combos:
    """Scores the joined combinations and applies the hard constraints.

    A round without combinations (a third of a quiet market's one-order rounds) skips
    the scoring: its arrays are empty, shared and read-only.
    """
    j = _join(rnd, cols)
    if j is None:
        i, f, b = _NONE_I, _NONE_F, _NONE_B
        return Combos(i, i, i, f, f, f, f, f, f, f, b, b)
    allowed = categories.rows(cols.agent_ids) if categories is not None else None
    return _scored(j, cols.reliability, rnd.opened_s, rnd, allowed, profile, penalty)


def _scored(j: _Joined, reliability: np.ndarray, opened_s: float | np.ndarray, orders: Round | OneOrderQuotes,
            allowed: np.ndarray | None, profile: ProfileCfg, penalty: np.ndarray) -> Combos:
    """Scores joined combinations and applies the hard constraints: the one place both do it.

    Args:
        j: the combinations; ``j.src`` and ``j.leg`` index ``reliability`` and ``allowed``.
        opened_s: the round's opening time, or one per combination (a stack of rounds).
        orders: per order (per round, for a stack) its promise, reserve, VIP flag and
            category, indexed by ``j.order``.
        allowed: [quote, category] declared abilities, or None to skip that check.
    """
    order, sp, ready, lp, pickup = j.order, j.source[0], j.source[1], j.last_mile[0], j.last_mile[1]
    combo_rel = reliability[j.src] * reliability[j.leg]
    delivery = np.maximum(ready, pickup) + j.travel_s
    price = sp + lp
    vip, promise = orders.vip[order], orders.promise_s[order]
    scores = score_fn(price, delivery, opened_s, promise, combo_rel, vip, profile)
    admissible = price <= orders.reserve[order]
    if profile.vip_hard_promise:
        admissible &= ~vip | (delivery <= promise)
    if allowed is not None:
        cat = orders.category[order]
        admissible &= allowed[j.src, cat] & allowed[j.leg, cat]
    feasible = admissible & (scores < penalty[order])
    return Combos(order, j.src, j.leg, sp, lp, ready, pickup, delivery, combo_rel, scores, admissible, feasible)


def build_book(
    rnd: Round,
    quotes: Sequence[Quote] | QuoteColumns,
    kinds: dict[str, Kind],
    profile: ProfileCfg,
    categories: CategoryTable | None = None,
) -> QuoteBook:
    """Scores every feasible source + last-mile combination of the round.

    Bidders are indexed source quotes first, then leg quotes, each in the order given;
    combinations come in leg-row order. Both decide ties.

    Args:
        quotes: validated quotes, at most one per bidder, as objects or as columns.
        kinds: the kind of every bidder id.
        categories: declared category abilities per bidder; a quote for an order
            outside them is infeasible whatever the bidder claims.
    """
    cols = (quotes if isinstance(quotes, QuoteColumns) else QuoteColumns.of(quotes)).sources_first()
    penalty = unfulfilled_penalty(rnd.vip, profile)
    return QuoteBook(
        rnd=rnd,
        profile=profile,
        bidder_ids=cols.agent_ids,
        kinds=tuple(kinds[b] for b in cols.agent_ids),
        capacity=cols.capacity,
        reliability=cols.reliability,
        combos=_combos(rnd, cols, profile, categories, penalty),
        penalty=penalty,
        quotes=cols,
    )


# --------------------------------------------------------------------------- many one-order rounds at once


@dataclass(slots=True)
class OneOrderQuotes:
    """The quotes of many one-order rounds as one set of flat columns, round after round.

    A one-order round's book costs a fixed number of NumPy calls (`build_book`), which is
    its whole clearing time; replay re-clears thousands of such rounds, so it stacks a
    chunk of them here and `one_order_book` joins and scores them all with that same
    fixed number of calls. Read the stack as one round whose orders are the rounds: order
    r is round r's only order, with its own opening time, and no bidder is shared between
    rounds (each quote keeps its own capacity).

    Preconditions (what the caller checks; a round that fails them goes to `build_book`):
    every source quote has exactly one row (its round's order), no two source quotes of
    a round are for the same site, every site index is below the rounds' site count, and
    every ``bidder`` is a row of the category table used.

    Attributes:
        opened_s: per round, when it opened (float64).
        promise_s: per round, its order's promise (float64).
        reserve: per round, its order's reserve (float64).
        vip: per round, whether its order is VIP.
        category: per round, its order's category code (int8).
        sites: how many source sites every round has.
        bidder: per quote, its row in the category table (int64).
        capacity: per quote, orders it can take in its round (int64).
        reliability: per quote (float64).
        src_round: per source quote, its round (int64, non-decreasing).
        src_site: per source quote, the site it is (int64).
        src_quote: per source quote, its quote (int64).
        src_values: [2, source quotes]: price, ready_s (float64).
        leg_round: per leg row, its round (int64, non-decreasing; rows in quote order).
        leg_site: per leg row, the site it collects from (int64).
        leg_quote: per leg row, its quote (int64).
        leg_values: [2, leg rows]: price, pickup_s (float64).
        travel_s: per leg row (float64).
    """

    opened_s: np.ndarray
    promise_s: np.ndarray
    reserve: np.ndarray
    vip: np.ndarray
    category: np.ndarray
    sites: int
    bidder: np.ndarray
    capacity: np.ndarray
    reliability: np.ndarray
    src_round: np.ndarray
    src_site: np.ndarray
    src_quote: np.ndarray
    src_values: np.ndarray
    leg_round: np.ndarray
    leg_site: np.ndarray
    leg_quote: np.ndarray
    leg_values: np.ndarray
    travel_s: np.ndarray

    def __len__(self) -> int:
        return len(self.opened_s)


@dataclass(slots=True)
class OneOrderBook:
    """Every combination of a stack of one-order rounds, scored: `QuoteBook` with rounds for orders.

    ``combos.order`` is the round; ``combos.src`` and ``combos.leg`` are quotes of the
    stack, so ``capacity`` is per quote. Combinations come round after round, each
    round's in the order `build_book` gives them, so a combination's index within its
    round (``combos.order`` runs) is the index `build_book` gives it.
    """

    combos: Combos
    capacity: np.ndarray  # per quote
    penalty: np.ndarray  # per round: cost of leaving its order unserved
    rounds: int


def one_order_book(q: OneOrderQuotes, profile: ProfileCfg, categories: CategoryTable) -> OneOrderBook:
    """`build_book` of every round of the stack in one pass: the same combinations, to the bit.

    The join is `_join`'s dense lookup with the round as one more axis: each leg row
    finds the source quote for its (round, site), and rows whose source did not quote
    (or quoted a price that is not finite) make no combination. Scores go through
    `market.scoring.score` and the hard constraints are `_combos`' own, element by
    element, so each combination has the bits its round's own book gives it.
    """
    n = len(q)
    matrix = np.empty((2, n, q.sites))  # [price | ready_s, round, site]
    matrix.fill(np.inf)
    matrix[:, q.src_round, q.src_site] = q.src_values
    owner = np.full((n, q.sites), -1, dtype=np.int64)
    owner[q.src_round, q.src_site] = q.src_quote
    source = matrix[:, q.leg_round, q.leg_site]
    ok = np.isfinite(source[0])
    order, site = q.leg_round[ok], q.leg_site[ok]
    j = _Joined(order, owner[order, site], q.leg_quote[ok], source[:, ok], q.leg_values[:, ok], q.travel_s[ok])
    penalty = unfulfilled_penalty(q.vip, profile)
    combos = _scored(j, q.reliability, q.opened_s[order], q, categories.matrix[q.bidder], profile, penalty)
    return OneOrderBook(combos, q.capacity, penalty, n)
