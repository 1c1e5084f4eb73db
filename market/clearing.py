"""Round clearing: who wins each order, and what each winner is paid.

The mechanism is pluggable behind one small interface, `allocate(book) -> Allocation`
(AuctionGym's shape). `ScoringAuction` clears greedily in priority order (VIP, then
urgency) or exactly with a MILP; both pay by `first_score` or `second_score` (VCG).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from market.book import CategoryTable, OneOrderBook, QuoteBook, QuoteColumns, build_book
from market.config import ProfileCfg
from market.round import Round
from market.types import Kind, Quote

Payment = Literal["first_score", "second_score"]
Method = Literal["greedy", "exact"]
PAYMENT_RULES: tuple[Payment, ...] = ("first_score", "second_score")

NO_QUOTE = "no_quote"
NO_FEASIBLE = "no_feasible_quote"
NO_CAPACITY = "no_capacity"


@dataclass(slots=True)
class Allocation:
    """The outcome of clearing one round.

    Attributes:
        winner: per order, the index of the winning combination or -1.
        reason: per order, why it went unserved ('' when awarded).
        total_cost: winners' scores plus the penalty of every unserved order; the
            quantity both greedy and exact clearing minimise.
    """

    winner: np.ndarray
    src_payment: np.ndarray
    leg_payment: np.ndarray
    reason: tuple[str, ...]
    total_cost: float


class Mechanism(Protocol):
    """Anything that clears a quote book."""

    name: str

    def allocate(self, book: QuoteBook) -> Allocation:
        """Clears one round."""
        ...


def priority_sequence(book: QuoteBook) -> np.ndarray:
    """Orders in clearing priority: VIP first, then earliest promise, then arrival."""
    rnd = book.rnd
    return np.lexsort((np.arange(rnd.size), rnd.promise_s, ~rnd.vip))


def scan_assign(
    book: QuoteBook,
    sequence: np.ndarray,
    keys: tuple[np.ndarray, ...],
    capacity: np.ndarray,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Gives each order, in `sequence`, its best-keyed feasible combination with capacity left.

    Args:
        sequence: order indices in the order they are served.
        keys: per-combination sort keys, least significant first (np.lexsort style).
        capacity: per-bidder capacity for this round (not modified).
        allowed: combinations that may win (default: the feasible ones).

    Returns:
        Per order, the winning combination index or -1.
    """
    c = book.combos
    cand = np.flatnonzero(c.feasible if allowed is None else allowed)
    rank = np.empty(book.rnd.size, dtype=np.int64)
    rank[sequence] = np.arange(len(sequence))
    ranked = cand[np.lexsort(tuple(k[cand] for k in keys) + (rank[c.order[cand]],))]
    winner = np.full(book.rnd.size, -1, dtype=np.int64)
    if len(ranked) == 0:
        return winner
    order_r = c.order[ranked]
    starts = np.concatenate(([0], np.nonzero(np.diff(order_r))[0] + 1))
    first = ranked[starts]
    demand = np.bincount(np.concatenate([c.src[first], c.leg[first]]), minlength=len(capacity))
    if (demand <= capacity).all():  # no bidder is oversubscribed: every order gets its first choice
        winner[c.order[first]] = first
        return winner
    return _sequential_scan(ranked, starts, c.src, c.leg, c.order, capacity, winner)


def _sequential_scan(
    ranked: np.ndarray, starts: np.ndarray, src: np.ndarray, leg: np.ndarray, order: np.ndarray,
    capacity: np.ndarray, winner: np.ndarray,
) -> np.ndarray:
    """Walks each order's ranked candidates until one has capacity on both sides."""
    cap = capacity.tolist()
    ends = [*starts[1:].tolist(), len(ranked)]
    src_r, leg_r, rank_l = src[ranked].tolist(), leg[ranked].tolist(), ranked.tolist()
    for a, b in zip(starts.tolist(), ends):
        for k in range(a, b):
            s, l = src_r[k], leg_r[k]
            if cap[s] > 0 and cap[l] > 0:
                cap[s] -= 1
                cap[l] -= 1
                winner[order[rank_l[k]]] = rank_l[k]
                break
    return winner


def greedy_winners(book: QuoteBook, capacity: np.ndarray | None = None) -> np.ndarray:
    """Greedy clearing: best score first within each order, ties by price then bidder."""
    c = book.combos
    keys = (c.leg, c.src, c.price, c.score)
    return scan_assign(book, priority_sequence(book), keys, book.capacity if capacity is None else capacity)


