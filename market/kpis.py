"""KPIs with the same names in every shell (DESIGN section 3)."""
from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from market.types import Kind

KPI_NAMES = (
    "orders",
    "fulfilled_rate",
    "cost_per_order",
    "on_time_rate",
    "vip_on_time_rate",
    "utilization",
    "efficiency_vs_exact",
    "p50_clear_ms",
    "p99_clear_ms",
)


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 6) if den else None


@dataclass
class KpiTracker:
    """Accumulates order outcomes and clearing facts into the KPI report."""

    orders: int = 0
    fulfilled: int = 0
    on_time: int = 0
    vip_fulfilled: int = 0
    vip_on_time: int = 0
    vip_orders: int = 0
    paid: float = 0.0
    rounds: int = 0
    clear_ms: array = field(default_factory=lambda: array("d"))  # 8 bytes a round, not 32: a service runs for days
    greedy_cost: float = 0.0
    exact_cost: float = 0.0
    unfulfilled: Counter[str] = field(default_factory=Counter)
    leg_mix: Counter[str] = field(default_factory=Counter)

    def order_in(self, vip: bool) -> None:
        """Counts a new order (retries are not new orders)."""
        self.orders += 1
        self.vip_orders += int(vip)

    def awarded(self, vip: bool, payment: float, on_time: bool, leg_kind: Kind) -> None:
        """Counts a fulfilled order and what it cost."""
        self.fulfilled += 1
        self.paid += payment
        self.on_time += int(on_time)
        self.vip_fulfilled += int(vip)
        self.vip_on_time += int(vip and on_time)
        self.leg_mix[leg_kind.value] += 1

    def gave_up(self, reason: str) -> None:
        """Counts an order that ended unfulfilled."""
        self.unfulfilled[reason] += 1

    def cleared(self, ms: float) -> None:
        """Records one round's clearing time."""
        self.rounds += 1
        self.clear_ms.append(ms)

    def compared(self, mechanism_cost: float, exact_cost: float) -> None:
        """Adds one sampled round's total cost under the mechanism and under exact clearing."""
        self.greedy_cost += mechanism_cost
        self.exact_cost += exact_cost

    def report(self, utilization: dict[str, float], timing: bool = True) -> dict[str, Any]:
        """The KPI dict; `timing=False` leaves out wall-clock figures for byte-stable output."""
        ms = np.asarray(self.clear_ms) if self.clear_ms else np.zeros(1)
        out: dict[str, Any] = {
            "orders": self.orders,
            "fulfilled_rate": _ratio(self.fulfilled, self.orders),
            "cost_per_order": _ratio(self.paid, self.fulfilled),
            "on_time_rate": _ratio(self.on_time, self.fulfilled),
            "vip_on_time_rate": _ratio(self.vip_on_time, self.vip_fulfilled),
            "utilization": {k: round(v, 6) for k, v in utilization.items()},
            "efficiency_vs_exact": _ratio(self.greedy_cost, self.exact_cost),
            "p50_clear_ms": round(float(np.percentile(ms, 50)), 4) if timing else None,
            "p99_clear_ms": round(float(np.percentile(ms, 99)), 4) if timing else None,
            "rounds": self.rounds,
            "vip_orders": self.vip_orders,
            "unfulfilled": dict(sorted(self.unfulfilled.items())),
            "leg_mix": dict(sorted(self.leg_mix.items())),
        }
        return out


def utilization_by_kind(per_agent: list[tuple[Kind, float]]) -> dict[str, float]:
    """Mean utilization per kind and over all agents."""
    out: dict[str, float] = {}
    for kind in Kind:
        vals = [u for k, u in per_agent if k == kind]
        if vals:
            out[kind.value] = float(np.mean(vals))
    out["overall"] = float(np.mean([u for _, u in per_agent])) if per_agent else 0.0
    return out
