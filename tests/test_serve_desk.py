"""The order desk without HTTP or Ray: journal-first acceptance, restart, resume, replay."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.actor import capacity_violations
from market.engine import LocalBidders
from market.journal import MAGIC, journal_files, read_journal
from market.journal_recorder import JournalRecorder
from market.types import Category, Item, Order, Tier
from serve.config import MB, BatchCfg, ServeCfg
from serve.desk import DeskError, OrderDesk
from serve.idempotency import body_hash
from serve.models import OrderIn
from serve.order_index import OrderIndex
from tests.factories import refuse_commits

BODY: dict[str, Any] = {
    "customer_id": "c-1", "items": [{"sku": "sku-00003", "qty": 1}],
    "destination": {"lat": 31.2304, "lon": 121.4737}, "promise_minutes": 120, "value": 40.0,
}


def _cfg(journal: Path, **kw: Any) -> ServeCfg:
    return ServeCfg(fleet="district", bidders="local", journal=str(journal),
                    batch=BatchCfg(window_ms=2, retry_after_ms=5, max_attempts=2), **kw)


def _stall(desk: OrderDesk) -> threading.Event:
    """Holds the round loop inside one step until the returned event is set."""
    stalled, go_on = threading.Event(), threading.Event()
    desk.host.call(lambda core: (stalled.set(), go_on.wait(30)))
    assert stalled.wait(10)
    return go_on


def _place(desk: OrderDesk, i: int, key: str | None = None, **patch: Any) -> dict[str, Any]:
    body = {**BODY, "customer_id": f"c-{i}", **patch}
    placed = desk.place(OrderIn.model_validate(body), body_hash(body), key)
    return placed.answer if placed.answer is not None else placed.future.result(30)  # type: ignore[union-attr]


def test_answers_and_timelines_are_what_the_journal_says(tmp_path: Path) -> None:
    desk = OrderDesk(_cfg(tmp_path / "j.bhj"))
    try:
        answers = [_place(desk, i, key=f"k-{i}", destination={"lat": 31.2304 + 0.004 * i, "lon": 121.4737})
                   for i in range(12)]
        live = {oid: desk.order(oid) for oid in (a["order_id"] for a in answers)}
    finally:
        desk.close()
    assert {a["status"] for a in answers} <= {"awarded", "unfulfilled"} and answers[0]["status"] == "awarded"
    rebuilt = OrderIndex()
    for rec in read_journal(tmp_path / "j.bhj"):
        rebuilt.apply(rec)
    for oid, detail in live.items():
        assert rebuilt.orders[oid].detail() == detail
    assert rebuilt.keys == {f"k-{i}": a["order_id"] for i, a in enumerate(answers)}


def test_the_service_journal_passes_replay_verify(tmp_path: Path) -> None:
    desk = OrderDesk(_cfg(tmp_path / "j.bhj"))
    try:
        for i in range(20):
            _place(desk, i, destination={"lat": 31.2304 - 0.003 * i, "lon": 121.4737 + 0.002 * i})
        desk.set_profile("time_first")
        for i in range(20, 30):
            _place(desk, i)
    finally:
        desk.close()
    run = subprocess.run([sys.executable, "-m", "bidhive_cli.main", "replay", str(tmp_path / "j.bhj"), "--verify",
                          "--json"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_a_rotated_journal_is_one_journal_to_a_restart_and_to_replay(tmp_path: Path) -> None:
    journal = tmp_path / "j.bhj"
    cfg = _cfg(journal, journal_rotate_mb=0.02)  # about ten orders a file
    desk = OrderDesk(cfg)
    try:
        answers = [_place(desk, i, key=f"k-{i}") for i in range(40)]
        reported = desk.health()[1]["journal"]
    finally:
        desk.close()
    files = journal_files(journal)  # stopping started one more, so the next start reads none of them
    assert len(files) >= 3 and reported["files"] + 1 == len(files) and files[-1].stat().st_size == len(MAGIC)
    assert all(f.stat().st_size <= cfg.journal_rotate_bytes for f in files[:-1])  # type: ignore[operator]
    assert reported["bytes"] + len(MAGIC) == sum(f.stat().st_size for f in files)
    desk = OrderDesk(cfg)  # a restart reads every file, the first one's keys included
    try:
        assert _place(desk, 0, key="k-0") == answers[0]
        assert desk.order(answers[0]["order_id"])["order_id"] == answers[0]["order_id"]  # type: ignore[index]
        assert "bidhive_journal_files" in desk.metrics_text()
        answers.append(_place(desk, 40, key="k-40"))
    finally:
        desk.close()
    received = {rec["order_id"] for rec in read_journal(journal) if rec["type"] == "order_received"}
    assert received == {a["order_id"] for a in answers}  # every file, in order, with no seq gap (the reader checks)
    run = subprocess.run([sys.executable, "-m", "bidhive_cli.main", "replay", str(journal), "--verify", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_an_award_whose_commits_are_refused_is_answered_as_unserved(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Winners that refuse their commits (a crashed bidder, a lost hold): the client never
    hears "awarded" for that round; the order is traded again, and ends unfulfilled
    (`commit_refused`) once out of attempts. The journal rebuilds the same answers."""
    refusals = {"left": 2}
    commit = LocalBidders.settle

    def settle(self: LocalBidders, round_id: int, awards: dict[str, Any], quoted: list[str], now: float) -> Any:
        if not awards or refusals["left"] == 0:
            return commit(self, round_id, awards, quoted, now)
        refusals["left"] -= 1
        return refuse_commits(self, round_id, awards, quoted, now)

    monkeypatch.setattr(LocalBidders, "settle", settle)
    desk = OrderDesk(_cfg(tmp_path / "j.bhj"))  # two attempts per order
    try:
        lost, won = _place(desk, 1), _place(desk, 2)
        details = {a["order_id"]: desk.order(a["order_id"]) for a in (lost, won)}
    finally:
        desk.close()
    assert (lost["status"], lost["reason"], lost["award"]) == ("unfulfilled", "commit_refused", None)
    assert won["status"] == "awarded"
    events = [e["event"] for e in details[lost["order_id"]]["events"]]
    assert events.count("commit_refused") == 2 and "committed" not in events and events[-1] == "unfulfilled"
    rebuilt = OrderIndex()
    for rec in read_journal(tmp_path / "j.bhj"):
        rebuilt.apply(rec)
    assert {oid: rebuilt.orders[oid].detail() for oid in details} == details


