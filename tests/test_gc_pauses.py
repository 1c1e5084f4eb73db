"""Bounded full-collection pauses: what survives is frozen, and the service leaves no cycles behind."""
from __future__ import annotations

import gc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from runtime import gc_pauses
from serve.config import BatchCfg, ServeCfg
from serve.desk import OrderDesk
from serve.idempotency import body_hash
from serve.models import OrderIn


@pytest.fixture
def bounded() -> Iterator[None]:
    gc.collect()
    gc_pauses.bound_gc_pauses()
    gc_pauses.take_pauses()
    try:
        yield
    finally:
        gc_pauses.release()
        gc.collect()


def test_survivors_of_a_full_collection_are_frozen_and_not_walked_again(bounded: None) -> None:
    frozen_before = gc_pauses.frozen()
    kept = [{"order": [i], "events": [{"n": [i]}]} for i in range(20_000)]  # 80,000 containers
    gc.collect()
    assert gc_pauses.frozen() >= frozen_before + 80_000
    assert len(gc.get_objects()) < 5_000  # what a full collection still walks
    assert len(gc_pauses.take_pauses()) >= 1 and gc_pauses.take_pauses() == []
    del kept


def test_released_means_walked_again(bounded: None) -> None:
    gc.collect()
    assert gc_pauses.frozen() > 0
    gc_pauses.release()
    assert gc_pauses.frozen() == 0 and len(gc.get_objects()) > 10_000
    gc.collect()
    assert gc_pauses.frozen() == 0  # no callback left to freeze again
    gc_pauses.bound_gc_pauses()  # the fixture releases it again


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDHIVE_GC_FREEZE", "0")
    before = gc_pauses.frozen()
    gc_pauses.bound_gc_pauses()
    assert gc_pauses.frozen() == before and gc_pauses._on_gc not in gc.callbacks


def test_the_desk_leaves_no_cyclic_garbage_for_the_freezer_to_keep(tmp_path: Path, bounded: None) -> None:
    """Full collections while orders are in flight freeze rounds, futures and records; once the
    orders have ended, a collection of everything finds nothing unreachable among them.

    (The first orders leave about 10 one-off objects, importlib metadata caches built on
    first use: the warm-up takes those, so the check is about what grows with orders.)"""
    cfg = ServeCfg(fleet="district", bidders="local", journal=str(tmp_path / "j.bhj"),
                   batch=BatchCfg(window_ms=2, retry_after_ms=5, max_attempts=2))
    desk = OrderDesk(cfg)
    try:
        def place(i: int) -> str:
            body = {"customer_id": f"c-{i}", "items": [{"sku": f"sku-{i % 40:05d}", "qty": 1}],
                    "destination": {"lat": 31.2304 + 0.002 * (i % 9), "lon": 121.4737}, "promise_minutes": 120,
                    "value": 40.0}
            placed = desk.place(OrderIn.model_validate(body), body_hash(body), f"k-{i}")
            gc.collect()  # freezes whatever is alive right now, in-flight state included
            assert placed.future is not None
            return placed.future.result(30)["status"]

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(place, range(40)))  # warm-up: first uses leave a few one-off cycles
            gc_pauses.audit()
            statuses = list(pool.map(place, range(40, 280)))
        assert set(statuses) <= {"awarded", "unfulfilled"} and "awarded" in statuses
        assert gc_pauses.frozen() > 0 and len(gc_pauses.take_pauses()) >= 240
        assert gc_pauses.audit() == 0
    finally:
        desk.close()
