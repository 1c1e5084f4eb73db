"""The desk keeper without HTTP or Ray: a desk whose round loop dies is restarted on its journal."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from serve import keeper as keeper_module
from serve.desk import DeskError, OrderDesk
from serve.idempotency import body_hash
from serve.keeper import DeskKeeper
from serve.models import OrderIn
from tests.test_serve_desk import BODY, _cfg, _place


def _kill_round_loop(desk: OrderDesk) -> None:
    """The next round raises, as a bug in a round would."""
    def step() -> None:
        raise RuntimeError("injected fault: a round failed")
    desk.host.core.step = step  # type: ignore[method-assign]


def _wait(cond: Any, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_a_dead_round_loop_gets_a_new_desk_that_ends_its_orders_and_keys(tmp_path: Path) -> None:
    keeper = DeskKeeper(_cfg(tmp_path / "j.bhj"), watch_period_s=0.05)
    try:
        first = keeper.desk
        _kill_round_loop(first)
        body = {**BODY, "customer_id": "c-dead"}
        placed = first.place(OrderIn.model_validate(body), body_hash(body), "k-dead")
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


def _place_nowait(desk: OrderDesk) -> None:
    body = {**BODY, "customer_id": "c-x"}
    desk.place(OrderIn.model_validate(body), body_hash(body), None)