def test_a_restart_keeps_keys_and_resumes_orders_that_had_not_ended(tmp_path: Path) -> None:
    journal = tmp_path / "j.bhj"
    desk = OrderDesk(_cfg(journal))
    first = _place(desk, 1, key="before")
    desk.close()
    # a crash after an order was journaled and before its round: write that state by hand
    rec = JournalRecorder(journal)
    rec.run_started({"fleet": desk.fleet_cfg.model_dump(mode="json"), "seed": 0, "max_attempts": 2,
                     "epoch_unix": desk.epoch})
    rec.tag_order("o-crash-1", idempotency_key="mid-flight", body_hash="h-1")
    rec.order_received(Order("o-crash-1", desk.market_now(), "c-9", Tier.REGULAR, "app", (Item("sku-00003", 1),),
                             31.2304, 121.4737, desk.market_now() + 7200, 40.0, Category.AMBIENT, False, 26.0),
                       now=desk.market_now())
    rec.close()
    desk = OrderDesk(_cfg(journal))
    try:
        assert _place(desk, 1, key="before") == first
        resumed = desk.host.core.ledger.orders
        assert "o-crash-1" in resumed
        assert desk.host.wait_idle(30)
        detail = desk.order("o-crash-1")
        assert detail is not None and detail["status"] in ("awarded", "unfulfilled")
        assert [e["segment"] for e in detail["events"] if e["event"] == "received"] == [2, 3]
        with pytest.raises(DeskError) as err:
            desk.place(OrderIn.model_validate(BODY), "other-hash", "mid-flight")
        assert err.value.status == 422
    finally:
        desk.close()


