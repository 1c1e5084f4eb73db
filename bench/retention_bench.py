"""The order index's memory and time per order, live views against the archive (`retain_orders`).

The service keeps its ended orders answerable, the newest as live views and the rest
archived compressed (`serve.order_archive`). This builds a service journal (an
in-process desk, local bidders, metro fleet, every order with an idempotency key), then
rebuilds the order index from it three ways, as a restart would:

- ``live``: every ended order kept as a live view (the index before the archive);
- ``default``: the service's setting (the newest `HOT_ENDED` live, the rest archived);
- ``archived``: every ended order archived (``hot=0``).

For each: CPU µs per order to apply the journal (the same work the live service does
per record, on its core thread), the index's memory per order (`tracemalloc`, what
the index holds after the build), and the time to answer `GET /orders/{id}` and a
repeated key for an order of each kind. Run ``python -m bench.retention_bench`` or
``bidhive bench retention``.
"""
from __future__ import annotations

import gc
import json
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.stats import machine
from market.journal import read_journal
from serve.config import ServeCfg
from serve.desk import OrderDesk
from serve.idempotency import body_hash
from serve.models import OrderIn
from serve.order_index import HOT_ENDED, OrderIndex

BODY: dict[str, Any] = {"customer_id": "c-1", "items": [{"sku": "sku-00003", "qty": 1}],
                        "destination": {"lat": 31.2304, "lon": 121.4737}, "promise_minutes": 120, "value": 40.0}
ARMS = {"live": 10**12, "default": HOT_ENDED, "archived": 0}


def _journal(path: Path, n_orders: int, batch: int = 64, rotate_mb: float | None = None,
             before_close: Callable[[OrderDesk], None] | None = None) -> None:
    """A service journal of `n_orders` keyed orders, placed `batch` at a time, in files of
    `rotate_mb` (one file when None); `before_close` sees the desk once they are placed."""
    desk = OrderDesk(ServeCfg(fleet="metro", bidders="local", journal=str(path), max_open_orders=10 * batch,
                              journal_rotate_mb=rotate_mb))
    try:
        for start in range(0, n_orders, batch):
            bodies = [{**BODY, "customer_id": f"c-{i}",
                       "destination": {"lat": 31.2304 + 0.0004 * (i % 50 - 25), "lon": 121.4737}}
                      for i in range(start, min(start + batch, n_orders))]
            placed = [desk.place(OrderIn.model_validate(b), body_hash(b), f"key-{start + k}")
                      for k, b in enumerate(bodies)]
            for p in placed:
                p.future.result(60)  # type: ignore[union-attr]
        if before_close is not None:
            before_close(desk)
    finally:
        desk.close()


def _apply_all(records: list[dict[str, Any]], hot: int) -> OrderIndex:
    index = OrderIndex(hot=hot)
    for rec in records:
        index.apply(rec)
    return index


def _build(records: list[dict[str, Any]], hot: int) -> tuple[OrderIndex, float, float]:
    """The index over `records`; CPU seconds to apply them (untraced); bytes it holds (traced)."""
    gc.collect()
    cpu0 = time.process_time()
    index = _apply_all(records, hot)
    cpu = time.process_time() - cpu0
    del index
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = _apply_all(records, hot)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return index, cpu, held


def _median_us(fn: Any, args: list[Any]) -> float:
    times = []
    for a in args:
        t0 = time.perf_counter()
        fn(a)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 2)


def _arm(records: list[dict[str, Any]], hot: int) -> dict[str, Any]:
    index, cpu, held = _build(records, hot)
    n = len(index)
    oldest = list(index.keys.values())[:200]  # archived unless every order is live
    keys = list(index.keys)[:200]
    return {"hot": min(hot, n), "orders": n, "archived": len(index.archive),
            "apply_us_per_order": round(cpu / n * 1e6, 1), "index_bytes_per_order": round(held / n),
            "get_order_us": _median_us(index.detail, oldest), "repeat_key_us": _median_us(index.by_key, keys)}


def run(quick: bool = False) -> dict[str, Any]:
    """Builds a journal and measures the three arms, twice each, alternating."""
    n_orders = 1_500 if quick else 12_000
    with tempfile.TemporaryDirectory(prefix="bh-retention-") as tmp:
        journal = Path(tmp) / "j.bhj"
        t0 = time.perf_counter()
        _journal(journal, n_orders)
        records = list(read_journal(journal))
        journal_s, journal_bytes = time.perf_counter() - t0, journal.stat().st_size
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for _ in range(2):
        for arm, hot in ARMS.items():
            runs[arm].append(_arm(records, hot))
    return {"benchmark": "retention", "machine": machine(), "orders": n_orders, "hot_ended": HOT_ENDED,
            "journal_bytes_per_order": round(journal_bytes / n_orders), "journal_build_s": round(journal_s, 1),
            "arms": runs}


def main() -> None:
    print(json.dumps(run(), indent=2))


if __name__ == "__main__":
    main()
