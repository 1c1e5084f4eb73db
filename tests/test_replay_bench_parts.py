"""The journal target's verdict in `bidhive bench replay`: the issue's measure, throughput lost."""
from __future__ import annotations

import math
from typing import Any

from bench.replay_bench import TARGET_OVERHEAD, _overhead_target, throughput_loss


def _overhead(pairs_added: float, best_added: float) -> dict[str, Any]:
    return {"simultaneous": {"median_of_pairs": pairs_added,
                             "throughput_loss_median_of_pairs": throughput_loss(pairs_added)},
            "interval": {"overhead_wall": best_added, "throughput_loss_wall": throughput_loss(best_added)},
            "isolated": {"interval": {"overhead": 0.06}}}


def test_throughput_loss_is_the_share_of_orders_per_second_lost() -> None:
    # 1,000 orders in 10 s, then in 11 s: 100 against 90.9 orders/s, 9.1% lost.
    assert math.isclose(throughput_loss(0.1), 1 - (1000 / 11) / (1000 / 10))
    assert throughput_loss(0.0) == 0.0
    assert math.isclose(throughput_loss(1 / 9), TARGET_OVERHEAD)  # 11.1% more time is 10% of throughput


def test_met_needs_both_estimators_within_the_target_and_keeps_the_added_time_beside_them() -> None:
    met = _overhead_target(_overhead(0.105, 0.109))
    assert met["met"] and met["added_time"] == 0.105 and met["added_time_end_to_end"] == 0.109
    assert math.isclose(met["measured"], 1 - 1 / 1.105)
    assert not _overhead_target(_overhead(0.105, 0.12))["met"]  # best of runs: 10.7% of throughput lost
    assert not _overhead_target(_overhead(0.115, 0.05))["met"]  # median of pairs: 10.3% lost