def _physical(desk: OrderDesk) -> dict[str, tuple[Any, ...]]:
    """Per bidder, what it is doing: its committed units, its free capacity, its pending jobs,
    and a warehouse's stock and the stock its holds take."""
    return {a.agent_id: (a.committed_units, a.capacity_free(), len(a._completions),
                         getattr(a, "stock", np.zeros(0)).tolist(), int(getattr(a, "held_stock", np.zeros(0)).sum()))
            for a in desk._agents()}


def test_a_restart_resumes_the_bidders_where_the_stop_left_them(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Bidders in the service's process (`bidders: local`): a clean stop saves them and the
    next start resumes them, riders out and stock sold as they were; a stop that could not
    save leaves a journal that has moved on, and the start after it takes a new fleet."""
    journal = tmp_path / "j.bhj"
    desk = OrderDesk(_cfg(journal))
    assert not desk.fleet_origin.carried and "no fleet saved" in desk.fleet_origin.why
    answers = [_place(desk, i, destination={"lat": 31.2304 + 0.003 * i, "lon": 121.4737}) for i in range(10)]
    assert sum(a["status"] == "awarded" for a in answers) >= 5
    before = _physical(desk)
    desk.close()
    assert (journal.parent / "j.bhj.fleet" / "manifest.json").exists()
    desk = OrderDesk(_cfg(journal))
    try:
        assert desk.fleet_origin.carried, desk.fleet_origin
        assert _physical(desk) == before
        assert all(a.completion_log is None for a in desk._agents())  # no store logs their jobs here
        assert sum(v[0] for v in before.values()) >= 10  # a source and a leg per award
        _place(desk, 99)
    finally:
        monkeypatch.setattr("serve.desk.save_agents", _raises)
        desk.close()  # as a crash would: nothing saved after this run's records
    desk = OrderDesk(_cfg(journal))
    try:
        assert not desk.fleet_origin.carried and "moved on" in desk.fleet_origin.why
        assert all(v[0] == 0 for v in _physical(desk).values())
    finally:
        desk.close()


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=2, max_size=4))
def test_no_commit_is_lost_or_doubled_across_stops_and_starts(tmp_path_factory: pytest.TempPathFactory,
                                                              sessions: list[int]) -> None:
    """Any pattern of stops and starts between orders (`sessions`: the orders of each run):
    the bidders hold each award's two commits exactly once (committed units = 2 x the awards
    so far; nothing is refused or cancelled here), and no bidder is past its capacity."""
    journal = tmp_path_factory.mktemp("restarts") / "j.bhj"
    awarded = 0
    for run, orders in enumerate(sessions):
        desk = OrderDesk(_cfg(journal))
        try:
            assert desk.fleet_origin.carried == (run > 0), desk.fleet_origin
            for i in range(orders):
                answer = _place(desk, 10 * run + i, destination={"lat": 31.2304 + 0.002 * i, "lon": 121.4737})
                awarded += answer["status"] == "awarded"
            agents = desk._agents()
            assert sum(a.committed_units for a in agents) == 2 * awarded
            assert not [v for a in agents for v in capacity_violations(a, desk.market_now())]
        finally:
            desk.close()


def _raises(*_: Any) -> None:
    raise OSError("injected: the disk is full")


def test_a_desk_takes_the_journal_before_it_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica still stopping may append to the journal: the next one reads the journal
    only once it holds the writer's lock, so no record lands after its read."""
    import serve.desk as desk_module
    from market.journal import JournalLocked, JournalWriter

    journal = tmp_path / "j.bhj"
    desk = OrderDesk(_cfg(journal))
    _place(desk, 1, key="before")
    desk.close()
    reads: list[bool] = []
    real = desk_module.rebuild_index

    def watched(path: Path, retain: int | None, hot: int) -> Any:
        with pytest.raises(JournalLocked):  # the desk holds the journal while it reads
            JournalWriter(path).close()
        reads.append(True)
        return real(path, retain, hot)

    monkeypatch.setattr(desk_module, "rebuild_index", watched)
    with JournalWriter(journal):  # the replica still stopping
        with pytest.raises(JournalLocked):
            OrderDesk(_cfg(journal))
    assert reads == []  # refused before reading anything
    desk = OrderDesk(_cfg(journal))
    try:
        assert reads == [True] and _place(desk, 1, key="before")["order_id"] == "o-1-0000001"
    finally:
        desk.close()


