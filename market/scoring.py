"""Money-valued multi-attribute scoring (lower is better).

score = price + value_of_time x ETA + lateness_penalty x P(late)
        + reliability_penalty x (1 - reliability)

Every term is money, so profile weights are prices; scoring-auction theory recommends
this quasi-linear form over price/quality ratios, which reward cheap low quality.
P(late) uses the same delay model the simulator realises: with probability
(1 - reliability) a delay ~ Exp(delay_mean_s) hits, so P(late) = (1 - r) exp(-slack / mean)
when the predicted delivery has slack, and 1 when it is already late.
"""
from __future__ import annotations

import numpy as np

from market.config import ProfileCfg


def p_late(delivery_s: np.ndarray, promise_s: np.ndarray, reliability: np.ndarray, delay_mean_s: float) -> np.ndarray:
    """Probability that the delivery misses its promise under the delay model."""
    slack = promise_s - delivery_s
    on_track = (1.0 - reliability) * np.exp(-np.maximum(slack, 0.0) / delay_mean_s)
    return np.where(slack < 0.0, 1.0, on_track)


def score(
    price: np.ndarray,
    delivery_s: np.ndarray,
    now_s: float,
    promise_s: np.ndarray,
    reliability: np.ndarray,
    vip: np.ndarray,
    profile: ProfileCfg,
) -> np.ndarray:
    """Scores combinations element-wise; all arrays share one shape.

    The VIP lateness weight is multiplied out once, not per combination: the same
    products (``penalty * 1.0`` is ``penalty``) for one NumPy call less per round.
    """
    eta_h = np.maximum(delivery_s - now_s, 0.0) / 3600.0
    late = p_late(delivery_s, promise_s, reliability, profile.delay_mean_s)
    penalty = profile.lateness_penalty
    late_weight = np.where(vip, penalty * profile.vip_lateness_multiplier, penalty)
    return price + profile.value_of_time_per_h * eta_h + late_weight * late + profile.reliability_penalty * (1.0 - reliability)


def unfulfilled_penalty(vip: np.ndarray, profile: ProfileCfg) -> np.ndarray:
    """What leaving an order unserved costs, per order; an award must beat it."""
    return np.where(vip, profile.vip_unfulfilled_penalty, profile.unfulfilled_penalty)
