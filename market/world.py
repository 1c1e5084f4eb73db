"""The world: how committed jobs actually turn out.

Bidders only estimate their reliability; the world draws the truth from each
resource's configured reliability, with the delay model scoring assumes: with
probability (1 - reliability) a delay ~ Exp(DELAY_MEAN_S) hits that resource's part.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from market.types import Kind

DELAY_MEAN_S = 900.0


@dataclass(frozen=True, slots=True)
class Realised:
    """Outcome of each awarded combination, element-wise."""

    ready_s: np.ndarray
    delivered_s: np.ndarray
    src_on_time: np.ndarray
    leg_on_time: np.ndarray
    leg_done_s: np.ndarray  # when the leg's capacity frees (collection, for lockers)


def realise(
    ready_s: np.ndarray,
    pickup_s: np.ndarray,
    travel_s: np.ndarray,
    src_reliability: np.ndarray,
    leg_reliability: np.ndarray,
    leg_kind: list[Kind],
    collect_mean_s: np.ndarray,
    rng: np.random.Generator,
) -> Realised:
    """Draws delays for a round's awards in a fixed order, so runs are reproducible."""
    n = len(ready_s)
    draws = rng.uniform(size=(n, 2))
    delays = rng.exponential(DELAY_MEAN_S, size=(n, 2))
    collect = rng.exponential(1.0, size=n) * collect_mean_s
    src_late = draws[:, 0] > src_reliability
    leg_late = draws[:, 1] > leg_reliability
    ready = ready_s + np.where(src_late, delays[:, 0], 0.0)
    delivered = np.maximum(ready, pickup_s) + travel_s + np.where(leg_late, delays[:, 1], 0.0)
    is_locker = np.array([k == Kind.LOCKER for k in leg_kind], dtype=bool)
    leg_done = delivered + np.where(is_locker, collect, 0.0)
    return Realised(ready, delivered, ~src_late, ~leg_late, leg_done)