def single_order_winner(book: QuoteBook, capacity: np.ndarray) -> np.ndarray | None:
    """`greedy_winners` of a one-order round without its sort, or None where only the sort can tell.

    With one order, greedy picks the feasible combination with the lowest score. The
    sort is needed only to break a tie on score or to walk past a bidder without
    capacity, so those rounds get None. Scores of feasible combinations are never NaN
    (feasible means below the unserved penalty), so the minimum is well defined.
    """
    c = book.combos
    cand = c.feasible.nonzero()[0]  # np.flatnonzero costs three times as much on a few elements
    if not len(cand):
        return np.array([-1], dtype=np.int64)
    scores = c.score[cand]
    k = scores.argmin()
    w = cand[k]
    if np.count_nonzero(scores == scores[k]) > 1 or capacity[c.src[w]] <= 0 or capacity[c.leg[w]] <= 0:
        return None
    return cand[k:k + 1]


def exact_winners(book: QuoteBook, capacity: np.ndarray | None = None) -> np.ndarray:
    """Minimum total-cost assignment (MILP), the reference greedy is measured against."""
    from scipy.optimize import LinearConstraint, milp  # 0.5 s to import; only the reference needs it
    from scipy.sparse import csr_array

    c = book.combos
    cap = book.capacity if capacity is None else capacity
    cand = np.flatnonzero(c.feasible & (cap[c.src] > 0) & (cap[c.leg] > 0))
    winner = np.full(book.rnd.size, -1, dtype=np.int64)
    if len(cand) == 0:
        return winner
    n_orders, n_bidders, n = book.rnd.size, len(cap), len(cand)
    cols = np.arange(n)
    rows = np.concatenate([c.order[cand], n_orders + c.src[cand], n_orders + c.leg[cand]])
    matrix = csr_array((np.ones(3 * n), (rows, np.tile(cols, 3))), shape=(n_orders + n_bidders, n))
    upper = np.concatenate([np.ones(n_orders), cap.astype(np.float64)])
    gain = c.score[cand] - book.penalty[c.order[cand]]
    res = milp(gain, constraints=LinearConstraint(matrix, -np.inf, upper), integrality=np.ones(n), bounds=(0, 1))
    if res.x is None:
        raise RuntimeError(f"exact clearing failed: {res.message}")
    chosen = cand[res.x > 0.5]
    winner[c.order[chosen]] = chosen
    return winner


def total_cost(book: QuoteBook, winner: np.ndarray) -> float:
    """Winners' scores plus the penalties of unserved orders."""
    won = winner >= 0
    return float(book.combos.score[winner[won]].sum() + book.penalty[~won].sum())


def unserved_reasons(book: QuoteBook, winner: np.ndarray) -> tuple[str, ...]:
    """Why each unserved order has no award: no quote, none feasible, or no capacity."""
    if (winner >= 0).all():
        return ("",) * len(winner)
    c = book.combos
    n = book.rnd.size
    quoted = np.bincount(c.order, minlength=n) > 0
    feasible = np.bincount(c.order[c.feasible], minlength=n) > 0
    reasons = np.where(feasible, NO_CAPACITY, np.where(quoted, NO_FEASIBLE, NO_QUOTE))
    return tuple("" if w >= 0 else str(r) for w, r in zip(winner.tolist(), reasons.tolist()))


