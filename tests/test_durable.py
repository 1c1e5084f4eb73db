"""A bidder's durable state: snapshot plus completion log restores exactly what the agent had."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents import durable
from agents.actor import AgentSpec, fleet_specs
from agents.base import Agent
from agents.durable import CommitMemory, SnapshotStore, freeze, thaw
from market.config import load_fleet

SPEC = fleet_specs(load_fleet("default"), 7, "heuristic")[0]  # a warehouse: a job is (on_time, skus, quantities)

JOB, LATE_JOB = (True, (), ()), (False, (), ())

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.floats(0.0, 500.0, allow_nan=False), st.booleans()),
        st.tuples(st.just("advance"), st.floats(0.0, 500.0, allow_nan=False)),  # time may go back: exactness still holds
        st.tuples(st.just("cancel"), st.integers(0, 50)),  # a pending job's line cancelled (its partner refused)
        st.tuples(st.just("save")),
        st.tuples(st.just("torn_save")),
    ),
    max_size=80,
)


def _state(agent: Agent) -> tuple[bytes, list[Any], dict[tuple[int, int], int]]:
    """The agent's state as bytes, its pending jobs in pop order (heap layouts may differ),
    and the bookings of those jobs (a booking of a job that ended can undo nothing)."""
    _, state = freeze(agent)
    rest = {k: state[k] for k in sorted(state) if k not in ("_completions", "_booked")}
    pending = {job[1] for job in state["_completions"]}
    return pickle.dumps(rest), sorted(state["_completions"]), {
        line: seq for line, seq in state["_booked"].items() if seq in pending}


def _logs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.log"))


def _restored(directory: Path, spec: AgentSpec = SPEC) -> Agent:
    snap = SnapshotStore(directory, spec.agent_id).load()
    return thaw(snap["agent"], spec.env(), spec.agent)


class _Torn(Exception):
    pass


def _torn_save(store: SnapshotStore, agent: Agent) -> None:
    """A save whose log append happens and whose snapshot is never written (a crash between)."""
    def crash(_: dict[str, Any]) -> None:
        raise _Torn

    with pytest.MonkeyPatch.context() as m:
        m.setattr(store, "_replace", crash)
        with pytest.raises(_Torn):
            store.save({"version": 0}, agent)


@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_a_restart_gets_the_state_of_the_last_save(ops: list[tuple[Any, ...]],
                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """Jobs added, finished and cancelled in any order, saves between (some torn by a crash), logs
    compacted along the way: loading gives the agent exactly as it was at the last completed save."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(durable, "MIN_COMPACT_CHANGES", 6)
        m.setattr(durable, "COMPACT_RATIO", 1)
        _check_restarts(ops, tmp_path_factory.mktemp("durable"))


def _check_restarts(ops: list[tuple[Any, ...]], directory: Path) -> None:
    agent, store = SPEC.build(), SnapshotStore(directory, SPEC.agent_id)
    saved = None
    for op in ops:
        if op[0] == "push":  # a committed line: its job, booked as round 0's order `seq`
            agent.schedule_completion(op[1], (op[2], (), ()))
            agent.book((0, agent._completion_seq), agent._completion_seq)
        elif op[0] == "advance":
            agent.advance(op[1])
        elif op[0] == "cancel":
            if agent._completions:
                done_s, seq, _ = sorted(agent._completions)[op[1] % len(agent._completions)]
                assert agent.cancel(0, [seq], agent.now_s) == int(done_s > agent.now_s)  # an ended job stays ended
        elif op[0] == "save":
            store.save({"version": 0}, agent)
            saved = _state(agent)
        elif saved is not None:
            _torn_save(store, agent)
        if saved is not None:
            assert _state(_restored(directory)) == saved
    store.close()


