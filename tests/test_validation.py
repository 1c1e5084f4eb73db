"""Quote validation (market/validation.py): clean quotes pass, garbage of every kind is dropped."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from market.types import Kind, LegQuote, SourceQuote
from market.validation import (
    BAD_CAPACITY, BAD_INDEX, BAD_PRICE, BAD_RELIABILITY, BAD_SHAPE, BAD_TIME, EMPTY, REASONS, UNKNOWN_AGENT,
    WRONG_AGENT, WRONG_KIND, WRONG_TYPE, RoundShape, validate_quote,
)

SITES = ("wh-a", "wh-b", "wh-c")
KINDS = {"wh-a": Kind.WAREHOUSE, "wh-b": Kind.WAREHOUSE, "wh-c": Kind.WAREHOUSE,
         "riders": Kind.RIDER_POOL, "crowd": Kind.CROWD}
SHAPE = RoundShape(n_orders=5, site_ids=SITES, kinds=KINDS)


def source(**kw: Any) -> SourceQuote:
    base = dict(agent_id="wh-a", order_idx=np.array([0, 2, 4]), price=np.array([1.0, 2.0, 3.0]),
                ready_s=np.array([10.0, 20.0, 30.0]), reliability=0.97, capacity=2)
    return SourceQuote(**{**base, **kw})


def leg(**kw: Any) -> LegQuote:
    base = dict(agent_id="riders", order_idx=np.array([0, 0, 1, 3]), source_idx=np.array([0, 1, 2, 0]),
                price=np.array([4.0, 5.0, 6.0, 7.0]), pickup_s=np.array([1.0, 2.0, 3.0, 4.0]),
                travel_s=np.array([100.0, 200.0, 300.0, 400.0]), reliability=0.9, capacity=3)
    return LegQuote(**{**base, **kw})


def test_clean_quotes_pass_as_canonical_copies() -> None:
    raw = source(order_idx=np.array([0, 2, 4], dtype=np.int32), price=np.array([1, 2, 3], dtype=np.int64))
    q, reason = validate_quote(raw, "wh-a", SHAPE)
    assert reason == "" and isinstance(q, SourceQuote)
    assert q.order_idx.dtype == np.int64 and q.price.dtype == np.float64
    assert q is not raw and q.order_idx is not raw.order_idx
    q, reason = validate_quote(leg(), "riders", SHAPE)
    assert reason == "" and isinstance(q, LegQuote) and q.capacity == 3


def test_capacity_is_clipped_to_the_distinct_orders_quoted() -> None:
    q, _ = validate_quote(leg(capacity=10**9), "riders", SHAPE)
    assert q is not None and q.capacity == 3  # orders 0, 1, 3
    q, _ = validate_quote(source(capacity=np.int64(2)), "wh-a", SHAPE)
    assert q is not None and q.capacity == 2


@pytest.mark.parametrize(("raw", "asked", "reason"), [
    ({"agent_id": "wh-a"}, "wh-a", WRONG_TYPE),
    ("a quote", "wh-a", WRONG_TYPE),
    (None, "wh-a", WRONG_TYPE),
    (source(), "wh-b", WRONG_AGENT),
    (source(agent_id=b"wh-a"), "wh-a", WRONG_AGENT),
    (source(), "stranger", UNKNOWN_AGENT),
    (leg(agent_id="wh-a"), "wh-a", WRONG_KIND),
    (source(agent_id="riders"), "riders", WRONG_KIND),
    (source(price=np.array([1.0, np.nan, 3.0])), "wh-a", BAD_PRICE),
    (source(price=np.array([1.0, np.inf, 3.0])), "wh-a", BAD_PRICE),
    (source(price=np.array([1.0, -0.01, 3.0])), "wh-a", BAD_PRICE),
    (source(price=[1.0, 2.0, 3.0]), "wh-a", BAD_SHAPE),
    (source(price=np.array(["1", "2", "3"])), "wh-a", BAD_SHAPE),
    (source(price=np.array([1.0, 2.0])), "wh-a", BAD_SHAPE),
    (source(price=np.ones((3, 1))), "wh-a", BAD_SHAPE),
    (source(order_idx=np.array([0.0, 1.0, 2.0])), "wh-a", BAD_SHAPE),
    (source(order_idx=[0, 1, 2]), "wh-a", BAD_SHAPE),
    (source(order_idx=np.array([0, 5, 1])), "wh-a", BAD_INDEX),
    (source(order_idx=np.array([-1, 0, 1])), "wh-a", BAD_INDEX),
    (leg(source_idx=np.array([0, 1, 3, 0])), "riders", BAD_INDEX),
    (source(ready_s=np.array([1.0, np.nan, 2.0])), "wh-a", BAD_TIME),
    (leg(travel_s=np.array([1.0, -2.0, 3.0, 4.0])), "riders", BAD_TIME),
    (source(reliability=float("nan")), "wh-a", BAD_RELIABILITY),
    (source(reliability=1.5), "wh-a", BAD_RELIABILITY),
    (source(reliability="high"), "wh-a", BAD_RELIABILITY),
    (source(capacity=0), "wh-a", BAD_CAPACITY),
    (source(capacity=-3), "wh-a", BAD_CAPACITY),
    (source(capacity=2.5), "wh-a", BAD_CAPACITY),
    (source(capacity=True), "wh-a", BAD_CAPACITY),
    (source(order_idx=np.zeros(0, dtype=np.int64), price=np.zeros(0), ready_s=np.zeros(0)), "wh-a", EMPTY),
])
def test_garbage_is_dropped_with_its_reason(raw: Any, asked: str, reason: str) -> None:
    q, why = validate_quote(raw, asked, SHAPE)
    assert q is None and why == reason


class Hostile:
    """Raises from every attribute: must be dropped, never crash the auctioneer."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("boom")


