"""Validation of bidder quotes before they reach the quote book (pure NumPy).

A quote that crossed a process boundary is untrusted input: a buggy, slow or hostile
bidder may send NaN or negative prices, arrays of the wrong type or shape, order or
source indices outside the round, somebody else's agent id, or a capacity it cannot
serve. `validate_quote` either returns a clean copy (canonical dtypes, capacity
clipped to the number of distinct orders quoted) or rejects the whole quote with a
reason. A rejected bidder is simply absent from the round (DESIGN section 2): keeping
part of a garbage quote would trust a bidder that has just shown it is not
trustworthy, and its hold would not match what was kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from market.types import Kind, LegQuote, Quote, SourceQuote

OK = ""
WRONG_TYPE = "wrong_type"
WRONG_KIND = "wrong_kind"
WRONG_AGENT = "wrong_agent_id"
UNKNOWN_AGENT = "unknown_agent"
BAD_SHAPE = "bad_shape"
BAD_INDEX = "index_out_of_range"
BAD_PRICE = "bad_price"
BAD_TIME = "bad_time"
BAD_RELIABILITY = "bad_reliability"
BAD_CAPACITY = "bad_capacity"
EMPTY = "empty"

REASONS = (WRONG_TYPE, WRONG_KIND, WRONG_AGENT, UNKNOWN_AGENT, BAD_SHAPE, BAD_INDEX, BAD_PRICE, BAD_TIME,
           BAD_RELIABILITY, BAD_CAPACITY, EMPTY)


class QuoteRejected(ValueError):
    """A quote that failed validation; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class RoundShape:
    """What a quote is checked against: the round's size and source sites, and who may bid."""

    n_orders: int
    site_ids: tuple[str, ...]
    kinds: dict[str, Kind]  # every known bidder id and its kind

    @property
    def n_sites(self) -> int:
        """Number of candidate source sites in the round."""
        return len(self.site_ids)


def _index_array(a: Any, n: int, upper: int) -> np.ndarray:
    """A 1-D int64 copy of `a` with n elements in [0, upper); raises QuoteRejected otherwise."""
    if not isinstance(a, np.ndarray) or a.ndim != 1 or len(a) != n:
        raise QuoteRejected(BAD_SHAPE, "index array is not a 1-D array of the quote's length")
    if a.dtype.kind not in "iu":
        raise QuoteRejected(BAD_SHAPE, f"index array has dtype {a.dtype}")
    if n and (int(a.min()) < 0 or int(a.max()) >= upper):
        raise QuoteRejected(BAD_INDEX, f"indices outside [0, {upper})")
    return a.astype(np.int64, copy=True)


def _float_array(a: Any, n: int, what: str, *, nonneg: bool) -> np.ndarray:
    """A 1-D finite float64 copy of `a` with n elements (non-negative if asked)."""
    reason = BAD_PRICE if what == "price" else BAD_TIME
    if not isinstance(a, np.ndarray) or a.ndim != 1 or len(a) != n:
        raise QuoteRejected(BAD_SHAPE, f"{what} is not a 1-D array of the quote's length")
    if a.dtype.kind not in "iuf":
        raise QuoteRejected(BAD_SHAPE, f"{what} has dtype {a.dtype}")
    out = a.astype(np.float64, copy=True)
    if not np.isfinite(out).all():
        raise QuoteRejected(reason, f"{what} is not finite")
    if nonneg and (out < 0).any():
        raise QuoteRejected(reason, f"{what} is negative")
    return out


def _scalar_float(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise QuoteRejected(BAD_RELIABILITY, "reliability is not a number")
    v = float(x)
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise QuoteRejected(BAD_RELIABILITY, "reliability outside [0, 1]")
    return v


def _capacity(x: Any, distinct: int) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise QuoteRejected(BAD_CAPACITY, "capacity is not an integer")
    if int(x) < 1:
        raise QuoteRejected(BAD_CAPACITY, "capacity below 1")
    return min(int(x), distinct)


def check_quote(q: Any, agent_id: str, shape: RoundShape) -> Quote:
    """Returns a clean copy of bidder `agent_id`'s quote, or raises QuoteRejected.

    Args:
        q: whatever the bidder returned.
        agent_id: the bidder that was asked (the quote must carry this id).
        shape: the round's size, source sites and the known bidders.
    """
    if agent_id not in shape.kinds:
        raise QuoteRejected(UNKNOWN_AGENT, agent_id)
    if not isinstance(q, (SourceQuote, LegQuote)):
        raise QuoteRejected(WRONG_TYPE, type(q).__name__)
    if not isinstance(q.agent_id, str) or q.agent_id != agent_id:
        raise QuoteRejected(WRONG_AGENT, f"asked {agent_id}, answered as {q.agent_id!r}")
    is_source = shape.kinds[agent_id] == Kind.WAREHOUSE
    if isinstance(q, SourceQuote) != is_source or (is_source and agent_id not in shape.site_ids):
        raise QuoteRejected(WRONG_KIND, f"{type(q).__name__} from a {shape.kinds[agent_id]}")
    if not isinstance(q.order_idx, np.ndarray) or q.order_idx.ndim != 1:
        raise QuoteRejected(BAD_SHAPE, "order_idx is not a 1-D array")
    n = len(q.order_idx)
    if n == 0:
        raise QuoteRejected(EMPTY)
    order_idx = _index_array(q.order_idx, n, shape.n_orders)
    price = _float_array(q.price, n, "price", nonneg=True)
    reliability = _scalar_float(q.reliability)
    distinct = int(np.count_nonzero(np.bincount(order_idx, minlength=shape.n_orders)))
    capacity = _capacity(q.capacity, distinct)
    if isinstance(q, SourceQuote):
        ready = _float_array(q.ready_s, n, "ready_s", nonneg=False)
        return SourceQuote(agent_id, order_idx, price, ready, reliability, capacity)
    source_idx = _index_array(q.source_idx, n, shape.n_sites)
    pickup = _float_array(q.pickup_s, n, "pickup_s", nonneg=False)
    travel = _float_array(q.travel_s, n, "travel_s", nonneg=True)
    return LegQuote(agent_id, order_idx, source_idx, price, pickup, travel, reliability, capacity)


def validate_quote(q: Any, agent_id: str, shape: RoundShape) -> tuple[Quote | None, str]:
    """Like `check_quote`, but returns (clean quote, "") or (None, reason) instead of raising."""
    try:
        return check_quote(q, agent_id, shape), OK
    except QuoteRejected as err:
        return None, err.reason
    except Exception:  # noqa: BLE001 - any other surprise from a hostile object is a bad shape
        return None, BAD_SHAPE
