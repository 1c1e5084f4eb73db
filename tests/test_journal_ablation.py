"""The in-place journal benchmark's estimator: its two arms must trade the very same day."""
from __future__ import annotations

from pathlib import Path

from bench.journal_ablation import CHUNK_ROUNDS, _turns
from bench.replay_bench import overhead_day
from market.journal_recorder import JournalRecorder
from market.recorder import NullRecorder
from market.replay import verify


def test_turns_run_both_arms_through_the_same_rounds_to_the_end(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    null_sim, journaled = overhead_day(NullRecorder(), 150, 3), overhead_day(JournalRecorder(path), 150, 3)
    spent = _turns({"null": null_sim.rounds(), "journal": journaled.rounds()})
    assert spent["null"] > 0 and spent["journal"] > 0
    assert null_sim.engine.kpis.rounds > 2 * CHUNK_ROUNDS  # several turns each, so the arms did alternate
    assert null_sim.report(timing=False) == journaled.report(timing=False)
    assert verify(path) is None  # the journaled arm ran to its end and closed a journal that re-clears
