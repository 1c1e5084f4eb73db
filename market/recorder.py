"""What a run tells the outside world as it goes: the journal hooks.

The simulator, the Ray runtime and the HTTP service call the same hooks at the same
points, so every shell writes the same journal. `NullRecorder` costs nothing.
"""
from __future__ import annotations

from typing import Any, Protocol

from market.book import QuoteBook
from market.clearing import Allocation
from market.round import Round
from market.types import Order, Quote


class Recorder(Protocol):
    """Receives a run's events in order; an order is recorded before it is quoted.

    `holds_settled` names, per round, the winners' committed orders, the quoting bidders
    that released, and the awarded orders whose commit was refused or never confirmed
    (`refused`: unserved after all, so never among the committed); where the bidders can
    tell (Ray), also, per bidder, the awarded orders it refused (`refused_by`) and the
    orders whose committed line it was told to cancel (`cancelled`).
    """

    def run_started(self, info: dict[str, Any]) -> None: ...
    def order_received(self, order: Order, now: float) -> None: ...
    def round_opened(self, rnd: Round, attempts: list[int]) -> None: ...
    def round_cleared(self, rnd: Round, quotes: list[Quote], book: QuoteBook, alloc: Allocation, facts: dict[str, Any]) -> None: ...
    def holds_settled(self, round_id: int, committed: dict[str, list[str]], released: list[str], now: float,
                      refused: list[str], refused_by: dict[str, list[str]] | None = None,
                      cancelled: dict[str, list[str]] | None = None) -> None: ...
    def profile_changed(self, name: str, now: float) -> None: ...
    def close(self) -> None: ...


class NullRecorder:
    """Records nothing."""

    def run_started(self, info: dict[str, Any]) -> None:
        """No-op."""

    def order_received(self, order: Order, now: float) -> None:
        """No-op."""

    def round_opened(self, rnd: Round, attempts: list[int]) -> None:
        """No-op."""

    def round_cleared(self, rnd: Round, quotes: list[Quote], book: QuoteBook, alloc: Allocation, facts: dict[str, Any]) -> None:
        """No-op."""

    def holds_settled(self, round_id: int, committed: dict[str, list[str]], released: list[str], now: float,
                      refused: list[str], refused_by: dict[str, list[str]] | None = None,
                      cancelled: dict[str, list[str]] | None = None) -> None:
        """No-op."""

    def profile_changed(self, name: str, now: float) -> None:
        """No-op."""

    def close(self) -> None:
        """No-op."""
