"""A bidder's durable state: what a restarted actor resumes from (see `agents.actor`).

A bidder snapshots after every commit, before it acknowledges it, so the snapshot is on
the round's path. Most of an agent's state is small, but its pending completions (every
committed job not yet finished, a heap of tuples) grow with the work in flight: a few
thousand in a warm service, 100-400 µs to pickle, more than half of a bidder's Python
time. So `SnapshotStore` keeps the heap out of the snapshot, in a log beside it: a log
starts with the whole heap, and each save appends what changed since (jobs added, jobs
finished); once the changes outnumber the heap a few times, a new log starts. A commit
then costs a small pickle of the rest of the state plus one append. The map from
committed lines to their jobs (``Agent._booked``, what a cancel looks up) grows with the
heap, so its bookings go to the same log. `CommitMemory` keeps the recent commit outcomes
as two arrays for the same reason: as a dict of 4,096 entries they took about 115 µs to
pickle.

`freeze` packs the agent's arrays and random generator (`market.packing`): through their
reduce protocols, pickle spent about 4 µs on each array and 10 µs on the generator.

Files, in the run's state dir:

- ``{agent}.0.snap`` and ``{agent}.1.snap``: saves take turns, each a header (magic,
  save number, length, CRC32) and the pickled snapshot; the newest intact one is the state.
- ``{agent}.{gen}.log``: the log of generation ``gen``, frames of a 4-byte length and a
  pickled list of changes, the first frame being the heap (and the bookings) the log starts from.
- ``{agent}.carried``: an empty marker, present while the snapshot beside it comes from an
  earlier run of the service (`serve.fleet_state`) and has not been taken over yet
  (`agents.actor.BidderHost`).

The snapshot names its log generation and how many of its bytes it covers, so a change
appended for a commit whose snapshot was never written (a crash between the two) is not
read back.
"""
from __future__ import annotations

import heapq
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from agents.base import Agent, AgentEnv
from market.config import AgentCfg
from market.packing import pack, unpack

__all__ = ["NOT_STATE", "CommitMemory", "SnapshotStore", "freeze", "thaw"]

_FRAME = struct.Struct("<I")
_SLOT_HEAD = struct.Struct("<8sQQI")  # magic, save number, snapshot length, its CRC32
_MAGIC = b"bhsnap01"

#: A new log generation is due when the log holds more than this many changes per
#: pending job (and more than `MIN_COMPACT_CHANGES`): a log stays a few times the heap's size.
COMPACT_RATIO = 4
MIN_COMPACT_CHANGES = 4096

#: Agent attributes a snapshot leaves out: the spec rebuilds the first two, and the
#: third is the store's own record of changes since the last save.
NOT_STATE = ("env", "cfg", "completion_log")


class CommitMemory:
    """Whether each of a bidder's last `size` commits took effect, by round id.

    Asked only after a failed call (``BidderHost.commit_status``), so a lookup may scan;
    what matters is that recording is O(1) and a snapshot pickles two flat arrays.
    """

    def __init__(self, size: int) -> None:
        self.rounds = np.zeros(size, dtype=np.int64)
        self.ok = np.zeros(size, dtype=np.bool_)
        self.written = 0

    def __setitem__(self, round_id: int, ok: bool) -> None:
        slot = self.written % len(self.rounds)
        self.rounds[slot], self.ok[slot] = round_id, ok
        self.written += 1

    def __len__(self) -> int:
        return min(self.written, len(self.rounds))

    def __getstate__(self) -> tuple[Any, Any, int]:
        return pack(self.rounds), pack(self.ok), self.written  # `market.packing`: 8 -> 1 µs

    def __setstate__(self, state: tuple[Any, Any, int]) -> None:
        rounds, ok, self.written = state
        self.rounds, self.ok = unpack(rounds), unpack(ok)

    def get(self, round_id: int) -> bool | None:
        """The latest outcome recorded for the round, or None if it is not remembered."""
        hits = np.flatnonzero(self.rounds[:len(self)] == round_id)
        if not len(hits):
            return None
        newest = self.written - 1
        age = (newest - hits) % len(self.rounds)
        return bool(self.ok[hits[np.argmin(age)]])


