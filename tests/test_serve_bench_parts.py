"""The serve bench's reading of the service's own /metrics (`bench.serve_load`)."""
from __future__ import annotations

from bench.serve_load import histogram_view, parse_metrics
from serve.metrics import Metrics


def test_a_phase_sees_only_its_own_share_of_a_latency_histogram() -> None:
    m = Metrics()
    for ms in (3.0, 3.0, 400.0):  # before the phase
        m.observe_ms("order_latency_ms", ms)
    before = parse_metrics(m.render())
    for ms in [4.0] * 90 + [30.0] * 8 + [120.0, 3000.0]:  # the phase: 100 orders
        m.observe_ms("order_latency_ms", ms)
    view = histogram_view(before, parse_metrics(m.render()), "order_latency_ms")
    assert view["count"] == 100
    assert view["mean_ms"] == round((90 * 4.0 + 8 * 30.0 + 120.0 + 3000.0) / 100, 1)
    assert (view["p50_le_ms"], view["p95_le_ms"], view["p99_le_ms"]) == (5, 50, 150)


def test_a_percentile_beyond_the_last_bucket_and_an_empty_phase_say_none() -> None:
    m = Metrics()
    before = parse_metrics(m.render())
    assert histogram_view(before, before, "order_latency_ms")["p99_le_ms"] is None
    for _ in range(10):
        m.observe_ms("order_latency_ms", 9000.0)
    view = histogram_view(before, parse_metrics(m.render()), "order_latency_ms")
    assert view["count"] == 10 and view["p50_le_ms"] is None and view["mean_ms"] == 9000.0
