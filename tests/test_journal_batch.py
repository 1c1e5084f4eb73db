"""The journal written in bursts (`BatchedRecorder`) is the journal written at once."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from market.config import load_profile, load_scenario
from market.engine import LocalBidders
from market.journal import TornTailWarning, read_journal
from market.journal_batch import BatchedRecorder
from market.journal_recorder import JournalRecorder
from market.recorder import Recorder
from market.replay import replay
from market.simulator import SimSetup, Simulator
from policies.registry import make_policy
from bench.replay_bench import HookTape
from tests.factories import REPO, cli_env, refuse_commits


class RefusingBidders(LocalBidders):
    """Winners refuse the commits of every third round with awards: the engine then takes
    awards back after the journal was told of the round's allocation."""

    def __init__(self, agents: Any, strategy: Any) -> None:
        super().__init__(agents, strategy)
        self.award_rounds = 0

    def settle(self, round_id: int, awards: dict[str, Any], quoted: list[str], now: float) -> set[int] | None:
        self.award_rounds += bool(awards)
        if not awards or self.award_rounds % 3:
            return super().settle(round_id, awards, quoted, now)
        return refuse_commits(self, round_id, awards, quoted, now)


def _journal(path: Path, burst_calls: int | None, scenario: str, seed: int, n_orders: int, *,
             policy: str = "heuristic", payment: str | None = None, refusing: bool = False,
             switch_at: int | None = None) -> bytes:
    """One seeded run's journal bytes: written at once (``burst_calls`` None) or in bursts."""
    sc = load_scenario(scenario)
    rule = payment or sc.payment
    journal = JournalRecorder(path, timing=False)
    recorder: Recorder = journal if burst_calls is None else BatchedRecorder(journal, burst_calls)
    setup = SimSetup.build(sc, make_policy(policy, rule), seed=seed, n_orders=n_orders, recorder=recorder)
    bidders = (lambda fleet, pol: RefusingBidders(fleet.agents, pol.strategy)) if refusing else None
    sim = Simulator(setup, bidders=bidders)
    for k, _ in enumerate(sim.rounds()):
        if k == switch_at:  # an operator's live switch, between two rounds
            sim.engine.profile = load_profile("time_first")
            recorder.profile_changed("time_first", sim.now)
    recorder.close()
    return path.read_bytes()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(burst_calls=st.sampled_from([1, 2, 7, 64, 320, 10_000]), seed=st.integers(0, 2**16),
       scenario=st.sampled_from(["weekday", "peak"]), payment=st.sampled_from(["first_score", "second_score"]))
def test_a_journal_in_bursts_is_byte_identical(tmp_path: Path, burst_calls: int, seed: int, scenario: str,
                                               payment: str) -> None:
    at_once = _journal(tmp_path / f"a-{seed}.bhj", None, scenario, seed, 150, payment=payment)
    in_bursts = _journal(tmp_path / f"b-{seed}.bhj", burst_calls, scenario, seed, 150, payment=payment)
    assert in_bursts == at_once


@pytest.mark.parametrize("kind", ["refused_commits", "profile_switch", "static_policy"])
def test_runs_that_change_course_journal_the_same_in_bursts(tmp_path: Path, kind: str) -> None:
    """Refused commits (the engine takes awards back after journaling the round), a live
    profile switch, and a policy that quotes every bidder: the same bytes, and they verify."""
    opts: dict[str, Any] = {"refusing": kind == "refused_commits", "switch_at": 40 if kind == "profile_switch" else None,
                            "policy": "static" if kind == "static_policy" else "heuristic"}
    at_once = _journal(tmp_path / "a.bhj", None, "weekday", 5, 400, **opts)
    in_bursts = _journal(tmp_path / "b.bhj", 64, "weekday", 5, 400, **opts)
    assert in_bursts == at_once
    records = list(read_journal(tmp_path / "b.bhj"))
    if kind == "refused_commits":
        assert any("refused" in r for r in records if r["type"] == "hold_released")
    if kind == "profile_switch":
        assert any(r["type"] == "profile_changed" for r in records)
    report = replay(tmp_path / "b.bhj")
    assert report.ok, report.first_mismatch


