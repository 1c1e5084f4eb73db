"""What a run killed outright leaves (`runtime.owner`, `runtime.leftovers`): the next start
clears a dead run's dirs and the processes of its cluster, and never a live run's, nor a
process that merely has a file open there. No Ray: the "orphans" are plain processes
carrying the session's marker in their environment, as every process of a cluster does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runtime.leftovers import (
    AUTH_TOKEN_FILE, RAY_OWNER, RAY_TEMP_PREFIX, SESSION_ENV, claim_dead_dirs, reap_dead_ray_sessions,
)
from runtime.owner import process_start, read_owner, where_pids_mean, write_owner
from tests.factories import dead_owner

# a process holding a log file in the dir; named as Ray names its workers (`ray::...`) unless told not to
HOLD = ("import ctypes, sys, time; f = open(sys.argv[1], 'a')\n"
        "if sys.argv[2]: ctypes.CDLL(None).prctl(15, sys.argv[2].encode(), 0, 0, 0)\n"
        "print('ready', flush=True); time.sleep(600)")
Spawn = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def session(tmp_path: Path) -> Path:
    """An embedded cluster's temp dir, open to everyone as Ray leaves it (mode 0777)."""
    path = tmp_path / f"{RAY_TEMP_PREFIX}x"
    (path / "logs").mkdir(parents=True)
    path.chmod(0o777)
    return path


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Starts processes holding a log file in a dir, `marked` as the cluster's processes are
    (`session`: the dir in their environment; `token`: the auth token's path in it, as
    Ray's agents have it; None: not at all) and called `name` (empty: as Python names
    them); kills what is left at the end."""
    procs: list[subprocess.Popen[str]] = []

    def start(directory: Path, marked: str | None = "session", name: str = "ray::Orphan") -> subprocess.Popen[str]:
        markers = {"session": {SESSION_ENV: str(directory)},
                   "token": {"RAY_AUTH_TOKEN_PATH": str(directory / AUTH_TOKEN_FILE)}}
        env = {**os.environ, **markers.get(marked or "", {})}
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory / "logs" / f"p{len(procs)}.log"), name],
                                stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_an_owner_is_dead_once_its_pid_is_gone_or_names_another_process(tmp_path: Path) -> None:
    write_owner(tmp_path, "owner.json", journal="j.bhj")
    me = read_owner(tmp_path, "owner.json")
    assert me is not None and me.pid == os.getpid() and me.facts == {"journal": "j.bhj"}
    assert not me.dead()
    dead_owner(tmp_path, RAY_OWNER)
    assert read_owner(tmp_path, RAY_OWNER).dead()  # type: ignore[union-attr]
    service = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = process_start(service.pid)
    assert started is not None
    write_owner(tmp_path, RAY_OWNER, (service.pid, started))  # the dir belongs to another live process
    assert read_owner(tmp_path, RAY_OWNER).pid == service.pid  # type: ignore[union-attr]
    service.kill()
    service.wait()
    assert read_owner(tmp_path, RAY_OWNER).dead()  # type: ignore[union-attr] - it exited
    write_owner(tmp_path, RAY_OWNER, (service.pid, started))  # named, but not running: not taken
    assert read_owner(tmp_path, RAY_OWNER).pid == os.getpid()  # type: ignore[union-attr]
    noted = {"pid": 1, "started": 1, "where": "other-host/boot/pid:[1]", "dir": tmp_path.name}
    (tmp_path / RAY_OWNER).write_text(json.dumps(noted))
    assert not read_owner(tmp_path, RAY_OWNER).dead()  # type: ignore[union-attr] - not ours to judge
    (tmp_path / RAY_OWNER).write_text(json.dumps({**noted, "started": None, "where": where_pids_mean()}))
    assert read_owner(tmp_path, RAY_OWNER) is None  # noted where /proc could not be trusted
    (tmp_path / RAY_OWNER).write_text("{")
    assert read_owner(tmp_path, RAY_OWNER) is None


def test_a_dead_drivers_session_is_cleared_with_its_processes(session: Path, spawn: Spawn) -> None:
    dead_owner(session, RAY_OWNER)
    # marked as workers are, as the agents may be, and not at all (an agent whose new name
    # overwrote the environment /proc shows): each holds a log file in the dir
    orphans = [spawn(session), spawn(session, marked="token"), spawn(session, marked=None)]
    assert reap_dead_ray_sessions(session.parent, grace_s=5.0) == [session.name]
    assert all(proc.wait(timeout=5) != 0 for proc in orphans)  # stopped by the reaper
    assert not any(session.parent.iterdir())


def test_a_process_that_is_not_the_clusters_is_left_running(session: Path, spawn: Spawn) -> None:
    """A user's shell or `tail -f` in the dead session's logs is not one of its processes,
    nor is a program its driver started (it inherited the marker but is not Ray's)."""
    dead_owner(session, RAY_OWNER)
    reader, child, orphan = spawn(session, marked=None, name=""), spawn(session, name=""), spawn(session)
    assert reap_dead_ray_sessions(session.parent, grace_s=5.0) == [session.name]
    assert orphan.wait(timeout=5) != 0
    time.sleep(0.2)
    assert reader.poll() is None and child.poll() is None


@pytest.mark.parametrize("owner", ["alive", "none", "elsewhere", "another_users", "another_dirs", "a_link"])
def test_a_session_that_is_not_certainly_a_dead_runs_is_left_alone(session: Path, spawn: Spawn,
                                                                    owner: str) -> None:
    (write_owner if owner == "alive" else dead_owner)(session, RAY_OWNER)
    if owner == "none":
        (session / RAY_OWNER).unlink()
    elif owner in ("elsewhere", "another_dirs"):  # another host or namespace; a file moved here
        record = json.loads((session / RAY_OWNER).read_text())
        changed = {"where": "other-host/boot/pid:[1]"} if owner == "elsewhere" else {"dir": "bidhive-ray-dead"}
        (session / RAY_OWNER).write_text(json.dumps({**record, **changed}))
    elif owner == "another_users":  # planted in a dir Ray opens to everyone
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user takes root")
        os.chown(session / RAY_OWNER, 65534, 65534)
    proc = spawn(session)
    if owner == "a_link":
        session = session.rename(session.with_name("real"))
        session.with_name(f"{RAY_TEMP_PREFIX}x").symlink_to(session)
    assert reap_dead_ray_sessions(session.parent) == []
    time.sleep(0.2)
    assert proc.poll() is None and (session / "logs").exists()


def test_a_claimed_dead_dir_is_not_claimed_again_while_its_claimer_lives(tmp_path: Path) -> None:
    """A start renames each dead dir it clears, so another start's look finds none of them,
    until the claimer itself is gone (killed part way): then the dir is claimed again."""
    for name in ("bidhive-ray-a", "bidhive-ray-b"):
        (tmp_path / name).mkdir(mode=0o700)
        dead_owner(tmp_path / name, RAY_OWNER)
    claimed = [path.name for path, _, _ in claim_dead_dirs(tmp_path, RAY_TEMP_PREFIX, RAY_OWNER)]
    assert claimed == [f"bidhive-ray-a.dead-{os.getpid()}", f"bidhive-ray-b.dead-{os.getpid()}"]
    assert list(claim_dead_dirs(tmp_path, RAY_TEMP_PREFIX, RAY_OWNER)) == []
    (tmp_path / claimed[0]).rename(tmp_path / "bidhive-ray-a.dead-999999999")  # its claimer is gone
    again = [(path.name, name) for path, _, name in claim_dead_dirs(tmp_path, RAY_TEMP_PREFIX, RAY_OWNER)]
    assert again == [(f"bidhive-ray-a.dead-{os.getpid()}", "bidhive-ray-a")]
