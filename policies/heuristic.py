"""Cost plus a load-aware markup: the hand-tuned bidder the learned policy must beat."""
from __future__ import annotations

from dataclasses import dataclass

from policies.base import BidContext, BidDecision


@dataclass(frozen=True)
class LoadMarkup:
    """Prices rise with the bidder's own load, so scarce capacity goes to high scorers.

    markup = 1 + margin + load_k x load^2: nearly cost while idle, up to
    1 + margin + load_k when full, which steers work to idle resources at peaks.
    """

    margin: float = 0.08
    load_k: float = 0.6
    name: str = "heuristic"

    def decide(self, ctx: BidContext) -> BidDecision:
        """Markup from current load; nothing held back."""
        return BidDecision(markup=1.0 + self.margin + self.load_k * ctx.load**2)