def test_a_failed_burst_raises_from_its_hook_and_writes_nothing_after_the_failure(tmp_path: Path) -> None:
    """The fifth round's opening fails (a full disk): the records before it are in the file,
    nothing after it is, and the journal is closed all the same."""
    path = tmp_path / "fail.bhj"
    journal = JournalRecorder(path, timing=False)
    recorder = BatchedRecorder(journal, burst_calls=10_000)
    sim = Simulator(SimSetup.build(load_scenario("weekday"), make_policy("heuristic"), seed=2, n_orders=100,
                                   recorder=recorder))
    real_round_opened, opened = journal.round_opened, []

    def fails_on_the_fifth(rnd: Any, attempts: list[int]) -> None:
        opened.append(rnd.round_id)
        if len(opened) == 5:
            raise OSError(28, "No space left on device")
        real_round_opened(rnd, attempts)

    journal.round_opened = fails_on_the_fifth  # type: ignore[method-assign]
    steps = sim.rounds()
    for _ in range(20):
        next(steps)
    with pytest.raises(OSError, match="No space left"):
        recorder.close()
    assert journal.writer.closed and len(opened) == 5
    records = list(read_journal(path))
    assert [r["round_id"] for r in records if r["type"] == "round_opened"] == opened[:4]
    assert max(r["round_id"] for r in records if "round_id" in r) == opened[3]
    assert records[-1]["type"] == "order_received"  # the fifth round's orders came before its opening


@pytest.mark.parametrize("when", ["before_its_record", "after_its_record"])
def test_ctrl_c_in_a_burst_leaves_the_rest_for_close(tmp_path: Path, when: str) -> None:
    """Ctrl-C or SIGTERM lands in a burst, before or after the interrupted call wrote its
    record: close writes every call not yet written, once, so nothing is lost or doubled."""
    tape = HookTape()
    Simulator(SimSetup.build(load_scenario("weekday"), make_policy("heuristic"), seed=6, n_orders=200,
                             recorder=tape)).run()  # type: ignore[arg-type]
    at_once = JournalRecorder(tmp_path / "a.bhj", timing=False)
    tape.play(at_once)
    at_once.close()
    journal = JournalRecorder(tmp_path / "b.bhj", timing=False)
    real, cleared = journal.round_cleared, []

    def interrupted_once(*args: Any) -> None:
        cleared.append(args[0].round_id)
        if len(cleared) == 10 and when == "before_its_record":
            raise KeyboardInterrupt
        real(*args)
        if len(cleared) == 10:
            raise KeyboardInterrupt

    journal.round_cleared = interrupted_once  # type: ignore[method-assign]
    recorder, interrupts = BatchedRecorder(journal, burst_calls=64), 0
    for hook, args, kwargs in tape.calls:
        try:
            getattr(recorder, hook)(*args, **kwargs)
        except KeyboardInterrupt:
            interrupts += 1
    recorder.close()
    assert interrupts == 1
    assert (tmp_path / "b.bhj").read_bytes() == (tmp_path / "a.bhj").read_bytes()


def test_burst_calls_below_one_is_refused(tmp_path: Path) -> None:
    with JournalRecorder(tmp_path / "x.bhj") as journal, pytest.raises(ValueError, match="at least 1"):
        BatchedRecorder(journal, burst_calls=0)


def _simulate_until(path: Path, journal_bytes: int) -> subprocess.Popen[str]:
    """`bidhive simulate --journal path` on a long day, once its journal holds that many bytes."""
    proc = subprocess.Popen([sys.executable, "-m", "bidhive_cli.main", "simulate", "--scenario", "weekday",
                             "--orders", "200000", "--journal", str(path), "--json"],
                            cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while (not path.exists() or path.stat().st_size < journal_bytes) and time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"simulate ended early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    return proc


def _verified_rounds(path: Path) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TornTailWarning)
        report = replay(path)
    assert report.ok, report.first_mismatch
    assert report.verified_rounds == report.rounds
    return report.rounds


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_simulate_stopped_mid_run_leaves_a_journal_that_replays_and_verifies(tmp_path: Path, sig: int) -> None:
    """SIGKILL runs no clean-up: the burst in hand is lost with the process, and what reached
    the file is a complete prefix (at most a torn last frame). SIGTERM writes the burst in
    hand and ends with 143 and one line."""
    path = tmp_path / "stopped.bhj"
    proc = _simulate_until(path, 400_000)
    try:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 143), err
    if sig == signal.SIGTERM:
        assert err.strip().splitlines() == ["bidhive: terminated"], err
    assert _verified_rounds(path) > 100


def test_close_writes_the_calls_in_hand(tmp_path: Path) -> None:
    path = tmp_path / "closed.bhj"
    recorder = BatchedRecorder(JournalRecorder(path, timing=False), burst_calls=10_000)
    steps = Simulator(SimSetup.build(load_scenario("weekday"), make_policy("heuristic"), seed=4, n_orders=100,
                                     recorder=recorder)).rounds()
    for _ in range(21):  # the 21st step trades the 20th round
        next(steps)
    assert recorder.journal.writer.next_seq == 1  # run_started only
    recorder.close()
    cleared = [r for r in read_journal(path) if r["type"] == "round_cleared"]
    assert len(cleared) == 20 and _verified_rounds(path) == 20