def test_a_hostile_object_is_dropped() -> None:
    assert validate_quote(Hostile(), "wh-a", SHAPE) == (None, WRONG_TYPE)
    q = source()
    q.order_idx = Hostile()  # type: ignore[assignment]
    assert validate_quote(q, "wh-a", SHAPE)[0] is None


garbage_value = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5), st.lists(st.floats(), max_size=6),
    st.builds(np.array, st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=6)),
    st.builds(lambda xs: np.array(xs, dtype=np.int64), st.lists(st.integers(-10, 10), max_size=6)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field_values=st.dictionaries(
        st.sampled_from(["order_idx", "source_idx", "price", "pickup_s", "travel_s", "reliability", "capacity",
                         "agent_id"]),
        garbage_value, max_size=4),
    is_leg=st.booleans(),
)
def test_whatever_a_bidder_sends_the_result_is_safe_to_clear(field_values: dict[str, Any], is_leg: bool) -> None:
    """Property: validation either rejects with a known reason or returns a quote the book can use."""
    raw = leg() if is_leg else source()
    for name, value in field_values.items():
        if hasattr(raw, name):
            setattr(raw, name, value)
    asked = "riders" if is_leg else "wh-a"
    q, reason = validate_quote(raw, asked, SHAPE)
    if q is None:
        assert reason in REASONS
        return
    assert reason == "" and q.agent_id == asked
    n = len(q.order_idx)
    assert n > 0 and q.order_idx.dtype == np.int64 and q.price.dtype == np.float64
    assert ((q.order_idx >= 0) & (q.order_idx < SHAPE.n_orders)).all()
    assert np.isfinite(q.price).all() and (q.price >= 0).all() and len(q.price) == n
    assert 0.0 <= q.reliability <= 1.0
    assert 1 <= q.capacity <= len(np.unique(q.order_idx))
    if isinstance(q, LegQuote):
        assert ((q.source_idx >= 0) & (q.source_idx < SHAPE.n_sites)).all()
        assert np.isfinite(q.pickup_s).all() and np.isfinite(q.travel_s).all() and (q.travel_s >= 0).all()
    else:
        assert np.isfinite(q.ready_s).all()