def freeze(agent: Agent) -> Any:
    """The agent's live state without its config and environment (its spec rebuilds those)."""
    state = getattr(agent, "__dict__", None)
    if state is None or "env" not in state or "cfg" not in state:
        return agent  # an unusual agent: pickle it whole
    skip = (*NOT_STATE, *type(agent).CACHES)
    return type(agent), {k: pack(v) for k, v in state.items() if k not in skip}


def thaw(frozen: Any, env: AgentEnv, cfg: AgentCfg) -> Agent:
    """The agent `freeze` saved, on a rebuilt environment and config."""
    if isinstance(frozen, Agent):
        return frozen
    cls, state = frozen
    agent = cls.__new__(cls)
    agent.__dict__.update({k: unpack(v) for k, v in state.items()}, env=env, cfg=cfg)
    agent.__dict__.update(dict.fromkeys(cls.CACHES))
    return agent


def _read_changes(path: Path, length: int) -> list[Any]:
    """The changes in the first `length` bytes of a log (all of them written before its snapshot)."""
    if length == 0:
        return []
    with path.open("rb") as f:
        data = f.read(length)
    if len(data) != length:
        raise ValueError(f"log {path.name} holds {len(data)} of the {length} bytes its snapshot names")
    changes: list[Any] = []
    at = 0
    while at < length:
        (size,) = _FRAME.unpack_from(data, at)
        changes.extend(pickle.loads(data[at + _FRAME.size:at + _FRAME.size + size]))
        at += _FRAME.size + size
    return changes


def _replay(changes: list[Any]) -> tuple[list[tuple[float, int, Any]], dict[tuple[int, int], int]]:
    """The heap and the bookings the logged changes leave.

    A change is a job added (its heap entry, a 3-tuple), a committed line booked to a job
    (``(line, seq)``, a 2-tuple) or a job finished or cancelled (its seq, an int). Only
    bookings of jobs still pending are kept: a cancel can undo nothing else.
    """
    pending: dict[int, tuple[float, int, Any]] = {}
    booked: dict[tuple[int, int], int] = {}
    for change in changes:
        if isinstance(change, int):
            pending.pop(change, None)
        elif len(change) == 2:
            booked[change[0]] = change[1]
        else:
            pending[change[1]] = change
    heap = list(pending.values())
    heapq.heapify(heap)  # seqs are unique, so the pop order is that of the original heap
    return heap, {line: seq for line, seq in booked.items() if seq in pending}