def test_a_switch_the_round_loop_cannot_take_is_a_503_and_never_applies(tmp_path: Path) -> None:
    desk = OrderDesk(_cfg(tmp_path / "j.bhj"))
    try:
        go_on = _stall(desk)  # a step that takes its time
        with pytest.raises(DeskError) as err:
            desk.set_profile("time_first", timeout_s=0.2)
        assert err.value.status == 503 and "nothing changed" in err.value.detail and err.value.retry_after_s
        go_on.set()
        assert desk.set_profile("cost_first")["previous"] == "balanced"  # the refused switch never ran
        desk.host.stop()
        with pytest.raises(DeskError) as err:
            desk.set_profile("time_first")
        assert err.value.status == 503 and "not running" in err.value.detail
        assert "bidhive_utilization" not in desk.metrics_text()  # a scrape still answers, without the gauge
    finally:
        desk.close()
    changes = [r["name"] for r in read_journal(tmp_path / "j.bhj") if r["type"] == "profile_changed"]
    assert changes == ["cost_first"]


def test_a_switch_queued_when_the_round_loop_ends_is_a_503_at_once(tmp_path: Path) -> None:
    """A switch waiting for the loop between two steps is told as soon as the loop ends
    without it, not after its whole timeout."""
    desk = OrderDesk(_cfg(tmp_path / "j.bhj"))
    outcome: list[BaseException | dict[str, Any]] = []
    try:
        go_on = _stall(desk)

        def switch() -> None:
            try:
                outcome.append(desk.set_profile("time_first", timeout_s=60))
            except DeskError as err:
                outcome.append(err)
        waiting = threading.Thread(target=switch)
        waiting.start()
        end = time.monotonic() + 10
        while not desk.host._calls and time.monotonic() < end:  # queued behind the stalled step
            time.sleep(0.01)
        desk.host._stop = True  # the loop ends after this step, as at a stop
        started = time.monotonic()
        go_on.set()
        waiting.join(10)
        assert time.monotonic() - started < 5
        assert len(outcome) == 1 and isinstance(outcome[0], DeskError), outcome
        assert outcome[0].status == 503 and "nothing changed" in outcome[0].detail
    finally:
        desk.close()
    assert not [r for r in read_journal(tmp_path / "j.bhj") if r["type"] == "profile_changed"]


def test_a_pending_answer_waits_until_the_order_is_in_the_journal(tmp_path: Path) -> None:
    """A 202 tells the client its order is accepted: `sync` returns only once the round loop
    has journaled the order, and says False when the loop stopped before taking it."""
    journal = tmp_path / "j.bhj"
    desk = OrderDesk(_cfg(journal))
    try:
        go_on = _stall(desk)  # a long round
        placed = desk.place(OrderIn.model_validate(BODY), body_hash(BODY), None)
        synced: list[bool] = []
        waiter = threading.Thread(target=lambda: synced.append(desk.sync(placed.order_id)))
        waiter.start()
        waiter.join(0.3)
        assert synced == [] and not desk.index.knows(placed.order_id)  # not on disk yet: no 202 yet
        go_on.set()
        waiter.join(10)
        assert synced == [True]
        assert placed.order_id in {r.get("order_id") for r in read_journal(journal) if r["type"] == "order_received"}
        go_on = _stall(desk)
        late = desk.place(OrderIn.model_validate({**BODY, "customer_id": "c-2"}), "h-2", None)
        stopping = threading.Thread(target=desk.host.stop)
        stopping.start()
        while not desk.host._stop:  # stopping before the long round ends: the loop takes nothing more in
            time.sleep(0.001)
        go_on.set()
        stopping.join(30)
        assert desk.sync(late.order_id, timeout_s=5) is False  # the loop stopped before taking it in
    finally:
        desk.close()


