"""The one-order fast path and the flat quote columns clear exactly as the general path does.

Books here draw prices, times and reliabilities from a few values, so combinations often
tie on score (and on price), and capacities include 0: the cases where a shortcut that
skips the sort could pick another winner.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from market.book import QuoteBook, QuoteColumns, build_book
from market.clearing import (
    Allocation,
    ScoringAuction,
    greedy_winners,
    one_order_allocation,
    price_awards,
    single_order_winner,
)
from market.config import load_profile
from market.round import Round, build_round
from market.types import Kind, LegQuote, Quote, SourceQuote
from tests.factories import GRID, random_round

PROFILES = [load_profile(p) for p in ("balanced", "cost_first", "time_first", "vip_guard")]
KINDS = (Kind.RIDER_POOL, Kind.CROWD, Kind.LOCKER)


def tied_quotes(rnd: Round, seed: int, n_legs: int, choices: int = 2) -> tuple[list[Quote], dict[str, Kind]]:
    """Quotes whose values come from the first ``choices`` (1 to 3) of a few, so scores tie often.

    Capacity may be 0, and a third choice prices a leg over any reserve, so orders go
    unserved for every reason.
    """
    rng = np.random.default_rng(seed)

    def pick(n: int, *values: float) -> np.ndarray:
        return rng.choice(values[:choices], size=n)

    def terms() -> tuple[float, int]:  # reliability, capacity
        return float(rng.choice([1.0, 1.0, 1.0, 0.9])), int(rng.choice([0, 1, 1, 2]))

    quotes: list[Quote] = []
    kinds: dict[str, Kind] = {}
    for sid in rnd.sources.ids:
        idx = np.flatnonzero(rng.uniform(size=rnd.size) < 0.8)
        if len(idx):
            quotes.append(SourceQuote(sid, idx, pick(len(idx), 1.0, 2.0, 1.0), pick(len(idx), 60.0, 300.0, 60.0),
                                      *terms()))
            kinds[sid] = Kind.WAREHOUSE
    grid = np.meshgrid(np.arange(len(rnd.sources.ids)), np.arange(rnd.size), indexing="ij")
    sites, orders = grid[0].ravel(), grid[1].ravel()
    for j in range(n_legs):
        keep = rng.uniform(size=len(orders)) < 0.7
        n = int(keep.sum())
        if n:
            lid = f"leg-{j}"
            quotes.append(LegQuote(lid, orders[keep], sites[keep], pick(n, 2.0, 3.0, 40.0), pick(n, 0.0, 600.0, 0.0),
                                   pick(n, 600.0, 1200.0, 600.0), *terms()))
            kinds[lid] = KINDS[j % 3]
    return quotes, kinds


@st.composite
def tied_books(draw: st.DrawFn, max_orders: int = 1) -> tuple[Round, list[Quote], dict[str, Kind], QuoteBook]:
    seed = draw(st.integers(0, 2**31 - 1))
    rnd = random_round(seed, draw(st.integers(1, max_orders)), draw(st.integers(1, 3)))
    quotes, kinds = tied_quotes(rnd, seed, draw(st.integers(0, 4)), draw(st.integers(1, 3)))
    return rnd, quotes, kinds, build_book(rnd, quotes, kinds, draw(st.sampled_from(PROFILES)))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@settings(max_examples=400, deadline=None)
@given(tied_books(), st.lists(st.integers(0, 2), min_size=8, max_size=8))
def test_single_order_winner_is_the_scans_winner_or_defers(case: tuple, caps: list[int]) -> None:
    """With its own capacities and with others (zeros included): the scan's winner, or None on a tie or a block."""
    *_, book = case
    for capacity in (book.capacity, np.array(caps[:len(book.capacity)], dtype=np.int64)):
        fast = single_order_winner(book, capacity)
        general = greedy_winners(book, capacity)
        if fast is not None:
            assert same_bits(fast, general)
            continue
        c = book.combos
        feasible = np.flatnonzero(c.feasible)
        best = feasible[c.score[feasible] == c.score[feasible].min()]
        assert len(best) > 1 or (capacity[c.src[best]] <= 0).any() or (capacity[c.leg[best]] <= 0).any()


@settings(max_examples=400, deadline=None)
@given(tied_books(max_orders=3), st.sampled_from(["first_score", "second_score"]))
def test_allocation_is_the_general_paths_to_the_bit(case: tuple, payment: str) -> None:
    """Winner, payments, winning score, reasons and total cost: fast path (allocate) vs general path."""
    *_, book = case
    fast = ScoringAuction(payment=payment).allocate(book)  # type: ignore[arg-type]
    general = price_awards(book, greedy_winners(book), payment, greedy_winners)  # type: ignore[arg-type]
    assert_same_allocation(book, fast, general)


def assert_same_allocation(book: QuoteBook, fast: Allocation, general: Allocation) -> None:
    assert same_bits(fast.winner, general.winner)
    assert same_bits(fast.src_payment, general.src_payment) and same_bits(fast.leg_payment, general.leg_payment)
    won = fast.winner[fast.winner >= 0]
    assert same_bits(book.combos.score[won], book.combos.score[general.winner[general.winner >= 0]])
    assert fast.reason == general.reason
    assert np.float64(fast.total_cost).tobytes() == np.float64(general.total_cost).tobytes()


