"""Which process owns a temp dir, so a later start can tell a killed run's leftovers from
a live run's files.

A run killed outright (`kill -9`, the OOM killer) removes nothing: Ray's temp dir and its
orphaned agent processes, and the bidders' snapshot dir in ``/dev/shm``, stay behind. Each
such dir carries an owner file naming the process whose life it belongs to, by pid and
start time (so a reused pid is never taken for the owner) and pid namespace (so a pid is
only read where it was noted).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Owner", "all_pids", "pid_namespace", "proc_stat", "process_start", "read_owner", "write_owner"]


def all_pids() -> list[int]:
    """The pids /proc lists (empty where there is no /proc)."""
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time in clock ticks since boot) from /proc/<pid>/stat, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def process_start(pid: int) -> int | None:
    """The start time of a running process (not a zombie), or None if there is none."""
    stat = proc_stat(pid)
    return None if stat is None or stat[0] == "Z" else stat[2]


def pid_namespace() -> str | None:
    """This process's pid namespace, where /proc numbers processes as it does (else None).

    A container sharing the dir sees other processes under the same numbers, and a process
    in a namespace whose /proc was not remounted reads other processes' entries under its
    pids: in either case an owner's liveness cannot be told, and it is not noted.
    """
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return None
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclass(frozen=True)
class Owner:
    """The process a dir belongs to, and what else was noted there.

    Attributes:
        pid: its process id.
        started: its start time (`process_start`) when the file was written.
        namespace: the pid namespace it was noted in (`pid_namespace`).
        facts: the rest of the file (what the dir is for).
    """

    pid: int
    started: int
    namespace: str
    facts: dict[str, Any]

    def dead(self) -> bool:
        """Whether the owner is known to be gone: its pid, read in the namespace it was noted
        in, is no longer the process that started then. Another namespace: not known."""
        return self.namespace == pid_namespace() and process_start(self.pid) != self.started


def write_owner(directory: str | Path, name: str, process: tuple[int, int] | None = None, **facts: Any) -> None:
    """Notes the owner of `directory` in its file `name`, with `facts`.

    Args:
        directory: the dir (made by this process).
        name: the owner file's name.
        process: (pid, start time) of the process whose life the dir belongs to, where
            that is not this one (a service's driver for the replica's fleet dir).
        **facts: what else to note (JSON values).
    """
    pid, started = process or (os.getpid(), process_start(os.getpid()))
    namespace = pid_namespace()
    record = {**facts, "pid": pid, "started": started if namespace else None, "namespace": namespace}
    path = Path(directory) / name
    staging = path.with_name(path.name + ".new")
    staging.write_text(json.dumps(record))
    staging.replace(path)  # never a half-written owner file


def read_owner(directory: str | Path, name: str) -> Owner | None:
    """The owner noted in `directory`'s file `name`, or None where it cannot be told (no
    file, an unreadable one, or an owner noted without a start time or namespace)."""
    try:
        record = json.loads((Path(directory) / name).read_text())
        pid, started, namespace = int(record.pop("pid")), record.pop("started"), record.pop("namespace")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(started, int) or not isinstance(namespace, str):
        return None
    return Owner(pid, started, namespace, record)
