"""What a run killed outright left behind, found and cleared by the next start.

A `bidhive serve` (or any embedded cluster's driver) killed with SIGKILL runs none of its
clean-up: Ray's GCS and raylet go with it, but Ray 2.60's dashboard and runtime-env agents
live on as orphans, a replica can outlive it for a few seconds (holding the journal's
lock), and the session's temp dir (with its auth token) stays in /tmp. Each embedded
cluster's temp dir names its owner (`runtime.owner`), and every process of the cluster
carries the dir in its environment (`SESSION_ENV`, or the auth token's path in it). A
start finds the dirs whose owner is dead, stops the processes that carry their marker,
and removes them.

Only what is certainly a dead run's is touched: a dir that is this user's own, not a
link, with an owner file this user wrote for it naming an owner known to be dead; a Ray
process of this user, started after that owner, whose environment names the dir.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from runtime.owner import Owner, all_pids, process_start, read_owner

__all__ = ["AUTH_TOKEN_FILE", "RAY_OWNER", "RAY_TEMP_PREFIX", "SESSION_ENV", "claim_dead_dirs",
           "reap_dead_ray_sessions", "session_processes"]

logger = logging.getLogger(__name__)

RAY_TEMP_PREFIX = "bidhive-ray-"
RAY_OWNER = "owner.json"
#: Set to the temp dir in the environment of an embedded cluster's processes. Ray 2.60 starts
#: its agents without it (seen in their /proc/<pid>/environ), but with the auth token's path (a
#: file in the temp dir, `AUTH_TOKEN_FILE`), so either marks a process of the session.
SESSION_ENV = "BIDHIVE_RAY_SESSION"
AUTH_TOKEN_FILE = "auth_token"
RESCANS = 4
_CLAIMED = ".dead-"  # a dead run's dir, renamed by the start that clears it: ``{name}.dead-{pid}``


def claim_dead_dirs(root: str | Path, prefix: str, owner_file: str,
                    wanted: Callable[[Owner], bool] = lambda _: True) -> Iterator[tuple[Path, Owner, str]]:
    """The dirs under `root` named `prefix*` whose owner process is dead (and that are
    `wanted`), each renamed first so that two starts never clear the same one (a rename is
    atomic: one of them wins).

    Yields:
        The dir as renamed, its owner, and its name before (what its processes carry).

    A dir left alone: not this user's (a link, another user's dir or owner file), one
    whose owner cannot be told (no owner file: a live run may not have written it yet),
    or one whose owner file was written for another dir. A dir an earlier start claimed
    is claimed again once that start is gone too (it was killed part way).
    """
    for path in sorted(Path(root).glob(f"{prefix}*")):
        name, _, claimer = path.name.partition(_CLAIMED)
        if claimer and (not claimer.isdigit() or process_start(int(claimer)) is not None):
            continue
        owner = read_owner(path, owner_file) if _ours(path, owner_file) else None
        if owner is None or owner.dir_name != name or not owner.dead() or not wanted(owner):
            continue
        claimed = path.with_name(f"{name}{_CLAIMED}{os.getpid()}")
        try:
            path.rename(claimed)
        except OSError:  # another start took it first
            continue
        yield claimed, owner, name


def _ours(path: Path, owner_file: str) -> bool:
    """A real dir (not a link) of this user, with an owner file this user wrote. Ray opens
    its temp dir to everyone (mode 0777), so the file's owner is what says who noted it."""
    try:
        folder, noted = path.lstat(), (path / owner_file).lstat()
    except OSError:
        return False
    return (stat.S_ISDIR(folder.st_mode) and stat.S_ISREG(noted.st_mode)
            and folder.st_uid == noted.st_uid == os.geteuid())


def session_processes(sessions: dict[str, int]) -> dict[int, int]:
    """This user's Ray processes whose environment names one of `sessions` (temp dir -> its
    owner's start time) and that started after that owner, by pid with their start time."""
    found: dict[int, int] = {}
    markers = {marker.encode(): started for d, started in sessions.items()
               for marker in (f"{SESSION_ENV}={d}", f"RAY_AUTH_TOKEN_PATH={os.path.join(d, AUTH_TOKEN_FILE)}")}
    for pid in all_pids():
        if pid == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != os.geteuid():
                continue
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        begun = process_start(pid)
        hit = next((markers[v] for v in environ if v in markers), None)
        if begun is not None and hit is not None and begun >= hit and _ray_process(pid):
            found[pid] = begun
    return found


def _ray_process(pid: int) -> bool:
    """Whether the process is one of Ray's own (a worker or agent, ``ray::...``; the GCS, the
    raylet; or one of Ray's Python daemons), not just a program its driver started."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return name.startswith("ray::") or name in ("raylet", "gcs_server") or b"/ray/" in command


def reap_dead_ray_sessions(root: str | Path, grace_s: float = 2.0) -> list[str]:
    """Clears the temp dirs of embedded clusters whose driver is dead, with the processes
    still running in them (SIGTERM, then SIGKILL after `grace_s`).

    Returns:
        The cleared dirs' names.
    """
    claimed = list(claim_dead_dirs(root, RAY_TEMP_PREFIX, RAY_OWNER))
    if not claimed:
        return []
    sessions = {str(Path(root) / name): owner.started for _, owner, name in claimed}
    for _ in range(RESCANS):  # a raylet still shutting down starts its agents again when they die
        left = session_processes(sessions)
        if not left:
            break
        logger.warning("Ray processes of killed runs (%s) still run: stopping them (%s)",
                       ", ".join(name for _, _, name in claimed), ", ".join(map(str, sorted(left))))
        _stop(left, grace_s)
    for path, _, _ in claimed:
        shutil.rmtree(path, ignore_errors=True)
    return [name for _, _, name in claimed]


def _stop(procs: dict[int, int], grace_s: float) -> None:
    """SIGTERM, then SIGKILL whatever still runs after `grace_s`. A pid that now names
    another process (its start time differs), or one this user may not signal, is dropped."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
        for pid in list(procs):
            try:
                if process_start(pid) == procs[pid]:
                    os.kill(pid, sig)
            except OSError:
                procs.pop(pid)
        deadline = time.monotonic() + wait_s
        while procs and time.monotonic() < deadline:
            procs = {pid: s for pid, s in procs.items() if process_start(pid) == s}
            time.sleep(0.05)
        if not procs:
            return

