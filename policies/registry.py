"""Named network policies: a bidding strategy for the bidders plus a clearing mechanism."""
from __future__ import annotations

from dataclasses import dataclass

from market.clearing import Mechanism, Payment, ScoringAuction
from policies.base import BiddingStrategy, CostPricing
from policies.heuristic import LoadMarkup
from policies.static import StaticRule

POLICY_NAMES = ("static", "truthful", "heuristic", "rl:PATH")


class PolicyError(ValueError):
    """An unknown or unusable policy spec; the message is one readable line."""


@dataclass(frozen=True)
class NetworkPolicy:
    """How the network decides: how bidders price, and how rounds clear."""

    name: str
    strategy: BiddingStrategy
    mechanism: Mechanism


def make_policy(spec: str, payment: Payment = "first_score") -> NetworkPolicy:
    """Builds a policy from its CLI spec.

    `static` routes by rule at cost; `truthful` clears the scoring auction over cost
    quotes (the mechanism alone); `heuristic` adds load-aware markups; `rl:PATH`
    prices every bidder of the policy's kind (its card.json, else rider pools) with the
    learned policy and the others with the heuristic; a missing or incompatible file
    falls back to the heuristic with one warning line.
    """
    if spec == "static":
        return NetworkPolicy("static", CostPricing(), StaticRule())
    if spec == "truthful":
        return NetworkPolicy("truthful", CostPricing(), ScoringAuction(payment=payment))
    if spec == "heuristic":
        return NetworkPolicy("heuristic", LoadMarkup(), ScoringAuction(payment=payment))
    if spec.startswith("rl:"):
        path = spec[3:]
        if not path:
            raise PolicyError("rl policy needs a path: rl:PATH/TO/policy.zip")
        from policies.rl import rl_strategy  # numpy only at import; torch loads with the zip

        return NetworkPolicy("rl", rl_strategy(path), ScoringAuction(payment=payment))
    raise PolicyError(f"unknown policy '{spec}' (known: {', '.join(POLICY_NAMES)})")