def test_a_sweep_of_one_order_rounds_meets_every_branch() -> None:
    """The properties' deterministic companion: each way through the fast path, each checked."""
    seen: Counter[str] = Counter()
    for seed in range(600):
        rnd = random_round(seed, 1, 1 + seed % 3)
        quotes, kinds = tied_quotes(rnd, seed, seed % 5, 1 + seed % 3)
        book = build_book(rnd, quotes, kinds, PROFILES[seed % 4])
        fast = one_order_allocation(book)
        if fast is None:
            seen["left to the scan"] += 1
            continue
        assert_same_allocation(book, fast, price_awards(book, greedy_winners(book), "first_score", greedy_winners))
        seen[fast.reason[0] or "awarded"] += 1
    assert min(seen[k] for k in ("left to the scan", "awarded", "no_quote", "no_feasible_quote")) >= 5, seen


def test_a_tie_goes_to_the_lower_source_as_in_the_scan() -> None:
    """Equal scores and prices: the scan prefers the lower source bidder, not the first combination."""
    rnd = random_round(1, 1, 2)
    one = np.zeros(1, dtype=np.int64)
    quotes: list[Quote] = [
        SourceQuote("wh-0", one, np.ones(1), np.full(1, 60.0), 1.0, 1),
        SourceQuote("wh-1", one, np.ones(1), np.full(1, 60.0), 1.0, 1),
        LegQuote("leg-0", one, np.array([1]), np.full(1, 2.0), np.zeros(1), np.full(1, 600.0), 1.0, 1),
        LegQuote("leg-1", np.zeros(2, dtype=np.int64), np.array([0, 1]), np.full(2, 2.0), np.zeros(2),
                 np.full(2, 600.0), 1.0, 1),
    ]
    kinds = {"wh-0": Kind.WAREHOUSE, "wh-1": Kind.WAREHOUSE, "leg-0": Kind.RIDER_POOL, "leg-1": Kind.CROWD}
    book = build_book(rnd, quotes, kinds, PROFILES[0])
    c = book.combos
    assert len(set(c.score.tolist())) == 1 and c.feasible.all()  # (leg-0, wh-1), (leg-1, wh-0), (leg-1, wh-1)
    alloc = ScoringAuction().allocate(book)
    assert alloc.winner.tolist() == greedy_winners(book).tolist() == [1]  # wh-0 with leg-1


def journal_layout(quotes: list[Quote]) -> QuoteColumns:
    """Quotes as columns in the order given, sources and legs interleaved as a journal may hold them."""
    legs = [q for q in quotes if isinstance(q, LegQuote)]
    return QuoteColumns(
        agent_ids=tuple(q.agent_id for q in quotes), is_leg=tuple(isinstance(q, LegQuote) for q in quotes),
        rows=np.array([len(q.order_idx) for q in quotes], dtype=np.int64),
        capacity=np.array([q.capacity for q in quotes], dtype=np.int64),
        reliability=np.array([q.reliability for q in quotes], dtype=np.float64),
        order_idx=np.concatenate([q.order_idx for q in quotes]),
        values=np.concatenate([*(q.price for q in quotes),
                               *(q.pickup_s if isinstance(q, LegQuote) else q.ready_s for q in quotes)]).reshape(2, -1),
        source_idx=np.concatenate([q.source_idx if isinstance(q, LegQuote) else np.full(len(q.order_idx), -1)
                                   for q in quotes]),
        travel_s=np.concatenate([np.zeros(0), *(q.travel_s for q in legs)]),
    )


def assert_same_book(a: QuoteBook, b: QuoteBook) -> None:
    assert a.bidder_ids == b.bidder_ids and a.kinds == b.kinds
    assert same_bits(a.capacity, b.capacity) and same_bits(a.reliability, b.reliability)
    assert same_bits(a.penalty, b.penalty)
    for name in a.combos.__slots__:
        assert same_bits(getattr(a.combos, name), getattr(b.combos, name)), name


@settings(max_examples=200, deadline=None)
@given(tied_books(max_orders=3), st.randoms(use_true_random=False))
def test_interleaved_columns_build_the_same_book(case: tuple, rng: object) -> None:
    """A journal may hold legs before sources: the book indexes sources first either way."""
    rnd, quotes, kinds, book = case
    assume(quotes)
    sources = [q for q in quotes if isinstance(q, SourceQuote)]
    legs = [q for q in quotes if isinstance(q, LegQuote)]
    slots = sorted(rng.sample(range(len(quotes)), len(legs)))  # type: ignore[attr-defined]
    mixed = [legs.pop(0) if k in slots else sources.pop(0) for k in range(len(quotes))]
    assert_same_book(build_book(rnd, journal_layout(mixed), kinds, book.profile), book)


@settings(max_examples=200, deadline=None)
@given(tied_books(max_orders=4), st.data())
def test_columns_for_some_orders_are_the_quotes_for_them(case: tuple, data: st.DataObject) -> None:
    """What-if replay drops orders it already served: per column, as it was per quote object."""
    rnd, quotes, kinds, book = case
    keep = sorted(data.draw(st.sets(st.integers(0, rnd.size - 1), min_size=1)))
    remap = np.full(rnd.size, -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    kept: list[Quote] = []
    for q in quotes:
        m = remap[q.order_idx] >= 0
        if m.any() and isinstance(q, LegQuote):
            kept.append(LegQuote(q.agent_id, remap[q.order_idx][m], q.source_idx[m], q.price[m], q.pickup_s[m],
                                 q.travel_s[m], q.reliability, q.capacity))
        elif m.any() and isinstance(q, SourceQuote):
            kept.append(SourceQuote(q.agent_id, remap[q.order_idx][m], q.price[m], q.ready_s[m], q.reliability,
                                    q.capacity))
    sub = build_round(rnd.round_id, rnd.opened_s, [rnd.orders[o] for o in keep], rnd.sources, GRID, {"sku-00001": 1})
    want = build_book(sub, kept, kinds, book.profile)
    got = build_book(sub, QuoteColumns.of(quotes).for_orders(remap), kinds, book.profile)
    assert_same_book(got, want)
