"""Which process owns a temp dir, so a later start can tell a crashed run's leftovers from
a live run's files.

A run killed outright (`kill -9`, the OOM killer, a power cut of the process) removes
nothing: Ray's temp dir and its orphaned agent processes, and the bidders' snapshot dir in
``/dev/shm``, stay behind. Each such dir carries an owner file naming the process that made
it, by pid and start time, so a reused pid is never taken for the owner.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Owner", "pid_namespace", "process_start", "read_owner", "write_owner"]


def pid_namespace() -> str | None:
    """This process's pid namespace (Linux), so a pid is only ever read in the namespace it
    was noted in: a container sharing the dir sees other processes under the same numbers."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None if it is gone.

    Where /proc is missing, 0 for a live pid: liveness alone, by signal 0.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return _alive_without_proc(pid)
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


def _alive_without_proc(pid: int) -> int | None:
    if Path("/proc/self").exists():
        return None  # /proc is there and has no such pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return 0
    return 0


@dataclass(frozen=True)
class Owner:
    """The process that made a dir, and what else it noted there.

    Attributes:
        pid: its process id.
        started: its start time (`process_start`) when it wrote the file.
        namespace: the pid namespace it was noted in (`pid_namespace`).
        facts: the rest of the file (what the dir is for).
    """

    pid: int
    started: int
    namespace: str | None
    facts: dict[str, Any]

    def dead(self) -> bool:
        """Whether the owner is known to be gone: its pid, read in the namespace it was noted
        in, is no longer the process that started then. Another namespace: not known."""
        return self.namespace == pid_namespace() and process_start(self.pid) != self.started


def write_owner(directory: str | Path, name: str, **facts: Any) -> None:
    """Notes this process as the owner of `directory` in its file `name`, with `facts`."""
    me = os.getpid()
    record = {**facts, "pid": me, "started": process_start(me), "namespace": pid_namespace()}
    path = Path(directory) / name
    staging = path.with_name(path.name + ".new")
    staging.write_text(json.dumps(record))
    staging.replace(path)  # never a half-written owner file


def read_owner(directory: str | Path, name: str) -> Owner | None:
    """The owner noted in `directory`'s file `name`, or None where there is none (or it is
    unreadable: a dir whose owner cannot be told is never taken for a dead run's)."""
    try:
        record = json.loads((Path(directory) / name).read_text())
        pid, started, namespace = int(record.pop("pid")), record.pop("started"), record.pop("namespace")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if started is None:
        return None
    return Owner(pid, int(started), namespace, record)
