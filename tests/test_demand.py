"""The synthetic order stream: seeded days are reproducible, and every order is one a shop could take."""
from __future__ import annotations

import hashlib
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from market.catalogue import Catalogue
from market.config import load_fleet, load_scenario
from market.demand import generate_orders
from market.types import CATEGORY_CODES, Category, Order

PEAK = load_scenario("peak")
DISTRICT = load_fleet("district")
CATALOGUE = Catalogue.build(DISTRICT.catalogue)

#: The fingerprint of `_fingerprint(generate_orders(PEAK, DISTRICT, CATALOGUE, 300, 3))`.
#: Every seeded figure in docs/ and the shipped policies' held-out evaluations were
#: measured on streams drawn this way; a change to how a day is drawn must be deliberate
#: (and those figures re-measured), not a side effect of a refactor.
PEAK_DISTRICT_300_SEED_3 = "c97443fd88c63380"


def _fingerprint(orders: list[Order]) -> str:
    """A digest of every field of every order, independent of pickle's format."""
    rows = [[o.order_id, repr(o.created_s), o.customer_id, str(o.tier), o.channel,
             [[it.sku, it.qty] for it in o.items], repr(o.lat), repr(o.lon), repr(o.promise_s),
             repr(o.value), str(o.category), o.locker_ok, repr(o.reserve)] for o in orders]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def test_a_seeded_day_is_the_one_the_recorded_figures_were_measured_on() -> None:
    assert _fingerprint(generate_orders(PEAK, DISTRICT, CATALOGUE, 300, 3)) == PEAK_DISTRICT_300_SEED_3


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 120))
def test_orders_are_reproducible_and_each_one_is_a_valid_basket(seed: int, n: int) -> None:
    orders = generate_orders(PEAK, DISTRICT, CATALOGUE, n, seed)
    assert _fingerprint(orders) == _fingerprint(generate_orders(PEAK, DISTRICT, CATALOGUE, n, seed))
    assert len(orders) == n and len({o.order_id for o in orders}) == n
    assert [o.created_s for o in orders] == sorted(o.created_s for o in orders)
    index = CATALOGUE.index
    for o in orders:
        skus = [it.sku for it in o.items]
        assert 1 <= len(skus) <= PEAK.max_lines and len(set(skus)) == len(skus)  # drawn without replacement
        assert all(CATALOGUE.category[index[s]] == CATEGORY_CODES[o.category] for s in skus)
        assert all(1 <= it.qty <= PEAK.max_qty for it in o.items)
        assert o.promise_s > o.created_s
        assert not (o.locker_ok and o.category == Category.BULKY)
