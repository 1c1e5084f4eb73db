"""Invariants of round clearing, checked on random quote books (hypothesis)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market.book import QuoteBook
from market.clearing import ScoringAuction, exact_winners, greedy_winners, priority_sequence, total_cost
from market.config import load_profile
from policies.static import StaticRule
from tests.factories import random_book

books = st.builds(
    random_book,
    seed=st.integers(0, 2**31 - 1),
    n_orders=st.integers(1, 10),
    n_sources=st.integers(1, 4),
    n_legs=st.integers(1, 5),
    profile=st.sampled_from([load_profile(p) for p in ("balanced", "cost_first", "time_first", "vip_guard")]),
)


def wins_per_bidder(book: QuoteBook, winner: np.ndarray) -> np.ndarray:
    c, w = book.combos, winner[winner >= 0]
    return np.bincount(np.concatenate([c.src[w], c.leg[w]]), minlength=len(book.bidder_ids))


@settings(max_examples=300, deadline=None)
@given(books)
def test_each_award_is_the_best_feasible_combination_left(book: QuoteBook) -> None:
    """Serving orders in priority order, each gets the lowest score among feasible combos with capacity."""
    winner = greedy_winners(book)
    c, cap = book.combos, book.capacity.copy()
    for o in priority_sequence(book):
        open_ = np.nonzero((c.order == o) & c.feasible & (cap[c.src] > 0) & (cap[c.leg] > 0))[0]
        if winner[o] < 0:
            assert len(open_) == 0, "an order went unserved although a feasible combination had capacity"
            continue
        w = winner[o]
        assert c.feasible[w] and c.order[w] == o
        assert c.score[w] == c.score[open_].min()
        cap[c.src[w]] -= 1
        cap[c.leg[w]] -= 1


@settings(max_examples=300, deadline=None)
@given(books, st.sampled_from(["greedy", "exact", "static"]))
def test_no_bidder_wins_beyond_its_round_capacity(book: QuoteBook, how: str) -> None:
    winner = StaticRule().allocate(book).winner if how == "static" else ScoringAuction(method=how).winners(book)  # type: ignore[arg-type]
    assert (wins_per_bidder(book, winner) <= book.capacity).all()
    assert len(set(winner[winner >= 0].tolist())) == int((winner >= 0).sum())


@settings(max_examples=200, deadline=None)
@given(books, st.sampled_from(["greedy", "exact"]))
def test_second_score_pays_every_winner_at_least_its_quote(book: QuoteBook, method: str) -> None:
    alloc = ScoringAuction(payment="second_score", method=method).allocate(book)  # type: ignore[arg-type]
    won = alloc.winner >= 0
    c = book.combos
    assert (alloc.src_payment[won] >= c.src_price[alloc.winner[won]] - 1e-9).all()
    assert (alloc.leg_payment[won] >= c.leg_price[alloc.winner[won]] - 1e-9).all()


@settings(max_examples=200, deadline=None)
@given(books, st.sampled_from(["greedy", "exact"]))
def test_no_order_costs_the_retailer_more_than_its_reserve(book: QuoteBook, method: str) -> None:
    """VCG pays a pivotal winner the unfulfilled penalty; the reserve caps what the order costs."""
    alloc = ScoringAuction(payment="second_score", method=method).allocate(book)  # type: ignore[arg-type]
    won = np.flatnonzero(alloc.winner >= 0)
    paid = alloc.src_payment[won] + alloc.leg_payment[won]
    reserve = book.rnd.reserve[won]
    assert (paid <= reserve * (1 + 1e-12)).all()
    uncapped = ScoringAuction(payment="second_score", method=method, reserve_cap=False).allocate(book)  # type: ignore[arg-type]
    # the cap only lowers what is owed above the quotes, never below them, and only where it binds
    assert (alloc.src_payment <= uncapped.src_payment).all() and (alloc.leg_payment <= uncapped.leg_payment).all()
    unbound = won[uncapped.src_payment[won] + uncapped.leg_payment[won] <= reserve]
    assert np.array_equal(alloc.src_payment[unbound], uncapped.src_payment[unbound])


def test_a_winner_without_rival_is_paid_the_reserve_not_the_penalty() -> None:
    """One order whose only feasible combination wins: both sides are pivotal, each owed the
    penalty less the score; together they get what the reserve leaves, in proportion."""
    for seed in range(200):
        book = random_book(seed, 1, 1, 1)
        if book.combos.feasible.sum() == 1:
            break
    else:
        raise AssertionError("no one-combination book in 200 seeds")
    alloc = ScoringAuction(payment="second_score").allocate(book)
    w = int(alloc.winner[0])
    c, reserve = book.combos, float(book.rnd.reserve[0])
    owed = float(book.penalty[0] - c.score[w])
    assert owed > reserve - c.price[w]  # the penalty would have paid each side far more
    assert alloc.src_payment[0] + alloc.leg_payment[0] == pytest.approx(reserve, rel=1e-12)
    assert alloc.src_payment[0] - c.src_price[w] == pytest.approx(alloc.leg_payment[0] - c.leg_price[w], rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(books)
def test_exact_total_cost_never_worse_than_greedy(book: QuoteBook) -> None:
    greedy = total_cost(book, greedy_winners(book))
    exact = total_cost(book, exact_winners(book))
    assert exact <= greedy + 1e-6 * max(1.0, abs(greedy))


@settings(max_examples=100, deadline=None)
@given(books)
def test_exact_second_score_marginals_are_nonnegative_without_clamping(book: QuoteBook) -> None:
    """With exact clearing, removing a bidder can never lower total cost (VCG is well defined)."""
    base = total_cost(book, exact_winners(book))
    for b in range(len(book.bidder_ids)):
        cap = book.capacity.copy()
        cap[b] = 0
        assert total_cost(book, exact_winners(book, cap)) >= base - 1e-6


@settings(max_examples=100, deadline=None)
@given(books)
def test_clearing_is_deterministic(book: QuoteBook) -> None:
    a, b = ScoringAuction().allocate(book), ScoringAuction().allocate(book)
    assert np.array_equal(a.winner, b.winner) and a.reason == b.reason


def test_reserve_and_vip_promise_are_hard_constraints() -> None:
    book = random_book(7, 10, 3, 4, load_profile("vip_guard"))
    c, rnd = book.combos, book.rnd
    w = greedy_winners(book)
    won = w[w >= 0]
    assert (c.price[won] <= rnd.reserve[c.order[won]]).all()
    vip_won = won[rnd.vip[c.order[won]]]
    assert (c.delivery_s[vip_won] <= rnd.promise_s[c.order[vip_won]]).all()
