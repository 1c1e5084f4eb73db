"""A round: the batch of orders broadcast together, as arrays bidders can vectorize over."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from market.geo import CityGrid
from market.packing import packed_pickle
from market.types import CATEGORY_CODES, Order, Tier

UNKNOWN_SKU = -1


@packed_pickle
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


@packed_pickle
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
    """Turns orders into the array form every bidder and the clearing use.

    Replay rebuilds every journaled round (most hold one order), so the per-order
    fields are gathered in Python and turned into arrays with one NumPy call per
    dtype: each column is a contiguous row of that array, with the values and
    dtypes a column per field would have.
    """
    n = len(orders)
    lines: list[int] = []  # order index, catalogue index, quantity: line after line
    unknown = [False] * n
    for i, o in enumerate(orders):
        for it in o.items:
            sku = sku_index.get(it.sku, UNKNOWN_SKU)
            lines += (i, sku, it.qty)
            unknown[i] = unknown[i] or sku == UNKNOWN_SKU
    item = np.array(lines, dtype=np.int64).reshape(-1, 3)
    vips = [o.tier == Tier.VIP for o in orders]
    floats = np.array([[o.lat for o in orders], [o.lon for o in orders], [o.created_s for o in orders],
                       [o.promise_s for o in orders], [o.reserve for o in orders]], dtype=np.float64)
    flags = np.array([vips, [o.locker_ok for o in orders], unknown], dtype=bool)
    x, y = grid.to_km(floats[0], floats[1])
    return Round(
        round_id=round_id,
        opened_s=float(opened_s),
        orders=tuple(orders),
        sources=sources,
        x=x,
        y=y,
        created_s=floats[2],
        promise_s=floats[3],
        reserve=floats[4],
        vip=flags[0],
        category=np.array([CATEGORY_CODES[o.category] for o in orders], dtype=np.int8),
        locker_ok=flags[1],
        units=np.array([o.units for o in orders], dtype=np.int64),
        item_order=item[:, 0],
        item_sku=item[:, 1],
        item_qty=item[:, 2],
        vip_share=float(sum(vips)) / max(1, n),
        has_unknown_sku=flags[2],
    )
