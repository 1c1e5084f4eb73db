"""The desk keeper without HTTP or Ray: a desk whose round loop dies is restarted on its journal."""
from __future__ import annotations

import gc
import logging
import time
import weakref
from pathlib import Path
from typing import Any

import pytest

from market.journal_recorder import JournalRecorder
from runtime import gc_pauses
from serve import keeper as keeper_module
from serve.desk import DeskError, OrderDesk, Placed
from serve.idempotency import body_hash
from serve.keeper import DeskKeeper
from serve.models import OrderIn
from tests.test_serve_desk import BODY, _cfg, _place


def _kill_round_loop(desk: OrderDesk) -> None:
    """The next round raises, as a bug in a round would."""
    def step() -> None:
        raise RuntimeError("injected fault: a round failed")
    desk.host.core.step = step  # type: ignore[method-assign]


def _place_nowait(desk: OrderDesk, customer_id: str = "c-x", key: str | None = None) -> Placed:
    """Places an order without waiting for its round (which may never come)."""
    body = {**BODY, "customer_id": customer_id}
    return desk.place(OrderIn.model_validate(body), body_hash(body), key)


def _wait(cond: Any, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_a_dead_round_loop_gets_a_new_desk_that_ends_its_orders_and_keys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keeper_module, "RETRY_FIRST_S", 0.05)
    keeper = DeskKeeper(_cfg(tmp_path / "j.bhj"), watch_period_s=0.05)
    try:
        first = keeper.desk
        _kill_round_loop(first)
        placed = _place_nowait(first, "c-dead", key="k-dead")
        assert placed.future is not None
        _wait(lambda: keeper.restarts == 1)
        assert first.sync(placed.order_id, timeout_s=1)  # journaled, and the old desk's close synced it
        with pytest.raises(DeskError) as refused:  # the dead desk refuses, it does not queue
            _place(first, 1)
        assert refused.value.status == 503
        desk = keeper.desk
        assert desk is not first and desk.host.alive
        _wait(lambda: (desk.order(placed.order_id) or {}).get("status") in ("awarded", "unfulfilled"))
        again = _place(desk, 0, key="k-dead", customer_id="c-dead")  # the same key and body
        assert again["order_id"] == placed.order_id and again["status"] in ("awarded", "unfulfilled")
        assert _place(desk, 2)["status"] in ("awarded", "unfulfilled")
        assert not placed.future.done()  # its client was answered by the 202 path, never by the old loop
    finally:
        keeper.close()
    assert keeper.desk.recorder.writer.closed


def test_a_restart_that_fails_is_tried_again_and_the_old_desk_closes_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keeper_module, "RETRY_FIRST_S", 0.05)
    keeper = DeskKeeper(_cfg(tmp_path / "j.bhj"), watch_period_s=0.05)
    closes: list[OrderDesk] = []
    real_close, real_start = OrderDesk.close, keeper._start
    starts = iter([RuntimeError("the disk is full"), None])

    def close(desk: OrderDesk) -> None:
        closes.append(desk)
        real_close(desk)

    def start() -> Any:
        err = next(starts, None)
        if err is not None:
            raise err
        return real_start()

    monkeypatch.setattr(OrderDesk, "close", close)
    monkeypatch.setattr(keeper, "_start", start)
    try:
        first = keeper.desk
        _kill_round_loop(first)
        _place_nowait(first)
        _wait(lambda: keeper.restarts == 1)
        assert closes == [first]  # stopped once, though the first start after it failed
        assert keeper.desk.host.alive
    finally:
        keeper.close()
    assert closes[-1] is keeper.desk


def test_a_desk_that_dies_again_soon_waits_longer_each_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keeper_module, "RETRY_FIRST_S", 0.3)
    keeper = DeskKeeper(_cfg(tmp_path / "j.bhj"), watch_period_s=0.02)
    try:
        waits = []
        for n in (1, 2):
            died = time.monotonic()
            _kill_round_loop(keeper.desk)
            _place_nowait(keeper.desk)
            _wait(lambda: keeper.restarts == n)
            waits.append(time.monotonic() - died)
    finally:
        keeper.close()
    assert waits[0] >= 0.3 and waits[1] >= 0.6  # it died within STABLE_S of a start: 0.3 s, then doubled


def test_a_replaced_desk_is_freed_though_the_process_freezes_its_objects(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keeper_module, "RETRY_FIRST_S", 0.05)
    monkeypatch.delenv("BIDHIVE_GC_FREEZE", raising=False)
    # pytest keeps each log record, and the loop's death is logged with its traceback, whose
    # frames hold the old desk: keep that record away from pytest (the service keeps none)
    monkeypatch.setattr(logging.getLogger("bidhive.auctioneer"), "propagate", False)
    keeper = DeskKeeper(_cfg(tmp_path / "j.bhj"), watch_period_s=0.02)
    gc_pauses.bound_gc_pauses()  # as the replica does once it is set up
    try:
        old = weakref.ref(keeper.desk)
        _kill_round_loop(keeper.desk)
        _place_nowait(keeper.desk)
        _wait(lambda: keeper.restarts == 1)
        gc.collect()
        assert old() is None  # its cycles (the journal's callbacks into it) were not left frozen
    finally:
        gc_pauses.release()
        keeper.close()


def test_a_start_that_fails_after_taking_the_journal_lets_go_of_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = JournalRecorder.run_started
    calls = iter([OSError(28, "No space left on device"), None])

    def run_started(self: JournalRecorder, info: dict[str, Any]) -> None:
        err = next(calls)
        if err is not None:
            raise err
        real(self, info)

    monkeypatch.setattr(JournalRecorder, "run_started", run_started)
    with pytest.raises(OSError):
        OrderDesk(_cfg(tmp_path / "j.bhj"))
    desk = OrderDesk(_cfg(tmp_path / "j.bhj"))  # JournalLocked, had the first kept the lock
    try:
        assert _place(desk, 1)["status"] in ("awarded", "unfulfilled")
    finally:
        desk.close()


def test_no_202_for_an_order_the_journal_could_not_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    desk = OrderDesk(_cfg(tmp_path / "j.bhj"))
    writer = desk.recorder.writer
    try:
        monkeypatch.setattr(writer, "_sync_due", float("inf"))  # no sync on an append: the order stays unsynced
        _kill_round_loop(desk)
        placed = _place_nowait(desk, "c-unsynced")
        _wait(lambda: desk.index.knows(placed.order_id) and not desk.host.alive)

        def disk_error() -> None:
            raise OSError(5, "Input/output error")
        monkeypatch.setattr(writer, "_sync", disk_error)
        assert writer.unsynced and desk.sync(placed.order_id, timeout_s=1) is False
    finally:
        monkeypatch.undo()
        desk.close()
