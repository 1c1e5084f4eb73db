"""The CLI as a user runs it: real subprocesses, one-line errors, no tracebacks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "bidhive_cli.main"]


def bidhive(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_simulate_json_is_reproducible() -> None:
    args = ("simulate", "--scenario", "weekday", "--orders", "150", "--seed", "4", "--json", "--no-timing")
    a, b = bidhive(*args), bidhive(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    kpis = json.loads(a.stdout)
    assert kpis["orders"] == 150 and kpis["p50_clear_ms"] is None


def test_simulate_table() -> None:
    out = bidhive("simulate", "--scenario", "weekday", "--orders", "100", "--policy", "static")
    assert out.returncode == 0, out.stderr
    assert "fulfilled_rate" in out.stdout and "static" in out.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (("simulate", "--scenario", "nope"), "unknown scenario 'nope'"),
        (("simulate", "--scenario", "/no/such/file.yaml"), "file not found"),
        (("simulate", "--scenario", "peak", "--orders", "abc"), "Invalid value for '--orders'"),
        (("simulate", "--scenario", "peak", "--orders", "0"), "--orders"),
        (("simulate", "--scenario", "peak", "--policy", "greedy"), "unknown policy 'greedy'"),
        (("simulate", "--scenario", "peak", "--profile", "fastest"), "unknown profile 'fastest'"),
        (("simulate", "--scenario", "peak", "--payment", "third"), "unknown payment rule 'third'"),
        (("simulate", "--scenario", "peak", "--bogus"), "No such option"),
        (("bench", "nope"), "unknown benchmark 'nope'"),
        (("evaluate", "--policy", "README.md"), "README.md is not a policy the rl row can use (not an SB3 zip)"),
        (("train", "--scenario", "peak", "--out", "README.md"), "--out README.md is a file"),
        (("train", "--scenario", "peak", "--out", "x", "--others", "static"), "--others static ignores price"),
        # a run's output where a file stands, or nowhere: refused before any work, not a traceback after it
        (("simulate", "--scenario", "weekday", "--journal", "README.md/x.bhj"), "cannot write the journal"),
        (("simulate", "--scenario", "weekday", "--journal", "docs"), "--journal docs is a folder"),
        (("simulate", "--scenario", "weekday", "--seed", str(2**64)), "--seed"),
        (("replay", "README.md", "--plot", "README.md/kpis.png"), "README.md is a file, not a folder"),
        (("replay", "README.md", "--plot", ".png"), "give the PNG a name"),
        (("replay", "README.md", "--order", "o-1", "--verify"), "--order explains one order"),
        (("train", "--scenario", "peak", "--out", "README.md/run"), "README.md is a file, not a folder"),
        (("train", "--scenario", "peak", "--out", ""), "--out names the run's own folder"),
        (("train", "--scenario", "peak", "--out", "x", "--seed", str(2**32)), "--seed"),
        (("train", "--scenario", "peak", "--out", "x", "--fleet", "nope"), "unknown fleet 'nope'"),
        (("train", "--scenario", "peak", "--out", "x", "--peers", "rl:README.md"), "not a policy the rl row can use"),
        (("train", "--scenario", "peak", "--out", "x", "--journal", "README.md"), "README.md is not a bidhive journal"),
        (("train", "--scenario", "peak", "--out", "x", "--journal", "docs"), "--journal docs: a folder"),
        (("evaluate", "--policy", "docs"), "--policy docs is a folder"),
        (("evaluate", "--policy", "policies/pretrained/peak/policy.zip", "--plot", "README.md/c.png"),
         "README.md is a file, not a folder"),
        (("evaluate", "--policy", "policies/pretrained/peak/policy.zip", "--rows", ","), "--rows names no row"),
        # an empty value is a mistake, not the default
        (("simulate", "--scenario", "weekday", "--profile", ""), "unknown profile ''"),
        (("simulate", "--scenario", "weekday", "--payment", ""), "unknown payment rule ''"),
        (("evaluate", "--policy", "policies/pretrained/peak/policy.zip", "--scenario", ""), "unknown scenario ''"),
    ],
)
def test_bad_input_is_one_readable_line(args: tuple[str, ...], expected: str) -> None:
    out = bidhive(*args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr


def test_a_run_that_fails_before_its_first_record_leaves_no_journal(tmp_path: Path) -> None:
    """The file would only block the retry (a journal holds one run); one with records stays."""
    from bidhive_cli.main import _journal_recorder, _no_empty_journal

    for fail_after_record, in_process in ((False, True), (True, True), (False, False), (True, False)):
        path = tmp_path / f"j-{fail_after_record}-{in_process}.bhj"
        recorder = _journal_recorder(path, in_process=in_process)
        with pytest.raises(RuntimeError), _no_empty_journal(recorder, path):
            if fail_after_record:
                journal = recorder.journal if in_process else recorder
                journal.writer.append("run_started", shell="test")
            raise RuntimeError("the run failed")
        assert path.exists() == fail_after_record


def test_an_empty_journal_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty.bhj").write_bytes(b"")
    out = bidhive("replay", str(tmp_path / "empty.bhj"))
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"bidhive: {tmp_path / 'empty.bhj'}: empty (no journal header): nothing to replay"], out.stderr


def test_bench_clearing_quick_prints_json() -> None:
    out = bidhive("bench", "clearing", "--quick")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["benchmark"] == "clearing" and len(result["clear"]) == 9


def test_bench_snapshot_quick_saves_and_resumes_a_killed_fleet() -> None:
    """The bench's stop-and-start runs check their own outcome (every bidder carried)."""
    out = bidhive("bench", "snapshot", "--quick")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    killed = result["killed_and_started_by_pending_jobs"]
    assert set(killed) == {"0", "500"} and all(r["bidders"] == 25 and r["start_rescue_ms"] > 0 for r in killed.values())
    assert result["leftovers"]["process_scan_ms"] > 0


def test_sigterm_inside_a_command_raises_and_ends_with_143_and_the_handler_comes_back() -> None:
    """Python's default SIGTERM ends the process on the spot, skipping the command's clean-up;
    inside `exit_143_when_terminated` it raises and the command ends with 143. A handler
    someone else installed is left alone, in the block and after it."""
    import os
    import signal

    import typer

    from bidhive_cli.errors import exit_143_when_terminated
    from runtime.local_ray import raise_terminated

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    cleaned = []
    try:
        with pytest.raises(typer.Exit) as stopped, exit_143_when_terminated():
            try:
                assert signal.getsignal(signal.SIGTERM) is raise_terminated
                os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before the next line
                pytest.fail("SIGTERM did not raise")
            finally:
                cleaned.append(True)
        assert stopped.value.exit_code == 143 and cleaned == [True]
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

        def theirs(signum: int, frame: object) -> None:
            """Someone else's handler."""

        signal.signal(signal.SIGTERM, theirs)
        with exit_143_when_terminated():
            assert signal.getsignal(signal.SIGTERM) is theirs
        assert signal.getsignal(signal.SIGTERM) is theirs
    finally:
        signal.signal(signal.SIGTERM, before)