class SnapshotStore:
    """One agent's two snapshot slots and its completion log.

    Args:
        directory: The run's state dir.
        agent_id: Names the files.
    """

    def __init__(self, directory: Path, agent_id: str) -> None:
        self.directory = directory
        self.agent_id = agent_id
        self._saves = 0
        self._slot_fds: list[int | None] = [None, None]
        self._gen = 0
        self._log_fd: int | None = None
        self._log_bytes = 0
        self._log_changes = 0

    def _log_path(self, gen: int) -> Path:
        return self.directory / f"{self.agent_id}.{gen}.log"

    def slot_path(self, slot: int) -> Path:
        """Where saves of this parity go."""
        return self.directory / f"{self.agent_id}.{slot}.snap"

    @property
    def carried_marker(self) -> Path:
        """The marker of a snapshot carried over from an earlier run, not yet taken over."""
        return self.directory / f"{self.agent_id}.carried"

    def exists(self) -> bool:
        """Whether a snapshot was written."""
        return any(self.slot_path(k).exists() for k in (0, 1))

    def save(self, header: dict[str, Any], agent: Agent) -> None:
        """Writes `header` and the agent's live state, its pending jobs to the log.

        The first save, and any once the log holds more changes than its share, starts a
        new log generation with the whole heap as its first frame; the others append the
        heap's changes since the last save (the agent records them in ``completion_log``
        once a save has set it).
        """
        frozen = freeze(agent)
        if not isinstance(frozen, tuple):  # an unusual agent, pickled whole: no log
            self._replace({**header, "agent": frozen})
            return
        changes, agent.completion_log = agent.completion_log, []
        cls, state = frozen
        new_generation = changes is None or self._log_fd is None or \
            self._log_changes > max(MIN_COMPACT_CHANGES, COMPACT_RATIO * len(agent._completions))
        if new_generation:
            self._start_generation(agent._completions, agent._booked)
        elif changes:
            self._append(changes)
            self._log_changes += len(changes)
        del state["_completions"], state["_booked"]  # `freeze` made this dict: both live in the log
        self._replace({**header, "agent": (cls, state), "log": (self._gen, self._log_bytes)})
        if new_generation:  # the snapshot names the new log now: the others can go
            for path in self.directory.glob(f"{self.agent_id}.*.log"):
                if path != self._log_path(self._gen):
                    path.unlink(missing_ok=True)

    def _start_generation(self, heap: list[tuple[float, int, Any]], booked: dict[tuple[int, int], int]) -> None:
        """A new log whose first frame is the whole heap and its bookings. The old log stays
        until a snapshot names the new one: until then it is what a restart reads."""
        if self._log_fd is not None:
            os.close(self._log_fd)
        self._gen += 1
        self._log_fd = os.open(self._log_path(self._gen), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        self._log_bytes = self._log_changes = 0
        self._append([*heap, *booked.items()])

    def _append(self, changes: list[Any]) -> None:
        assert self._log_fd is not None
        blob = pickle.dumps(changes, protocol=pickle.HIGHEST_PROTOCOL)
        os.write(self._log_fd, _FRAME.pack(len(blob)) + blob)
        self._log_bytes += _FRAME.size + len(blob)

    def _replace(self, snapshot: dict[str, Any]) -> None:
        """Overwrites the older slot in place: one `pwritev` on a file kept open.

        A save cut short (the process killed mid-write) fails its checksum, and the load
        takes the other slot, the save before it. Cheaper than a temp file and a rename
        (5 against 49 µs for 80 KB on tmpfs here), which a bidder pays on every commit.
        """
        data = pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL)
        self._saves += 1
        slot = self._saves % 2
        fd = self._slot_fds[slot]
        if fd is None:
            fd = self._slot_fds[slot] = os.open(self.slot_path(slot), os.O_RDWR | os.O_CREAT, 0o644)
        os.pwritev(fd, [_SLOT_HEAD.pack(_MAGIC, self._saves, len(data), zlib.crc32(data)), data], 0)

    def _read_slot(self, slot: int) -> tuple[int, bytes] | None:
        """A slot's save number and snapshot bytes, or None if it is missing or torn."""
        try:
            raw = self.slot_path(slot).read_bytes()
        except FileNotFoundError:
            return None
        if len(raw) < _SLOT_HEAD.size:
            return None
        magic, number, length, crc = _SLOT_HEAD.unpack_from(raw)
        data = raw[_SLOT_HEAD.size:_SLOT_HEAD.size + length]
        if magic != _MAGIC or len(data) != length or zlib.crc32(data) != crc:
            return None
        return number, data

    def load(self) -> dict[str, Any]:
        """The last snapshot, its agent's pending jobs rebuilt from the log it names.

        Changes no file. The next `save` starts a new log generation, so a restarted
        actor never appends to a log an earlier process left, and removes the older logs.

        Raises:
            OSError, ValueError, pickle.UnpicklingError, ...: The files are unreadable.
        """
        slots = [got for got in map(self._read_slot, (0, 1)) if got is not None]
        if not slots:
            raise ValueError(f"no intact snapshot of {self.agent_id} in {self.directory}")
        self._saves, data = max(slots)  # the next save goes to the other slot
        snap = pickle.loads(data)
        if "log" in snap:
            gen, length = snap.pop("log")
            _, state = snap["agent"]
            state["_completions"], state["_booked"] = _replay(_read_changes(self._log_path(gen), length))
            self._gen = max(self._gen, gen)
        return snap

    def close(self) -> None:
        """Closes the files (they stay: they are the state a restart resumes from)."""
        for fd in (self._log_fd, *self._slot_fds):
            if fd is not None:
                os.close(fd)
        self._log_fd, self._slot_fds = None, [None, None]
