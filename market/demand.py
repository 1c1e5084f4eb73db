"""Synthetic order streams: arrivals by a daily profile, destinations around hotspots."""
from __future__ import annotations

import numpy as np

from market.catalogue import Catalogue
from market.config import FleetCfg, ScenarioCfg
from market.geo import CityGrid
from market.types import Category, Item, Order, Tier

MINUTES_PER_DAY = 1440
CUSTOMERS = 20_000


def minute_intensity(scenario: ScenarioCfg) -> np.ndarray:
    """Relative arrival rate for each minute of the day, spikes included."""
    rate = np.repeat(np.asarray(scenario.hourly_profile, dtype=np.float64), 60)
    minutes = np.arange(MINUTES_PER_DAY) / 60.0
    for spike in scenario.spikes:
        rate[(minutes >= spike.from_h) & (minutes < spike.to_h)] *= spike.factor
    return rate / rate.sum()


def arrival_times(scenario: ScenarioCfg, n: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly `n` arrival times over one day (seconds), sorted."""
    minute = rng.choice(MINUTES_PER_DAY, size=n, p=minute_intensity(scenario))
    return np.sort((minute + rng.uniform(0.0, 1.0, n)) * 60.0)


def destinations(scenario: ScenarioCfg, fleet: FleetCfg, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Customer positions (km): most near front-warehouse hotspots, the rest anywhere."""
    half = fleet.city.size_km / 2.0
    hubs = np.array([(w.x_km, w.y_km) for w in fleet.warehouses if w.tier == "front"] or [(0.0, 0.0)])
    hub = hubs[rng.integers(0, len(hubs), n)]
    near = hub + rng.normal(0.0, scenario.hotspot_sigma_km, (n, 2))
    anywhere = rng.uniform(-half, half, (n, 2))
    pos = np.where((rng.uniform(size=n) < scenario.hotspot_share)[:, None], near, anywhere)
    pos = np.clip(pos, -half, half)
    return pos[:, 0], pos[:, 1]


def _category_draws(cat: Catalogue, category: Category) -> tuple[np.ndarray, np.ndarray]:
    """A category's SKUs and their pick probabilities (the same for every order of it)."""
    skus = cat.skus_of(category)
    return skus, cat.popularity[skus] / cat.popularity[skus].sum()


def _items(cat: Catalogue, draws: tuple[np.ndarray, np.ndarray], scenario: ScenarioCfg,
           rng: np.random.Generator) -> tuple[Item, ...]:
    skus, p = draws
    lines = int(rng.integers(1, scenario.max_lines + 1))
    picked = rng.choice(skus, size=min(lines, len(skus)), replace=False, p=p)
    return tuple(Item(cat.sku_ids[s], int(rng.integers(1, scenario.max_qty + 1))) for s in picked)


def generate_orders(
    scenario: ScenarioCfg, fleet: FleetCfg, catalogue: Catalogue, n_orders: int, seed: int, day_start_s: float = 0.0
) -> list[Order]:
    """A seeded day of orders; the same arguments give the same orders."""
    rng = np.random.default_rng([seed, 1])
    t = day_start_s + arrival_times(scenario, n_orders, rng)
    x, y = destinations(scenario, fleet, n_orders, rng)
    lat, lon = CityGrid(fleet.city.origin_lat, fleet.city.origin_lon).to_latlon(x, y)
    vip = rng.uniform(size=n_orders) < scenario.vip_share
    cats = list(scenario.category_mix)
    weights = np.array([scenario.category_mix[c] for c in cats])
    category = rng.choice(len(cats), size=n_orders, p=weights / weights.sum())
    chans = list(scenario.channels)
    cw = np.array([scenario.channels[c] for c in chans])
    channel = rng.choice(len(chans), size=n_orders, p=cw / cw.sum())
    value = rng.lognormal(np.log(scenario.value_mean) - 0.18, 0.6, n_orders)
    locker_ok = rng.uniform(size=n_orders) < scenario.locker_ok_share
    customer = rng.integers(0, CUSTOMERS, n_orders)
    draws = {Category(c): _category_draws(catalogue, Category(c)) for c in cats}  # once a day: per order, 12% of this
    orders = []
    for i in range(n_orders):
        cat = Category(cats[category[i]])
        tier = Tier.VIP if vip[i] else Tier.REGULAR
        orders.append(
            Order(
                order_id=f"o-{seed}-{i:07d}",
                created_s=float(t[i]),
                customer_id=f"c-{customer[i]:05d}",
                tier=tier,
                channel=chans[channel[i]],
                items=_items(catalogue, draws[cat], scenario, rng),
                lat=float(lat[i]),
                lon=float(lon[i]),
                promise_s=float(t[i] + 60.0 * scenario.promise_min[tier.value]),
                value=round(float(value[i]), 2),
                category=cat,
                locker_ok=bool(locker_ok[i]) and cat != Category.BULKY,
                reserve=round(scenario.reserve_base + scenario.reserve_share * float(value[i]), 2),
            )
        )
    return orders
