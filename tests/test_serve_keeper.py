"""The desk keeper without HTTP or Ray: a desk whose round loop dies is restarted on its journal."""
from __future__ import annotations

import gc
import logging
import time
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from market.engine import MarketEngine
from market.journal_recorder import JournalRecorder
from market.replay import explain, replay, verify
from market.round import Round
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
    kpis = replay(tmp_path / "j.bhj").logged.report()
    assert kpis["orders"] == 2  # the new desk journaled the one it took up again: still one order


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

    def start(*args: Any) -> Any:
        err = next(starts, None)
        if err is not None:
            raise err
        return real_start(*args)

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



def _poison(monkeypatch: pytest.MonkeyPatch, customer_id: str, error: Exception, where: str = "trade") -> list[int]:
    """Every round holding this customer's order raises `error`, as a bug that one order
    triggers would (or a disk that fails just then), in `MarketEngine.<where>`: ``trade``
    before the round is cleared, ``confirm`` once its awards are journaled (round_cleared)
    and before its commits are. Returns the sizes of those rounds."""
    real, failed = getattr(MarketEngine, where), []

    def broken(self: MarketEngine, first: Any, *rest: Any) -> Any:
        rnd: Round = first if where == "trade" else first.rnd
        if any(o.customer_id == customer_id for o in rnd.orders):
            failed.append(rnd.size)
            raise error
        return real(self, first, *rest)
    monkeypatch.setattr(MarketEngine, where, broken)
    return failed


@pytest.mark.parametrize("where", ["trade", "confirm"])
def test_an_order_whose_round_always_fails_is_dropped_alone_and_the_others_trade_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    monkeypatch.setattr(keeper_module, "RETRY_FIRST_S", 0.05)
    failed = _poison(monkeypatch, "c-poison", RuntimeError("injected fault: this order breaks its round"), where)
    cfg = _cfg(tmp_path / "j.bhj")
    cfg = cfg.model_copy(update={"batch": cfg.batch.model_copy(update={"window_ms": 300.0})})  # one first round
    keeper = DeskKeeper(cfg, watch_period_s=0.02)
    try:
        placed = {c: _place_nowait(keeper.desk, c, key=f"k-{c}") for c in ("c-a", "c-poison", "c-b")}
        _wait(lambda: keeper.restarts == 2)
        assert failed == [3, 1]  # died with all three in its round, then with the poison alone
        desk, ids = keeper.desk, {c: p.order_id for c, p in placed.items()}
        _wait(lambda: all((desk.order(i) or {}).get("status") in ("awarded", "unfulfilled") for i in ids.values()))
        poison = desk.order(ids["c-poison"])
        assert (poison["status"], poison["reason"]) == ("unfulfilled", "round_failed")
        assert poison["events"][-1] == {"event": "unfulfilled", "reason": "round_failed",
                                        "at_s": poison["events"][-1]["at_s"], "rounds_failed": 2}
        for c in ("c-a", "c-b"):  # traded alone after the first death, and ended by rounds of their own
            assert desk.order(ids[c])["reason"] != "round_failed"
        again = _place(desk, 0, key="k-c-poison", customer_id="c-poison")  # its key answers what it got
        assert again == {k: poison[k] for k in again}
        new_order = _place(desk, 1)["order_id"]
        assert desk.host.alive
        assert desk.metrics.counter("orders_ended_total", status="unfulfilled", reason="round_failed") == 1
        assert keeper.restarts == 2 and failed == [3, 1]
    finally:
        keeper.close()
    restarted = OrderDesk(cfg)  # a whole-service restart: the journal says it ended, so it is not traded again
    try:
        assert restarted.order(ids["c-poison"])["reason"] == "round_failed"
        assert restarted.index.unfinished() == [] and failed == [3, 1]
        restarted_answers = {i: restarted.order(i) for i in (*ids.values(), new_order)}
    finally:
        restarted.close()
    journal = tmp_path / "j.bhj"
    assert verify(journal) is None  # its order_dropped record aside, the journal re-clears as written
    kpis = replay(journal).logged.report()
    assert kpis["orders"] == 4  # three placed, one after: the orders each restart took up again are not new ones
    assert kpis["unfulfilled"].get("round_failed") == 1
    answers = [restarted_answers[i] for i in (*ids.values(), new_order)]
    assert kpis["fulfilled"] == sum(a["status"] == "awarded" for a in answers)  # as the service answered
    assert kpis["duplicate_awards"] == 0  # an award whose commit never came does not count
    assert explain(journal, ids["c-poison"])["outcome"] == "unfulfilled (round_failed)"
    first_try = explain(journal, ids["c-a"])["rounds"][0]
    assert first_try.get("not_committed", False) == (where == "confirm" and bool(first_try["winner"]))


def test_a_round_that_dies_of_the_machine_blames_no_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keeper_module, "RETRY_FIRST_S", 0.05)
    failed = _poison(monkeypatch, "c-innocent", OSError(28, "No space left on device"))
    keeper = DeskKeeper(_cfg(tmp_path / "j.bhj"), watch_period_s=0.02)
    try:
        placed = _place_nowait(keeper.desk, "c-innocent")
        _wait(lambda: keeper.restarts == 3)  # more deaths with it than it takes to drop an order
        assert len(failed) >= 3 and keeper.desk.failed_rounds == {}
        monkeypatch.undo()  # the disk is back: the next desk trades it
        _wait(lambda: (keeper.desk.order(placed.order_id) or {}).get("status") in ("awarded", "unfulfilled"))
        assert keeper.desk.order(placed.order_id)["reason"] != "round_failed"
    finally:
        keeper.close()


def test_only_a_round_of_its_own_counts_against_an_order_past_suspicion() -> None:
    def dead(blamed: tuple[str, ...], counts: dict[str, int]) -> Any:
        return SimpleNamespace(failed_rounds=counts, host=SimpleNamespace(blamed=blamed))
    counts = keeper_module._count_failed_round(dead(("a", "b"), {}))
    assert counts == {"a": 1, "b": 1}  # suspects
    assert keeper_module._count_failed_round(dead(("a", "b"), counts)) == {"a": 1, "b": 1}  # shared again: still
    assert keeper_module._count_failed_round(dead(("b",), counts)) == {"a": 1, "b": 2}  # its own round: dropped next
    assert keeper_module._count_failed_round(dead((), counts)) == counts  # a death of the machine
