"""Which process owns a temp dir, so a later start can tell a killed run's leftovers from
a live run's files.

A run killed outright (`kill -9`, the OOM killer) removes nothing: Ray's temp dir and its
orphaned agent processes, and the bidders' snapshot dir in ``/dev/shm``, stay behind. Each
such dir carries an owner file naming the process whose life it belongs to, by pid and
start time (so a reused pid is never taken for the owner), and where that pid means
something: the host, its boot and the pid namespace (a temp dir on a shared file system, a
container sharing the dir). It also names the dir it was written in, so an owner file moved
into another dir (Ray opens its temp dir to everyone) says nothing of that dir. The /proc
readings that tell a process apart (start time, name, command line) live here too, for
every module that stops or waits for processes.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Owner", "all_pids", "pid_namespace", "proc_cmdline", "proc_name", "proc_stat", "process_start",
           "read_owner", "wait_gone", "where_pids_mean", "write_owner"]


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


def proc_cmdline(pid: int) -> str:
    """The process's command line, arguments joined by spaces ("" if it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def proc_name(pid: int) -> str:
    """The process's name (``comm``: what Ray's workers rename themselves to), or "?"."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def wait_gone(procs: dict[int, int], timeout_s: float) -> dict[int, int]:
    """Waits up to `timeout_s` for the processes (pid -> start time) to exit; returns those
    still running. A pid that now names another process counts as gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = {p: s for p, s in procs.items() if process_start(p) == s}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


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


def where_pids_mean() -> str | None:
    """Where this process's pids are read: host, boot and pid namespace (None where one of
    them cannot be told: liveness is then not judged at all)."""
    namespace = pid_namespace()
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}/{namespace}" if namespace else None


@dataclass(frozen=True)
class Owner:
    """The process a dir belongs to, and what else was noted there.

    Attributes:
        pid: its process id.
        started: its start time (`process_start`) when the file was written.
        where: where the pid was noted (`where_pids_mean`).
        dir_name: the name of the dir the file was written in.
        facts: the rest of the file (what the dir is for).
    """

    pid: int
    started: int
    where: str
    dir_name: str
    facts: dict[str, Any]

    def dead(self) -> bool:
        """Whether the owner is known to be gone: its pid, read on the host, boot and pid
        namespace it was noted in, is no longer the process that started then. Noted
        elsewhere: not known."""
        return self.where == where_pids_mean() and process_start(self.pid) != self.started


def write_owner(directory: str | Path, name: str, process: tuple[int, int] | None = None, **facts: Any) -> None:
    """Notes the owner of `directory` in its file `name`, with `facts`.

    Args:
        directory: the dir (made by this process).
        name: the owner file's name.
        process: (pid, start time) of the process whose life the dir belongs to, where
            that is not this one (a service's driver for the replica's fleet dir); taken
            only if that process runs here now, else this one is noted.
        **facts: what else to note (JSON values).
    """
    if process is None or process_start(process[0]) != process[1]:
        process = (os.getpid(), process_start(os.getpid()) or 0)
    where = where_pids_mean()
    record = {**facts, "pid": process[0], "started": process[1] if where else None, "where": where,
              "dir": Path(directory).name}
    path = Path(directory) / name
    staging = path.with_name(path.name + ".new")
    staging.write_text(json.dumps(record))
    staging.replace(path)  # never a half-written owner file


def read_owner(directory: str | Path, name: str) -> Owner | None:
    """The owner noted in `directory`'s file `name`, or None where it cannot be told (no
    file, an unreadable one, or one noted without a start time or place)."""
    try:
        record = json.loads((Path(directory) / name).read_text())
        pid, started, where, dir_name = (int(record.pop("pid")), record.pop("started"), record.pop("where"),
                                         record.pop("dir"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(started, int) or not isinstance(where, str) or not isinstance(dir_name, str):
        return None
    return Owner(pid, started, where, dir_name, record)
