"""A round: the batch of orders broadcast together, as arrays bidders can vectorize over."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from market.geo import CityGrid
from market.types import CATEGORY_CODES, Order, Tier

UNKNOWN_SKU = -1


@dataclass(frozen=True, slots=True)
class SourceSites:
    """The candidate sources every leg bidder may quote from (the fleet's warehouses)."""

    ids: tuple[str, ...]
    x: np.ndarray
    y: np.ndarray
    category_ok: np.ndarray  # [site, category] declared handling ability (public fleet facts)

    def can_handle(self, category: np.ndarray) -> np.ndarray:
        """[site, order] mask: which sites may source each order's category."""
        return self.category_ok[:, category]


@dataclass(frozen=True, slots=True)
class Round:
    """One auction round. Arrays are indexed by the order's position in `orders`."""

    round_id: int
    opened_s: float
    orders: tuple[Order, ...]
    sources: SourceSites
    x: np.ndarray
    y: np.ndarray
    created_s: np.ndarray
    promise_s: np.ndarray
    reserve: np.ndarray
    vip: np.ndarray
    category: np.ndarray
    locker_ok: np.ndarray
    units: np.ndarray
    item_order: np.ndarray  # flattened order lines: order index
    item_sku: np.ndarray  # catalogue index, UNKNOWN_SKU when not in the catalogue
    item_qty: np.ndarray
    vip_share: float = 0.0
    has_unknown_sku: np.ndarray | None = None  # per order: a line no warehouse can stock

    @property
    def size(self) -> int:
        """Number of orders in the round."""
        return len(self.orders)


def build_round(
    round_id: int,
    opened_s: float,
    orders: list[Order] | tuple[Order, ...],
    sources: SourceSites,
    grid: CityGrid,
    sku_index: dict[str, int],
) -> Round:
    """Turns orders into the array form every bidder and the clearing use."""
    lines = [(i, sku_index.get(it.sku, UNKNOWN_SKU), it.qty) for i, o in enumerate(orders) for it in o.items]
    item = np.array(lines, dtype=np.int64).reshape(-1, 3)
    x, y = grid.to_km(np.array([o.lat for o in orders]), np.array([o.lon for o in orders]))
    vip = np.array([o.tier == Tier.VIP for o in orders], dtype=bool)
    return Round(
        round_id=round_id,
        opened_s=float(opened_s),
        orders=tuple(orders),
        sources=sources,
        x=x,
        y=y,
        created_s=np.array([o.created_s for o in orders], dtype=np.float64),
        promise_s=np.array([o.promise_s for o in orders], dtype=np.float64),
        reserve=np.array([o.reserve for o in orders], dtype=np.float64),
        vip=vip,
        category=np.array([CATEGORY_CODES[o.category] for o in orders], dtype=np.int8),
        locker_ok=np.array([o.locker_ok for o in orders], dtype=bool),
        units=np.array([o.units for o in orders], dtype=np.int64),
        item_order=item[:, 0],
        item_sku=item[:, 1],
        item_qty=item[:, 2],
        vip_share=float(vip.sum()) / max(1, len(orders)),
        has_unknown_sku=np.bincount(item[:, 0][item[:, 1] == UNKNOWN_SKU], minlength=len(orders)) > 0,
    )
