"""The CLI as a user runs it: real subprocesses, one-line errors, no tracebacks."""
from __future__ import annotations

import json
import subprocess
import sys

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
    ],
)
def test_bad_input_is_one_readable_line(args: tuple[str, ...], expected: str) -> None:
    out = bidhive(*args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr


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