def test_the_log_is_compacted_into_a_new_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past its share of changes, a save starts a new log with the whole heap, and the old log goes."""
    monkeypatch.setattr(durable, "MIN_COMPACT_CHANGES", 10)
    monkeypatch.setattr(durable, "COMPACT_RATIO", 0)
    agent, store = SPEC.build(), SnapshotStore(tmp_path, SPEC.agent_id)
    store.save({}, agent)
    assert _logs(tmp_path) == [f"{SPEC.agent_id}.1.log"]
    for k in range(12):  # 12 jobs added, one per save: the 12th save finds 11 > 10 changes logged
        agent.schedule_completion(1000.0 + k, JOB)
        store.save({}, agent)
    assert _logs(tmp_path) == [f"{SPEC.agent_id}.2.log"]
    log = tmp_path / f"{SPEC.agent_id}.2.log"
    assert durable._read_changes(log, log.stat().st_size) == agent._completions  # one frame: the whole heap
    assert sorted(_restored(tmp_path)._completions) == sorted(agent._completions)
    store.close()


def _two_saves(directory: Path) -> SnapshotStore:
    """A closed store of two saves: ``{"n": 1}`` with no job pending, then ``{"n": 2}`` with one."""
    agent, store = SPEC.build(), SnapshotStore(directory, SPEC.agent_id)
    store.save({"n": 1}, agent)
    agent.schedule_completion(10.0, JOB)
    store.save({"n": 2}, agent)
    store.close()
    return store


def test_a_restarted_store_starts_a_new_generation(tmp_path: Path) -> None:
    """The process after a restart never appends to the log its predecessor left."""
    _two_saves(tmp_path)
    again = SnapshotStore(tmp_path, SPEC.agent_id)
    restored = thaw(again.load()["agent"], SPEC.env(), SPEC.agent)
    assert restored._completions == [(10.0, 1, JOB)] and restored.completion_log is None
    restored.schedule_completion(20.0, LATE_JOB)
    again.save({}, restored)
    assert _logs(tmp_path) == [f"{SPEC.agent_id}.2.log"]
    assert sorted(_restored(tmp_path)._completions) == [(10.0, 1, JOB), (20.0, 2, LATE_JOB)]
    again.close()


def test_a_save_cut_short_leaves_the_one_before(tmp_path: Path) -> None:
    """A slot torn at any length (the process killed mid-write) fails its check: the other slot wins."""
    store = _two_saves(tmp_path)
    newest = 0  # saves take turns from slot 1: the second went to slot 0
    whole = store.slot_path(newest).read_bytes()
    for cut in (0, 10, 40, len(whole) // 2, len(whole) - 1):
        store.slot_path(newest).write_bytes(whole[:cut])
        snap = SnapshotStore(tmp_path, SPEC.agent_id).load()
        assert snap["n"] == 1 and snap["agent"][1]["_completions"] == []
    flipped = bytearray(whole)
    flipped[-3] ^= 0xFF
    store.slot_path(newest).write_bytes(bytes(flipped))
    assert SnapshotStore(tmp_path, SPEC.agent_id).load()["n"] == 1
    store.slot_path(newest).write_bytes(whole)
    assert SnapshotStore(tmp_path, SPEC.agent_id).load()["n"] == 2


def test_a_snapshot_naming_log_bytes_that_are_gone_is_unreadable(tmp_path: Path) -> None:
    _two_saves(tmp_path)
    (tmp_path / f"{SPEC.agent_id}.1.log").write_bytes(b"")
    with pytest.raises(ValueError, match="holds 0 of the"):
        SnapshotStore(tmp_path, SPEC.agent_id).load()


def test_commit_memory_answers_the_latest_outcome_of_its_last_rounds() -> None:
    memory = CommitMemory(4)
    for round_id, ok in [(1, True), (2, False), (3, True), (2, True)]:
        memory[round_id] = ok
    assert [memory.get(r) for r in (1, 2, 3, 9)] == [True, True, True, None]
    memory[5] = False  # the fifth outcome takes the oldest slot, round 1's
    assert memory.get(1) is None and memory.get(5) is False and len(memory) == 4
    assert pickle.loads(pickle.dumps(memory)).get(2) is True
    again = pickle.loads(pickle.dumps(memory))
    again[6], again[7] = True, False  # restored arrays are writable, and the ring goes on where it was
    assert [again.get(r) for r in (2, 3, 5, 6, 7)] == [True, None, False, True, False]


@pytest.mark.parametrize("array", [
    np.arange(7, dtype=np.int64), np.array([True, False, True]), np.linspace(0.0, 1.0, 6).reshape(2, 3),
    np.zeros(0, dtype=np.float32), np.array(3.5), np.array(["a", "bc"]),
])
def test_an_agent_array_comes_back_equal_and_writable(array: np.ndarray) -> None:
    """`freeze` stores arrays as raw bytes: same dtype, shape and values, and the agent may write to them."""
    agent = SPEC.build()
    agent.stock = array
    restored = thaw(pickle.loads(pickle.dumps(freeze(agent))), SPEC.env(), SPEC.agent)
    got = restored.stock
    assert type(got) is np.ndarray and got.dtype == array.dtype and got.shape == array.shape
    assert np.array_equal(got, array) and got.flags.writeable


def test_an_object_array_is_pickled_as_it_is() -> None:
    agent = SPEC.build()
    agent.stock = np.array([{"a": 1}, None], dtype=object)
    _, state = freeze(agent)
    assert state["stock"] is agent.stock


def test_a_restored_random_generator_draws_what_the_original_would() -> None:
    agent = SPEC.build()
    agent.rng.random(5)  # somewhere mid-stream
    restored = thaw(pickle.loads(pickle.dumps(freeze(agent))), SPEC.env(), SPEC.agent)
    assert np.array_equal(restored.rng.random(100), agent.rng.random(100))
    assert restored.rng.integers(0, 10**9) == agent.rng.integers(0, 10**9)
