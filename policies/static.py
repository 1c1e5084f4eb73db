"""The rule a retailer runs today, as a mechanism over the same quotes.

Orders are served first come, first served: the nearest warehouse that has the stock,
own riders first, a locker where the order allows it and it is cheaper than a rider,
the crowd carrier as overflow. Bidders quote their cost and are paid it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from market.book import QuoteBook
from market.clearing import Allocation, first_score_payments, scan_assign, total_cost, unserved_reasons
from market.geo import distance_km
from market.types import Kind

LOCKER_CHEAP, RIDER, LOCKER, CROWD = 0, 1, 2, 3


def _leg_class(book: QuoteBook) -> np.ndarray:
    """Rank of each combination's leg under the rule (lower is preferred)."""
    c = book.combos
    kinds = np.array([k.value for k in book.kinds], dtype=object)
    leg_kind = kinds[c.leg] if len(c) else np.zeros(0, dtype=object)
    rider, locker = leg_kind == Kind.RIDER_POOL.value, leg_kind == Kind.LOCKER.value
    best_rider = np.full((book.rnd.size, len(book.bidder_ids)), np.inf)
    np.minimum.at(best_rider, (c.order[rider], c.src[rider]), c.leg_price[rider])
    cheaper = c.leg_price < best_rider[c.order, c.src]
    cls = np.full(len(c), CROWD, dtype=np.int64)
    cls[rider] = RIDER
    cls[locker] = np.where(cheaper[locker], LOCKER_CHEAP, LOCKER)
    return cls


def _source_distance(book: QuoteBook) -> np.ndarray:
    """Distance from each combination's warehouse to its customer."""
    c = book.combos
    sites = book.rnd.sources
    site_of = {sid: i for i, sid in enumerate(sites.ids)}
    site = np.array([site_of.get(b, 0) for b in book.bidder_ids], dtype=np.int64)
    s = site[c.src] if len(c) else np.zeros(0, dtype=np.int64)
    return distance_km(sites.x[s], sites.y[s], book.rnd.x[c.order], book.rnd.y[c.order])


@dataclass(frozen=True)
class StaticRule:
    """Rule-based routing, ignoring scores; it respects reserve, category and capacity."""

    name: str = "static"

    def allocate(self, book: QuoteBook) -> Allocation:
        """Serves orders in arrival order by the rule above."""
        c = book.combos
        keys = (c.leg, c.leg_price, _leg_class(book), _source_distance(book))
        winner = scan_assign(book, np.arange(book.rnd.size), keys, book.capacity, allowed=c.admissible)
        src_pay, leg_pay = first_score_payments(book, winner)
        return Allocation(winner, src_pay, leg_pay, unserved_reasons(book, winner), total_cost(book, winner))
