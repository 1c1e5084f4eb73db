"""HTTP request and response models: strict, bounded, and self-describing in OpenAPI.

Every field has bounds and unknown fields are rejected, so a malformed order is a 422
that names the field, never a half-understood order in the market. Numbers and booleans
are strict (``"qty": true`` or ``"value": "59"`` is a mistake, not a 1 and a 59.0), and
free text may not carry control characters (they would reach the journal and every
answer that echoes it).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from market.types import Category, Item, Order, Tier

MAX_ITEMS = 50
KEY_PATTERN = r"^[\x21-\x7e]+$"  # printable ASCII without spaces: what a header can carry as is
TEXT_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]+$"  # no control characters


class Strict(BaseModel):
    """Base for request models: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class ItemIn(Strict):
    sku: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    qty: int = Field(ge=1, le=999, strict=True)


class Destination(Strict):
    lat: float = Field(ge=-90, le=90, strict=True)
    lon: float = Field(ge=-180, le=180, strict=True)


class OrderIn(Strict):
    """An order as a channel sends it."""

    order_id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    customer_id: str = Field(min_length=1, max_length=64, pattern=TEXT_PATTERN)
    tier: Tier = Tier.REGULAR
    channel: str = Field("app", min_length=1, max_length=32, pattern=TEXT_PATTERN)
    items: list[ItemIn] = Field(min_length=1, max_length=MAX_ITEMS)
    destination: Destination
    promise_minutes: float = Field(gt=0, le=7 * 24 * 60, strict=True, description="Deliver within this many minutes.")
    value: float = Field(ge=0, le=1_000_000, strict=True)
    category: Category = Category.AMBIENT
    locker_ok: bool = Field(False, strict=True)
    reserve: float | None = Field(None, gt=0, le=1_000_000, strict=True,
                                  description="Most the retailer pays; default from value.")

    @field_validator("items")
    @classmethod
    def _unique_skus(cls, items: list[ItemIn]) -> list[ItemIn]:
        skus = [i.sku for i in items]
        if len(set(skus)) != len(skus):
            raise ValueError("each sku may appear once; add up the quantities")
        return items

    def to_order(self, order_id: str, now_s: float, reserve_base: float, reserve_share: float) -> Order:
        """The market's order, stamped with the market clock."""
        return Order(
            order_id=order_id,
            created_s=now_s,
            customer_id=self.customer_id,
            tier=self.tier,
            channel=self.channel,
            items=tuple(Item(i.sku, i.qty) for i in self.items),
            lat=self.destination.lat,
            lon=self.destination.lon,
            promise_s=now_s + 60.0 * self.promise_minutes,
            value=self.value,
            category=self.category,
            locker_ok=self.locker_ok and self.category != Category.BULKY,
            reserve=self.reserve if self.reserve is not None else reserve_base + reserve_share * self.value,
        )


class Party(BaseModel):
    agent_id: str
    kind: str


class AwardOut(BaseModel):
    source: Party
    last_mile: Party
    price: float
    eta_s: float
    score: float


class AuctionFacts(BaseModel):
    round_id: int
    bidders_asked: int
    quotes_received: int
    timed_out: int
    clear_ms: float


class OrderOut(BaseModel):
    order_id: str
    status: Literal["awarded", "unfulfilled", "pending"]
    reason: str | None = None
    award: AwardOut | None = None
    auction: AuctionFacts | None = None


class OrderDetail(OrderOut):
    """`GET /orders/{id}`: the answer, the order as journaled, and what happened to it."""

    attempts: int
    order: dict[str, Any]
    events: list[dict[str, Any]]


class StrategyIn(Strict):
    profile: str = Field(min_length=1, max_length=32)


class StrategyOut(BaseModel):
    profile: str
    previous: str


class StrategyNow(BaseModel):
    profile: str
    known: list[str]


class Problem(BaseModel):
    """Error body: what is wrong, and where."""

    detail: str