def test_an_order_not_taken_in_by_the_answers_deadline_is_taken_back(tmp_path: Path) -> None:
    """"Not accepted; retry" must be true: an order still in the inbox when `sync` gives up
    is withdrawn, so it is never traded later (a retry without a key would trade it twice),
    its key is free for the retry, and it no longer counts as open."""
    journal = tmp_path / "j.bhj"
    desk = OrderDesk(_cfg(journal))
    try:
        go_on = _stall(desk)
        body = {**BODY, "customer_id": "c-slow"}
        placed = desk.place(OrderIn.model_validate(body), body_hash(body), "k-slow")
        assert desk.sync(placed.order_id, timeout_s=0.2) is False
        go_on.set()
        retried = _place(desk, 1, key="k-slow", customer_id="c-slow")  # the retry is a new order, not a 409
        assert retried["order_id"] != placed.order_id and retried["status"] in ("awarded", "unfulfilled")
        assert desk.host.wait_idle(30) and desk._open == 0
    finally:
        desk.close()
    received = [r["order_id"] for r in read_journal(journal) if r["type"] == "order_received"]
    assert received == [retried["order_id"]], received


def test_a_generated_id_skips_one_a_client_chose_that_is_not_journaled_yet(tmp_path: Path) -> None:
    desk = OrderDesk(_cfg(tmp_path / "j.bhj"))
    try:
        go_on = _stall(desk)  # the chosen id stays unjournaled
        chosen = desk.place(OrderIn.model_validate({**BODY, "order_id": "o-1-0000001"}), "h-1", None)
        generated = desk.place(OrderIn.model_validate({**BODY, "customer_id": "c-2"}), "h-2", None)
        assert chosen.order_id == "o-1-0000001" and generated.order_id == "o-1-0000002"
    finally:
        go_on.set()
        desk.close()


