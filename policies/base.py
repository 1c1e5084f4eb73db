"""The bidding-strategy interface every policy implements (static, heuristic, RL).

A strategy turns a bidder's view of itself and the round into a markup on its cost
and a share of capacity kept back for VIP orders. Keeping it this small is what lets
the same strategy run in the simulator, in a Ray actor and inside the Gymnasium env.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from market.types import Kind

MIN_MARKUP = 0.5
MAX_MARKUP = 3.0


@dataclass(frozen=True, slots=True)
class BidContext:
    """What a bidder knows when it prices a round."""

    kind: Kind
    agent_id: str
    now_s: float
    hour_of_day: float
    load: float  # share of own capacity in use, 0..1
    available: int
    capacity_total: int
    round_size: int
    round_vip_share: float
    win_rate: float
    reliability: float
    market_load: float = 0.0  # share of the round's orders that are retries: the network could not take them
    recent_price: float = 0.0  # EWMA of what this bidder was paid per award (its recent clearing price)


@dataclass(frozen=True, slots=True)
class BidDecision:
    """How to bid this round: price = cost x markup; holdback keeps capacity for VIPs."""

    markup: float = 1.0
    holdback: float = 0.0

    def clipped(self) -> BidDecision:
        """The decision within safe bounds, whatever a learned policy produced."""
        markup = min(max(float(self.markup), MIN_MARKUP), MAX_MARKUP)
        holdback = min(max(float(self.holdback), 0.0), 0.9)
        return BidDecision(markup if markup == markup else 1.0, holdback if holdback == holdback else 0.0)


class BiddingStrategy(Protocol):
    """Decides a bidder's markup and holdback for one round."""

    name: str

    def decide(self, ctx: BidContext) -> BidDecision:
        """Returns the bid decision for this bidder and round."""
        ...


class CostPricing:
    """Quote true cost: the truthful strategy (and the static rule's bidders)."""

    name = "cost"

    def decide(self, ctx: BidContext) -> BidDecision:
        """Markup 1, nothing held back."""
        return BidDecision()
