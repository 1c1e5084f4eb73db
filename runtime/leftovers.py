"""What a run killed outright left behind, found and cleared by the next start.

A `bidhive serve` (or any embedded cluster's driver) killed with SIGKILL runs none of its
clean-up: Ray's GCS and raylet go with it, but Ray 2.60's dashboard and runtime-env agents
live on as orphans, holding the session's log files, and the session's temp dir (with its
auth token) stays in /tmp. Each embedded cluster's temp dir names its owner
(`runtime.owner`); a start finds the dirs whose owner is dead, kills the processes still
holding files in them, and removes them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from runtime.owner import Owner, process_start, read_owner

__all__ = ["RAY_OWNER", "RAY_TEMP_PREFIX", "claim_dead_dirs", "holders", "reap_dead_ray_sessions"]

logger = logging.getLogger(__name__)

RAY_TEMP_PREFIX = "bidhive-ray-"
RAY_OWNER = "owner.json"
_CLAIMED = ".dead-"  # a dead run's dir, renamed by the start that clears it


def claim_dead_dirs(root: str | Path, prefix: str, owner_file: str) -> Iterator[tuple[Path, Owner]]:
    """The dirs under `root` named `prefix*` whose owner process is dead, each renamed first
    so that two starts never clear the same one (a rename is atomic: one of them wins).

    A dir whose owner cannot be told (no owner file, or one noted in another pid namespace)
    is left alone: it may be a live run's.
    """
    for path in sorted(Path(root).glob(f"{prefix}*")):
        owner = read_owner(path, owner_file) if _CLAIMED not in path.name else None
        if owner is None or not owner.dead():
            continue
        claimed = path.with_name(f"{path.name}{_CLAIMED}{os.getpid()}")
        try:
            path.rename(claimed)
        except OSError:  # another start took it first
            continue
        yield claimed, owner


def holders(directory: str | Path) -> dict[int, int]:
    """The processes with a file open, their working dir or their command line in
    `directory`, and their children, by pid with their start time."""
    marker = os.path.realpath(directory)
    parents: dict[int, int] = {}
    found: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        started = process_start(pid)
        if started is None:
            continue
        parents[pid] = _ppid(pid)
        if _uses(pid, marker):
            found[pid] = started
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in found}
        for pid in frontier:
            started = process_start(pid)
            if started is not None:
                found[pid] = started
    return found


def _ppid(pid: int) -> int:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(raw[raw.rfind(")") + 2:].split()[1])


def _uses(pid: int, marker: str) -> bool:
    """Whether the process has `marker` (a dir) open, as its cwd, or on its command line."""
    base = f"/proc/{pid}"
    with contextlib.suppress(OSError):
        if marker in Path(f"{base}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
            return True
    with contextlib.suppress(OSError):
        if _inside(os.readlink(f"{base}/cwd"), marker):
            return True
    with contextlib.suppress(OSError):
        for fd in os.scandir(f"{base}/fd"):
            with contextlib.suppress(OSError):
                if _inside(os.readlink(fd.path), marker):
                    return True
    return False


def _inside(path: str, marker: str) -> bool:
    return path == marker or path.startswith(marker + os.sep)


def reap_dead_ray_sessions(root: str | Path, grace_s: float = 2.0) -> list[str]:
    """Clears the temp dirs of embedded clusters whose driver is dead, with the processes
    still holding them (SIGTERM, then SIGKILL after `grace_s`); returns the dirs' names."""
    cleared = []
    for path, owner in claim_dead_dirs(root, RAY_TEMP_PREFIX, RAY_OWNER):
        left = holders(path)
        if left:
            logger.warning("a Ray session whose driver (pid %d) died left %d processes: stopping them (%s)",
                           owner.pid, len(left), ", ".join(map(str, sorted(left))))
        _stop(left, grace_s)
        shutil.rmtree(path, ignore_errors=True)
        cleared.append(path.name.split(_CLAIMED)[0])
    return cleared


def _stop(procs: dict[int, int], grace_s: float) -> None:
    """SIGTERM, then SIGKILL whatever still runs after `grace_s`; a pid that now names
    another process (its start time differs) is never signalled."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
        procs = {pid: s for pid, s in procs.items() if process_start(pid) == s}
        for pid in procs:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while procs and time.monotonic() < deadline:
            procs = {pid: s for pid, s in procs.items() if process_start(pid) == s}
            time.sleep(0.05)
        if not procs:
            return