def first_score_payments(book: QuoteBook, winner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each winner is paid its own quote."""
    won = winner >= 0
    src_pay, leg_pay = np.zeros(book.rnd.size), np.zeros(book.rnd.size)
    src_pay[won] = book.combos.src_price[winner[won]]
    leg_pay[won] = book.combos.leg_price[winner[won]]
    return src_pay, leg_pay


def second_score_payments(
    book: QuoteBook, winner: np.ndarray, clear: "WinnerFn", reserve_cap: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """VCG: each winner gets its quote plus its marginal contribution to total cost.

    The contribution of bidder b is cost(without b) - cost(with b), shared equally over
    b's awards in the round. With exact clearing it is never negative; greedy clearing
    can show small anomalies, which are clamped at zero so no winner is paid below
    its quote (truthfulness then holds only approximately).

    Args:
        reserve_cap: Cap each order's payments at its reserve (`cap_at_reserve`). Off only
            to re-clear journals of schema 3 and older, written before the cap.
    """
    src_pay, leg_pay = first_score_payments(book, winner)
    base = total_cost(book, winner)
    won = np.flatnonzero(winner >= 0)
    c = book.combos
    src_of, leg_of = c.src[winner[won]], c.leg[winner[won]]
    for b in np.unique(np.concatenate([src_of, leg_of])).tolist():
        cap = book.capacity.copy()
        cap[b] = 0
        marginal = max(0.0, total_cost(book, clear(book, cap)) - base)
        mine_src, mine_leg = won[src_of == b], won[leg_of == b]
        share = marginal / (len(mine_src) + len(mine_leg))
        src_pay[mine_src] += share
        leg_pay[mine_leg] += share
    if reserve_cap:
        cap_at_reserve(book, winner, src_pay, leg_pay)
    return src_pay, leg_pay


def cap_at_reserve(book: QuoteBook, winner: np.ndarray, src_pay: np.ndarray, leg_pay: np.ndarray) -> None:
    """Scales down, in place, what each order pays above its quotes to what its reserve leaves.

    Without a bidder the order may go unserved, and then the marginal contribution is
    the unfulfilled penalty, far above the reserve: the most the retailer pays for the
    order. A winner would lose the order anyway if its price took the order's over the
    reserve, so its threshold price is capped there; when both the source and the leg
    are owed more than the reserve leaves, they share it in proportion to what each is owed.
    """
    won = np.flatnonzero(winner >= 0)
    c = book.combos
    src_quote, leg_quote = c.src_price[winner[won]], c.leg_price[winner[won]]
    src_extra, leg_extra = src_pay[won] - src_quote, leg_pay[won] - leg_quote
    owed = src_extra + leg_extra
    room = np.maximum(0.0, book.rnd.reserve[won] - (src_quote + leg_quote))
    over = owed > room
    if not np.count_nonzero(over):
        return
    scale = room[over] / owed[over]
    rows = won[over]
    src_pay[rows] = src_quote[over] + src_extra[over] * scale
    leg_pay[rows] = leg_quote[over] + leg_extra[over] * scale


class WinnerFn(Protocol):
    """A winner-determination function with optional capacity override."""

    def __call__(self, book: QuoteBook, capacity: np.ndarray | None = None) -> np.ndarray: ...


def price_awards(book: QuoteBook, winner: np.ndarray, payment: Payment, clear: WinnerFn,
                 reserve_cap: bool = True) -> Allocation:
    """Pays the winners by the payment rule (``clear`` re-clears for VCG) and says why the rest lost."""
    if payment == "second_score":
        src_pay, leg_pay = second_score_payments(book, winner, clear, reserve_cap)
    else:
        src_pay, leg_pay = first_score_payments(book, winner)
    return Allocation(winner, src_pay, leg_pay, unserved_reasons(book, winner), total_cost(book, winner))


def one_order_allocation(book: QuoteBook) -> Allocation | None:
    """`price_awards` of a greedy first-score one-order round, or None where it needs the general path.

    The general path's array work (a sort, masks, bincounts, sums) is most of a one-order
    round's clearing time, yet with one order the winner, its payment, the reason and the
    total cost are scalars. The results are the general path's to the bit: a sum over one
    float64 is that float plus 0.0 (so -0.0 becomes 0.0 on both paths).
    """
    winner = single_order_winner(book, book.capacity)
    if winner is None:
        return None
    c = book.combos
    w = int(winner[0])
    if w < 0:
        reason = NO_FEASIBLE if len(c) else NO_QUOTE
        return Allocation(winner, np.zeros(1), np.zeros(1), (reason,), float(book.penalty[0]) + 0.0)
    return Allocation(winner, c.src_price[winner], c.leg_price[winner], ("",), float(c.score[w]) + 0.0)


@dataclass(slots=True)
class OneOrderAwards:
    """`one_order_allocation` of every round of a stack (`OneOrderBook`), as columns per round.

    Attributes:
        decided: per round, False where only the general path's sort can tell (a tie on
            the best score, or a winner without capacity): those rounds go to
            `ScoringAuction.allocate`, and the other columns mean nothing for them.
        winner: per round, the winning combination's index within its round (-1: none),
            as `Allocation.winner` of the round's own book has it.
        combo: per round, the winning combination's index in the stack (-1: none).
        src_payment, leg_payment: per round, what the winner is paid (0.0 where none).
        reason: per round, why its order went unserved ('' when awarded).
        total_cost: per round, `Allocation.total_cost` (float64).
    """

    decided: np.ndarray
    winner: np.ndarray
    combo: np.ndarray
    src_payment: np.ndarray
    leg_payment: np.ndarray
    reason: list[str]
    total_cost: np.ndarray


def one_order_winners(book: OneOrderBook) -> tuple[np.ndarray, np.ndarray]:
    """`single_order_winner` of every round of a stack at once: per round the winner, and whether decided.

    The rule is `single_order_winner`'s, round by round: the feasible combination with
    the lowest score wins (the first such, as ``argmin`` takes it), unless another
    feasible one ties it on score or a bidder of the winner has no capacity, where the
    round is left undecided for the sort. Minima are taken per run of rounds
    (``reduceat``) so that the whole stack costs a fixed number of NumPy calls.

    Returns:
        Per round, the winning combination's index in the stack (-1: none, also where
        undecided), and per round whether that is the answer.
    """
    c = book.combos
    n = book.rounds
    winner = np.full(n, -1, dtype=np.int64)
    decided = np.ones(n, dtype=bool)
    cand = c.feasible.nonzero()[0]
    if not len(cand):
        return winner, decided
    rounds, scores = c.order[cand], c.score[cand]
    starts = np.flatnonzero(np.diff(rounds, prepend=-1))  # each run of a round's candidates (rounds ascend)
    sizes = np.diff(starts, append=len(cand))
    best = scores == np.repeat(np.minimum.reduceat(scores, starts), sizes)
    first = np.flatnonzero(best)
    first = first[np.diff(rounds[first], prepend=-1) != 0]  # the first best of each round: argmin's pick
    w = cand[first]
    r = rounds[first]
    unique = np.add.reduceat(best, starts) == 1
    free = (book.capacity[c.src[w]] > 0) & (book.capacity[c.leg[w]] > 0)
    decided[r] = unique & free
    winner[r] = np.where(unique & free, w, -1)
    return winner, decided


def one_order_allocations(book: OneOrderBook) -> OneOrderAwards:
    """`one_order_allocation` of every round of a stack at once, to the bit, with its rounds' own indices.

    Payments are the winner's quotes (first score), the total cost is the winner's score
    or the unserved penalty plus 0.0 (as the scalar path adds it, so -0.0 becomes 0.0),
    and an unserved order has no feasible quote if its round has any combination, else
    no quote at all.
    """
    c = book.combos
    combo, decided = one_order_winners(book)
    won = combo >= 0
    w = combo[won]
    counts = np.bincount(c.order, minlength=book.rounds)
    first = np.cumsum(counts) - counts  # each round's first combination in the stack
    winner = np.full(book.rounds, -1, dtype=np.int64)
    winner[won] = w - first[won]
    src_pay, leg_pay = np.zeros(book.rounds), np.zeros(book.rounds)
    src_pay[won] = c.src_price[w]
    leg_pay[won] = c.leg_price[w]
    cost = book.penalty.copy()
    cost[won] = c.score[w]
    cost += 0.0
    reason = np.where(won, "", np.where(counts > 0, NO_FEASIBLE, NO_QUOTE)).tolist()
    return OneOrderAwards(decided, winner, combo, src_pay, leg_pay, reason, cost)


@dataclass(frozen=True)
class ScoringAuction:
    """The weighted-score auction: greedy or exact winners, first or second score payments.

    One-order greedy rounds, the usual round of a quiet market and of single-order
    replay, take a path without the sort (`single_order_winner`, `one_order_allocation`)
    whose results are bit-identical to the general one.
    """

    payment: Payment = "first_score"
    method: Method = "greedy"
    #: VCG payments capped at each order's reserve (`cap_at_reserve`); off only to re-clear
    #: journals written before the cap (schema 3 and older).
    reserve_cap: bool = True

    @property
    def name(self) -> str:
        """e.g. 'auction/greedy/first_score'."""
        return f"auction/{self.method}/{self.payment}"

    def winners(self, book: QuoteBook, capacity: np.ndarray | None = None) -> np.ndarray:
        """Winner determination only."""
        if self.method == "exact":
            return exact_winners(book, capacity)
        if book.rnd.size == 1:
            winner = single_order_winner(book, book.capacity if capacity is None else capacity)
            if winner is not None:
                return winner
        return greedy_winners(book, capacity)

    def allocate(self, book: QuoteBook) -> Allocation:
        """Clears the round and prices the awards."""
        if self.method == "greedy" and self.payment == "first_score" and book.rnd.size == 1:
            fast = one_order_allocation(book)
            if fast is not None:
                return fast
        return price_awards(book, self.winners(book), self.payment, self.winners, self.reserve_cap)


def clear_round(
    rnd: Round,
    quotes: Sequence[Quote] | QuoteColumns,
    kinds: dict[str, Kind],
    profile: ProfileCfg,
    categories: CategoryTable | None,
    mechanism: Mechanism,
) -> tuple[QuoteBook, Allocation]:
    """Scores a round's combinations and clears them: the one clearing step every shell calls.

    The engine (simulator, Ray runtime, HTTP service) and replay both come through here,
    which is what makes a journal re-clear to the same awards.
    """
    book = build_book(rnd, quotes, kinds, profile, categories)
    return book, mechanism.allocate(book)