def test_an_ended_order_is_on_disk_before_a_get_or_a_repeated_key_answers(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The index shows an award as its record is appended; `_ended` syncs just after. An
    answer read in between syncs first, so nobody hears of an award a crash could undo."""
    journal = tmp_path / "j.bhj"
    desk = OrderDesk(_cfg(journal))
    try:
        writer = desk.recorder.writer
        writer.fsync_interval_s = 3600.0
        desk.recorder.flush()  # no sync falls due on an append from now on
        monkeypatch.setattr(desk.recorder, "flush", lambda: None)  # hold `_ended`'s sync: the window stays open
        answer = _place(desk, 1, key="k")
        assert writer.unsynced
        monkeypatch.undo()
        on_disk = {r.get("order_id") for r in read_journal(journal) if r["type"] == "order_received"}
        assert answer["order_id"] not in on_disk  # still in the writer's buffer
        assert desk.order(answer["order_id"])["status"] == answer["status"]  # type: ignore[index]
        assert not writer.unsynced
        assert answer["order_id"] in {r.get("order_id") for r in read_journal(journal) if r["type"] == "order_received"}
        monkeypatch.setattr(desk.recorder, "flush", lambda: None)
        _place(desk, 2)
        assert writer.unsynced
        monkeypatch.undo()
        assert _place(desk, 1, key="k") == answer and not writer.unsynced  # the repeated key's answer, synced
    finally:
        desk.close()


def test_overload_refuses_before_journaling(tmp_path: Path) -> None:
    desk = OrderDesk(_cfg(tmp_path / "j.bhj", max_open_orders=1))
    try:
        desk.host.core.batcher.window_s = 3600.0  # no round closes while we look: the first order stays open
        first = desk.place(OrderIn.model_validate(BODY), body_hash(BODY), "a")
        with pytest.raises(DeskError) as err:
            desk.place(OrderIn.model_validate({**BODY, "customer_id": "c-2"}), "h", "b")
        assert err.value.status == 503 and err.value.retry_after_s
        assert desk.idem.begin("b", "h") is None  # the refused key was freed, not burnt
        assert first.future is not None and not first.future.done()
    finally:
        desk.close()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=12))
def test_one_auction_per_key_whatever_the_order_of_requests(tmp_path_factory: pytest.TempPathFactory,
                                                            keys: list[str]) -> None:
    desk = OrderDesk(_cfg(tmp_path_factory.mktemp("keys") / "j.bhj"))
    try:
        answers = [_place(desk, ord(k), key=k) for k in keys]
    finally:
        desk.close()
    by_key: dict[str, dict[str, Any]] = {}
    for k, a in zip(keys, answers):
        assert by_key.setdefault(k, a) == a
    assert len({a["order_id"] for a in by_key.values()}) == len(by_key) == len(desk.index.orders)


def test_counters_are_reported_at_zero_before_they_happen(tmp_path: Path) -> None:
    desk = OrderDesk(_cfg(tmp_path / "j.bhj"))
    try:
        text = desk.metrics_text()
    finally:
        desk.close()
    for line in ("bidhive_orders_shed_total 0", "bidhive_profile_changes_total 0",
                 'bidhive_bidder_misses_total{why="timed_out"} 0', 'bidhive_bidder_misses_total{why="invalid"} 0',
                 'bidhive_orders_ended_total{reason="",status="awarded"} 0',
                 'bidhive_orders_ended_total{reason="no_capacity",status="unfulfilled"} 0'):
        assert line in text.splitlines(), (line, text)


def test_a_key_sent_again_to_a_dead_desk_is_a_503_not_a_409(tmp_path: Path) -> None:
    """The first request's claim died with the desk: "in flight" would be false (its order
    never ended, and never will there); "retry" is the truth: the keeper's next desk answers."""
    desk = OrderDesk(_cfg(tmp_path / "j.bhj"))
    try:
        go_on = _stall(desk)
        body = {**BODY, "customer_id": "c-dead"}
        desk.place(OrderIn.model_validate(body), body_hash(body), "k-dead")  # the key is claimed
        stopping = threading.Thread(target=desk.host.stop)
        stopping.start()
        go_on.set()
        stopping.join(30)
        assert not desk.host.alive
        with pytest.raises(DeskError) as err:
            desk.place(OrderIn.model_validate(body), body_hash(body), "k-dead")
        assert err.value.status == 503 and err.value.retry_after_s, err.value.detail
    finally:
        desk.close()


def test_a_switch_the_journal_refuses_is_a_503_and_never_goes_live(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A profile in force that the journal does not hold would make replay re-clear the
    next rounds with the wrong weights."""
    desk = OrderDesk(_cfg(tmp_path / "j.bhj"))
    try:
        before = desk.host.call(lambda core: core.engine.profile).result(10)

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(desk.recorder, "profile_changed", refuse)
        with pytest.raises(DeskError) as err:
            desk.set_profile("time_first")
        assert err.value.status == 503 and "unchanged" in err.value.detail and err.value.retry_after_s
        assert desk.host.call(lambda core: core.engine.profile).result(10) is before
    finally:
        desk.close()


def test_the_strategy_in_force_is_the_configured_one_then_the_last_switch(tmp_path: Path) -> None:
    desk = OrderDesk(_cfg(tmp_path / "j.bhj", profile="cost_first"))
    try:
        assert desk.strategy()["profile"] == "cost_first"
        desk.set_profile("vip_guard")
        now = desk.strategy()
    finally:
        desk.close()
    assert now["profile"] == "vip_guard" and "balanced" in now["known"]
