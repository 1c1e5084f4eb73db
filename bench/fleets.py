"""Synthetic fleets of any size for benchmarks, with the default fleet's proportions."""
from __future__ import annotations

import numpy as np

from market.config import CrowdCfg, FleetCfg, LockerCfg, RiderPoolCfg, WarehouseCfg, load_fleet
from market.types import Category

ALL_FOOD = (Category.AMBIENT, Category.CHILLED, Category.FROZEN)


def synthetic_fleet(n_bidders: int, seed: int = 0) -> FleetCfg:
    """A fleet of `n_bidders` agents: ~30% warehouses, 35% rider pools, 5% crowd, 30% lockers."""
    rng = np.random.default_rng(seed)
    base = load_fleet("default")
    half = base.city.size_km / 2
    n_wh = max(1, round(0.30 * n_bidders))
    n_crowd = max(1, round(0.05 * n_bidders))
    n_riders = max(1, round(0.35 * n_bidders))
    n_lockers = max(0, n_bidders - n_wh - n_crowd - n_riders)

    def xy() -> tuple[float, float]:
        x, y = rng.uniform(-half, half, 2)
        return float(x), float(y)

    whs = []
    for i in range(n_wh):
        x, y = xy()
        central = i % 3 == 0
        whs.append(WarehouseCfg(
            id=f"wh-{i:04d}", tier="central" if central else "front", x_km=x, y_km=y,
            picks_per_min=40 if central else 14, assortment=1.0 if central else 0.3,
            stock_per_sku=4000 if central else 50, categories=(Category.AMBIENT, Category.BULKY, *ALL_FOOD[1:]),
        ))
    riders = [RiderPoolCfg(id=f"riders-{i:04d}", riders=60, categories=ALL_FOOD, **dict(zip(("x_km", "y_km"), xy())))
              for i in range(n_riders)]
    crowd = [CrowdCfg(id=f"crowd-{i:04d}", base_couriers=200, reliability=0.87,
                      categories=(Category.AMBIENT, Category.CHILLED, Category.BULKY)) for i in range(n_crowd)]
    lockers = [LockerCfg(id=f"locker-{i:04d}", compartments=150, **dict(zip(("x_km", "y_km"), xy())))
               for i in range(n_lockers)]
    return FleetCfg(city=base.city, catalogue=base.catalogue, warehouses=tuple(whs), rider_pools=tuple(riders),
                    crowd=tuple(crowd), lockers=tuple(lockers))
