"""What a run killed outright leaves (`runtime.owner`, `runtime.leftovers`): the next start
clears a dead run's dirs and the processes holding them, and never a live run's. No Ray: the
"orphans" are plain processes holding a file in the dir, as Ray's agents hold their logs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.leftovers import RAY_OWNER, RAY_TEMP_PREFIX, claim_dead_dirs, holders, reap_dead_ray_sessions
from runtime.owner import pid_namespace, process_start, read_owner, write_owner

HOLD = "import sys, time; f = open(sys.argv[1], 'a'); print('ready', flush=True); time.sleep(600)"


def _dead_pid() -> tuple[int, int]:
    """A pid and start time of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = process_start(proc.pid)
    assert started is not None
    proc.kill()
    proc.wait()
    return proc.pid, started


def _owned_by(directory: Path, pid: int, started: int, name: str = RAY_OWNER) -> None:
    (directory / name).write_text(json.dumps({"pid": pid, "started": started, "namespace": pid_namespace()}))


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A session dir with a process holding a log file in it (and a child of that process)."""
    session = tmp_path / f"{RAY_TEMP_PREFIX}dead"
    (session / "logs").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(session / "logs" / "agent.log")],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield session, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_an_owner_is_dead_once_its_pid_is_gone_or_names_another_process(tmp_path: Path) -> None:
    write_owner(tmp_path, "owner.json", journal="j.bhj")
    me = read_owner(tmp_path, "owner.json")
    assert me is not None and me.pid == os.getpid() and me.facts == {"journal": "j.bhj"}
    assert not me.dead()
    _owned_by(tmp_path, os.getpid(), me.started + 1)  # our pid, another start: a reused pid
    assert read_owner(tmp_path, RAY_OWNER).dead()  # type: ignore[union-attr]
    _owned_by(tmp_path, *_dead_pid())
    assert read_owner(tmp_path, RAY_OWNER).dead()  # type: ignore[union-attr]
    (tmp_path / RAY_OWNER).write_text(json.dumps({"pid": 1, "started": 1, "namespace": "pid:[other]"}))
    assert not read_owner(tmp_path, RAY_OWNER).dead()  # type: ignore[union-attr] - not ours to judge
    (tmp_path / RAY_OWNER).write_text("{")
    assert read_owner(tmp_path, RAY_OWNER) is None


def test_holders_finds_the_processes_with_a_file_open_in_a_dir(holder: tuple[Path, subprocess.Popen[str]],
                                                               tmp_path: Path) -> None:
    session, proc = holder
    assert proc.pid in holders(session)
    assert proc.pid not in holders(tmp_path / "elsewhere")


def test_a_dead_drivers_session_is_cleared_with_its_orphans(holder: tuple[Path, subprocess.Popen[str]]) -> None:
    session, proc = holder
    _owned_by(session, *_dead_pid())
    assert reap_dead_ray_sessions(session.parent, grace_s=5.0) == [session.name]
    assert proc.wait(timeout=5) != 0  # stopped by the reaper
    assert not any(session.parent.iterdir())


@pytest.mark.parametrize("owner", ["alive", "none", "other_namespace"])
def test_a_session_whose_owner_is_alive_or_unknown_is_left_alone(
        holder: tuple[Path, subprocess.Popen[str]], owner: str) -> None:
    session, proc = holder
    if owner == "alive":
        write_owner(session, RAY_OWNER)
    elif owner == "other_namespace":
        pid, started = _dead_pid()
        (session / RAY_OWNER).write_text(json.dumps({"pid": pid, "started": started, "namespace": "pid:[1]"}))
    assert reap_dead_ray_sessions(session.parent) == []
    time.sleep(0.2)
    assert proc.poll() is None and (session / "logs" / "agent.log").exists()


def test_a_claimed_dead_dir_is_not_claimed_again(tmp_path: Path) -> None:
    """A start renames each dead dir it clears, so another start's look finds none of them."""
    for name in ("bidhive-ray-a", "bidhive-ray-b"):
        (tmp_path / name).mkdir()
        _owned_by(tmp_path / name, *_dead_pid())
    claimed = [path.name for path, _ in claim_dead_dirs(tmp_path, RAY_TEMP_PREFIX, RAY_OWNER)]
    assert claimed == [f"bidhive-ray-a.dead-{os.getpid()}", f"bidhive-ray-b.dead-{os.getpid()}"]
    assert list(claim_dead_dirs(tmp_path, RAY_TEMP_PREFIX, RAY_OWNER)) == []
