"""The quote book: joins source and last-mile quotes into scored combinations.

One broadcast suffices because each leg quotes per source; the join is a dense
lookup of the source matrix, so there is no Python loop over combinations.
"""
from __future__ import annotations

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
        return self.matrix[[self.index[b] for b in ids]]


def _source_matrix(rnd: Round, sources: list[SourceQuote]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense [site, order] price and ready time, plus site to bidder index (-1: no quote)."""
    site_of = {sid: i for i, sid in enumerate(rnd.sources.ids)}
    n_sites = len(rnd.sources.ids)
    price = np.full((n_sites, rnd.size), np.inf)
    ready = np.full((n_sites, rnd.size), np.inf)
    bidder = np.full(n_sites, -1, dtype=np.int64)
    if sources:
        site = np.array([site_of[q.agent_id] for q in sources], dtype=np.int64)
        rows = np.repeat(site, [len(q.order_idx) for q in sources])
        cols = np.concatenate([q.order_idx for q in sources])
        price[rows, cols] = np.concatenate([q.price for q in sources])
        ready[rows, cols] = np.concatenate([q.ready_s for q in sources])
        bidder[site] = np.arange(len(sources))
    return price, ready, bidder


def _join_legs(
    rnd: Round, legs: list[LegQuote], first_leg: int, src: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> dict[str, np.ndarray]:
    """Joins every leg row to the source quote for the same (site, order) in one lookup."""
    price_m, ready_m, site_bidder = src
    if not legs:
        ints = np.zeros(0, dtype=np.int64)
        return {"order": ints, "src": ints, "leg": ints, **{k: np.zeros(0) for k in ("sp", "lp", "ready", "pickup", "travel")}}
    order = np.concatenate([q.order_idx for q in legs])
    site = np.concatenate([q.source_idx for q in legs])
    leg = np.repeat(np.arange(first_leg, first_leg + len(legs)), [len(q.order_idx) for q in legs])
    sp = price_m[site, order]
    ok = np.isfinite(sp)
    order, site = order[ok], site[ok]
    return {
        "order": order,
        "src": site_bidder[site],
        "leg": leg[ok],
        "sp": sp[ok],
        "lp": np.concatenate([q.price for q in legs])[ok],
        "ready": ready_m[site, order],
        "pickup": np.concatenate([q.pickup_s for q in legs])[ok],
        "travel": np.concatenate([q.travel_s for q in legs])[ok],
    }


def build_book(
    rnd: Round,
    quotes: list[Quote],
    kinds: dict[str, Kind],
    profile: ProfileCfg,
    categories: CategoryTable | None = None,
) -> QuoteBook:
    """Scores every feasible source + last-mile combination of the round.

    Args:
        quotes: validated quotes, at most one per bidder.
        kinds: the kind of every bidder id.
        categories: declared category abilities per bidder; a quote for an order
            outside them is infeasible whatever the bidder claims.
    """
    sources = [q for q in quotes if isinstance(q, SourceQuote)]
    legs = [q for q in quotes if isinstance(q, LegQuote)]
    ordered: list[Quote] = [*sources, *legs]
    j = _join_legs(rnd, legs, len(sources), _source_matrix(rnd, sources))
    rel = np.array([q.reliability for q in ordered], dtype=np.float64)
    order = j["order"]
    combo_rel = rel[j["src"]] * rel[j["leg"]]
    delivery = np.maximum(j["ready"], j["pickup"]) + j["travel"]
    price = j["sp"] + j["lp"]
    vip = rnd.vip[order]
    scores = score_fn(price, delivery, rnd.opened_s, rnd.promise_s[order], combo_rel, vip, profile)
    penalty = unfulfilled_penalty(rnd.vip, profile)
    admissible = price <= rnd.reserve[order]
    if profile.vip_hard_promise:
        admissible &= ~vip | (delivery <= rnd.promise_s[order])
    ids = tuple(q.agent_id for q in ordered)
    if categories is not None and ids:
        cat = rnd.category[order]
        allowed = categories.rows(ids)
        admissible &= allowed[j["src"], cat] & allowed[j["leg"], cat]
    feasible = admissible & (scores < penalty[order])
    combos = Combos(
        order, j["src"], j["leg"], j["sp"], j["lp"], j["ready"], j["pickup"], delivery, combo_rel, scores, admissible, feasible
    )
    return QuoteBook(
        rnd=rnd,
        profile=profile,
        bidder_ids=ids,
        kinds=tuple(kinds[b] for b in ids),
        capacity=np.array([q.capacity for q in ordered], dtype=np.int64),
        reliability=rel,
        combos=combos,
        penalty=penalty,
    )
