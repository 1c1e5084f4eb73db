"""Domain types shared by every shell: orders, quotes, awards.

Quotes carry NumPy arrays rather than per-order objects because a bidder answers a
whole round in one message and the auctioneer scores all combinations at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from market.packing import packed_pickle


class Tier(StrEnum):
    """Customer tier; VIP orders clear first and may carry a hard promise."""

    VIP = "vip"
    REGULAR = "regular"


class Category(StrEnum):
    """Handling category; decides which warehouses and legs may carry an order."""

    AMBIENT = "ambient"
    CHILLED = "chilled"
    FROZEN = "frozen"
    BULKY = "bulky"


CATEGORY_CODES: dict[Category, int] = {c: i for i, c in enumerate(Category)}


class Kind(StrEnum):
    """Resource kinds; warehouses are sources, the other three quote last-mile legs."""

    WAREHOUSE = "warehouse"
    RIDER_POOL = "rider_pool"
    CROWD = "crowd"
    LOCKER = "locker"


LEG_KINDS: tuple[Kind, ...] = (Kind.RIDER_POOL, Kind.CROWD, Kind.LOCKER)


@dataclass(frozen=True, slots=True)
class Item:
    """One order line."""

    sku: str
    qty: int


@dataclass(frozen=True, slots=True)
class Order:
    """A customer order as it arrives from a channel.

    Attributes:
        promise_s: deliver-by time on the market clock (seconds).
        reserve: the most the retailer will pay for source plus last mile.
    """

    order_id: str
    created_s: float
    customer_id: str
    tier: Tier
    channel: str
    items: tuple[Item, ...]
    lat: float
    lon: float
    promise_s: float
    value: float
    category: Category
    locker_ok: bool
    reserve: float

    @property
    def units(self) -> int:
        """Total item quantity; lockers use it as the parcel size."""
        return sum(item.qty for item in self.items)


@packed_pickle
@dataclass(slots=True)
class SourceQuote:
    """A warehouse's answer to one round: one row per order it can source."""

    agent_id: str
    order_idx: np.ndarray  # int64 indices into the round's orders
    price: np.ndarray  # float64, money
    ready_s: np.ndarray  # float64, market clock when the parcel is picked
    reliability: float
    capacity: int  # orders it can still take this round (held until close)


@packed_pickle
@dataclass(slots=True)
class LegQuote:
    """A last-mile bidder's answer: one row per (source, order) it can serve."""

    agent_id: str
    order_idx: np.ndarray  # int64
    source_idx: np.ndarray  # int64 indices into the round's source list
    price: np.ndarray  # float64
    pickup_s: np.ndarray  # float64, earliest arrival at the source
    travel_s: np.ndarray  # float64, source to customer (or locker) incl. handover
    reliability: float
    capacity: int


Quote = SourceQuote | LegQuote


@dataclass(frozen=True, slots=True)
class AwardLine:
    """What one bidder is told it won for one order."""

    round_id: int
    order_id: str
    order_idx: int
    source_id: str
    leg_id: str
    price: float  # this bidder's own quoted price
    payment: float  # what the market pays this bidder
    ready_s: float
    pickup_s: float
    delivery_s: float
    source_x: float
    source_y: float
    dest_x: float
    dest_y: float
    units: int
    done_s: float  # when this bidder's part ends, as the world realises it
    on_time: bool  # whether this bidder's part met its own quoted time


@dataclass(slots=True)
class OrderOutcome:
    """Terminal state of one order as the KPIs see it."""

    order_id: str
    tier: Tier
    awarded: bool
    reason: str = ""
    price: float = 0.0
    payment: float = 0.0
    score: float = 0.0
    promised_s: float = 0.0
    predicted_s: float = 0.0
    delivered_s: float = 0.0
    source_kind: str = ""
    leg_kind: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def on_time(self) -> bool:
        """Delivered no later than promised."""
        return self.awarded and self.delivered_s <= self.promised_s
