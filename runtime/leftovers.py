"""What a run killed outright left behind, found and cleared by the next start.

A `bidhive serve` (or any embedded cluster's driver) killed with SIGKILL runs none of its
clean-up: Ray's GCS and raylet go with it, but Ray 2.60's dashboard and runtime-env agents
live on as orphans, a replica can outlive it for a few seconds (holding the journal's
lock), and the session's temp dir (with its auth token) stays in /tmp. Each embedded
cluster's temp dir names its owner (`runtime.owner`), and every process of the cluster
carries the dir in its environment (`SESSION_ENV`, or the auth token's path in it) or
holds its log files there. A start finds the dirs whose owner is dead, stops Ray's
processes that carry their marker or hold their files, and removes them.

Only what is certainly a dead run's is touched: a dir that is this user's own, not a
link, with an owner file this user wrote for it naming an owner known to be dead; a Ray
process of this user, started after that owner, whose environment or open files name the
dir.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

from runtime.owner import Owner, all_pids, proc_cmdline, proc_name, process_start, read_owner, wait_gone

__all__ = ["AUTH_TOKEN_FILE", "RAY_OWNER", "RAY_TEMP_PREFIX", "SESSION_ENV", "claim", "claim_dead_dirs", "dead_dirs",
           "reap_dead_ray_sessions", "session_processes"]

logger = logging.getLogger(__name__)

RAY_TEMP_PREFIX = "bidhive-ray-"
RAY_OWNER = "owner.json"
#: Set to the temp dir in the environment of an embedded cluster's processes; the auth token's
#: path (a file in the temp dir, `AUTH_TOKEN_FILE`) marks them too (`session_processes`).
SESSION_ENV = "BIDHIVE_RAY_SESSION"
AUTH_TOKEN_FILE = "auth_token"
RESCANS = 4
_CLAIMED = ".dead-"  # a dead run's dir, renamed by the start that clears it: ``{name}.dead-{pid}``


def claim_dead_dirs(root: str | Path, prefix: str, owner_file: str) -> Iterator[tuple[Path, Owner, str]]:
    """The dirs under `root` named `prefix*` whose owner process is dead, each renamed
    first so that two starts never clear the same one (a rename is atomic: one of them
    wins).

    Yields:
        The dir as renamed, its owner, and its name before (what its processes carry).

    A dir left alone: not this user's (a link, another user's dir or owner file), one
    whose owner cannot be told (no owner file: a live run may not have written it yet),
    or one whose owner file was written for another dir. A dir an earlier start claimed
    is claimed again once that start is gone too (it was killed part way).
    """
    for path, owner, name in dead_dirs(root, prefix, owner_file):
        if (claimed := claim(path, name)) is not None:
            yield claimed, owner, name


def dead_dirs(root: str | Path, prefix: str, owner_file: str) -> Iterator[tuple[Path, Owner, str]]:
    """`claim_dead_dirs` without the claim: for a caller that must do something first (take
    the lock of what the dir belongs to) and then `claim` the dir itself."""
    for path in sorted(Path(root).glob(f"{prefix}*")):
        name, _, claimer = path.name.partition(_CLAIMED)
        if claimer and (not claimer.isdigit() or process_start(int(claimer)) is not None):
            continue
        owner = read_owner(path, owner_file) if _ours(path, owner_file) else None
        if owner is not None and owner.dir_name == name and owner.dead():
            yield path, owner, name


def claim(path: Path, name: str) -> Path | None:
    """Renames a dead dir found by `dead_dirs` to this process's claim; None where another
    start claimed it first (a rename is atomic: one of them wins)."""
    claimed = path.with_name(f"{name}{_CLAIMED}{os.getpid()}")
    try:
        path.rename(claimed)
    except OSError:
        return None
    return claimed


def _ours(path: Path, owner_file: str) -> bool:
    """A real dir (not a link) of this user, with an owner file this user wrote. Ray opens
    its temp dir to everyone (mode 0777), so the file's owner is what says who noted it."""
    try:
        folder, noted = path.lstat(), (path / owner_file).lstat()
    except OSError:
        return False
    return (stat.S_ISDIR(folder.st_mode) and stat.S_ISREG(noted.st_mode)
            and folder.st_uid == noted.st_uid == os.geteuid())


def session_processes(sessions: list[tuple[str, str, int]]) -> dict[int, int]:
    """This user's Ray processes of `sessions` that started after the session's owner, by
    pid with their start time.

    Args:
        sessions: per session, the temp dir as its cluster was started in it (what the
            processes' environments name), where the dir is now (a claimed dir was
            renamed: open files follow it), and its owner's start time.

    A process is the session's if its environment names the dir (`SESSION_ENV`, or the
    auth token's path in it) or it has a file open in it (its logs). Both are needed:
    a process that renames itself (``ray::...``, as the agents do) may overwrite the
    memory /proc shows as its environment, and a worker may hold no file there.
    """
    found: dict[int, int] = {}
    markers = {marker.encode(): started for named, _, started in sessions
               for marker in (f"{SESSION_ENV}={named}", f"RAY_AUTH_TOKEN_PATH={os.path.join(named, AUTH_TOKEN_FILE)}")}
    dirs = {os.path.realpath(now): started for _, now, started in sessions}
    for pid in all_pids():
        begun = process_start(pid)
        if pid == os.getpid() or begun is None or not _ray_process(pid):
            continue
        session_start = _by_environment(pid, markers)
        if session_start is None:
            session_start = _by_open_file(pid, dirs)
        if session_start is not None and begun >= session_start:
            found[pid] = begun
    return found


def _by_environment(pid: int, markers: dict[bytes, int]) -> int | None:
    """The owner's start time of the session whose marker the process's environment holds."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((markers[v] for v in environ if v in markers), None)


def _by_open_file(pid: int, dirs: dict[str, int]) -> int | None:
    """The owner's start time of the session with a file the process holds open."""
    try:
        with os.scandir(f"/proc/{pid}/fd") as fds:
            for fd in fds:
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                for directory, started in dirs.items():
                    if target.startswith(directory + os.sep):
                        return started
    except OSError:
        return None
    return None


def _ray_process(pid: int) -> bool:
    """Whether the process is this user's and one of Ray's own (a worker or agent,
    ``ray::...``; the GCS, the raylet; or one of Ray's Python daemons), not a shell, a
    pager, or a program the driver started."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.geteuid():
            return False
    except OSError:
        return False
    name = proc_name(pid)
    return name.startswith("ray::") or name in ("raylet", "gcs_server") or "/ray/" in proc_cmdline(pid)


def reap_dead_ray_sessions(root: str | Path, grace_s: float = 2.0) -> list[str]:
    """Clears the temp dirs of embedded clusters whose driver is dead, with the processes
    still running in them (SIGTERM, then SIGKILL after `grace_s`).

    Returns:
        The cleared dirs' names.
    """
    claimed = list(claim_dead_dirs(root, RAY_TEMP_PREFIX, RAY_OWNER))
    if not claimed:
        return []
    sessions = [(str(Path(root) / name), str(path), owner.started) for path, owner, name in claimed]
    for _ in range(RESCANS):  # once more after each stop: a raylet not yet gone may start a worker meanwhile
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
        procs = wait_gone(procs, wait_s)
        if not procs:
            return

