"""The auction journal's storage layer: an append-only log of framed records.

The journal is the system's memory: replay re-clears every round from it, and
an order or award is journaled before anyone acts on it. So the layer promises
two things: whatever it hands back is exactly what was written, in order, with
no gaps; and a crash costs at most the unfinished tail, never the journal.

On disk (``docs/JOURNAL.md`` is the full reference):

- Each file starts with the 8-byte header :data:`MAGIC` (``b"BHJRNL1\\n"``).
- Then frames: ``<u32 payload length> <u32 CRC32C of payload> <payload>``, both
  little-endian; the payload is a msgpack map written by :mod:`market.codec`
  whose first two keys are ``seq`` (0, 1, 2, ... across all files) and
  ``type``.
- Rotation: the journal ``run.bhj`` continues in ``run.bhj.1``, ``run.bhj.2``,
  ... Readers go through them in that order.

This module knows nothing about auctions: record types and their fields
belong to the code that writes them.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from struct import Struct
from types import TracebackType
from typing import Any, BinaryIO, Literal

import google_crc32c

from market.codec import pack, unpack

try:  # POSIX only; without it a second writer is simply not detected.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FRAME_HEADER",
    "MAGIC",
    "MAX_RECORD_BYTES",
    "FsyncPolicy",
    "JournalCorrupt",
    "JournalError",
    "JournalLocked",
    "JournalReader",
    "JournalStats",
    "JournalWriter",
    "NotAJournal",
    "TornTailWarning",
    "journal_files",
    "journal_head",
    "read_journal",
    "rotated_path",
    "sync_dir",
]

MAGIC = b"BHJRNL1\n"
"""Header at the start of every journal file; its absence means "not a journal"."""

FRAME_HEADER = Struct("<II")
"""Frame header: payload length, CRC32C (Castagnoli) of the payload."""

MAX_RECORD_BYTES = 64 * 1024 * 1024
"""Largest payload written or accepted; a larger length field is corruption."""

FsyncPolicy = Literal["always", "interval", "never"]

# Every payload the writer produces starts with a map header (fixmap, map16 or
# map32: 1, 3 or 5 bytes) followed by the key "seq" (0xa3 = 3-byte fixstr).
# The reader searches for this to find good frames after a damaged one.
_SEQ_KEY = b"\xa3seq"
_MAP_HEADER_LEN = {1: range(0x80, 0x90), 3: (0xDE,), 5: (0xDF,)}
_BUFFER_BYTES = 1 << 16
_FRAME_HEAD = FRAME_HEADER.pack
_crc32c = google_crc32c.value


class JournalError(ValueError):
    """Base class of the journal's data errors."""


class JournalCorrupt(JournalError):
    """A damaged record with good records after it, a seq gap, or a broken file set.

    The message names the file and the byte offset of the bad record.
    """


class NotAJournal(JournalError):
    """The file does not start with :data:`MAGIC`."""


class JournalLocked(RuntimeError):
    """Another :class:`JournalWriter` (in any process) has this journal open."""


class TornTailWarning(UserWarning):
    """An incomplete last record, left by a crash mid-write, was ignored."""


def rotated_path(path: str | os.PathLike[str], index: int) -> Path:
    """Path of the ``index``-th file of a journal: ``path`` itself for 0, else ``path.<index>``."""
    base = Path(path)
    return base if index == 0 else base.with_name(f"{base.name}.{index}")


def journal_files(path: str | os.PathLike[str]) -> list[Path]:
    """All files of a journal in reading order: ``path``, ``path.1``, ``path.2``, ...

    Raises:
        FileNotFoundError: Neither ``path`` nor any rotated file exists.
        JournalCorrupt: ``path`` is missing while rotated files exist, or the
            rotated suffixes have a hole (a lost file would hide a seq gap
            until much later).
    """
    base = Path(path)
    indices = _rotated_indices(base)
    if indices != list(range(1, len(indices) + 1)):
        raise JournalCorrupt(f"{base}: rotated files are not numbered 1..n, found suffixes {indices}")
    if not base.exists():
        if indices:
            successor = rotated_path(base, 1).name
            raise JournalCorrupt(f"{base}: first journal file is missing but {successor} exists")
        raise FileNotFoundError(f"no journal at {base}")
    return [rotated_path(base, i) for i in range(len(indices) + 1)]


def journal_head(path: str | os.PathLike[str]) -> bytes:
    """The frame header (length and CRC32C) of a journal's first record: what tells two
    journals apart, read without decoding anything. Empty when it has no record yet."""
    with open(path, "rb") as file:
        head = file.read(len(MAGIC) + FRAME_HEADER.size)
    return head[len(MAGIC):] if len(head) == len(MAGIC) + FRAME_HEADER.size else b""


def _rotated_indices(base: Path) -> list[int]:
    """Sorted numeric suffixes ``n`` of existing ``base.<n>`` files (no leading zeros)."""
    prefix = base.name + "."
    parent = base.parent if str(base.parent) else Path(".")
    try:
        names = [entry.name for entry in os.scandir(parent)]
    except FileNotFoundError:
        return []
    suffixes = (name[len(prefix):] for name in names if name.startswith(prefix))
    return sorted(int(s) for s in suffixes if s.isdigit() and s.isascii() and str(int(s)) == s)


@dataclass
class _Torn:
    """Where the good prefix of the last file ends and why the rest was dropped."""

    offset: int
    reason: str
    size: int

    def message(self, path: Path) -> str:
        """What the warning says: the file, the offset an operator needs to inspect it, and why."""
        return (
            f"{path}: ignoring torn last record at byte offset {self.offset} "
            f"({self.reason}; {self.size - self.offset} trailing bytes)"
        )

    def warn(self, path: Path) -> None:
        """Report the dropped tail.

        A warning rather than a log line, so tests can assert on it and a
        service can route it with ``logging.captureWarnings(True)``.
        """
        # stacklevel 4: warn <- _records or _recover <- __iter__ or __init__ <- caller.
        warnings.warn(self.message(path), TornTailWarning, stacklevel=4)


class _FileScan:
    """Checked frames of one journal file, as ``(offset, payload)`` pairs.

    Only the last file of a journal may end in a torn record: files before it
    were complete before their successor was created. After iteration,
    ``good_end`` is the size of the good prefix and ``torn`` says what, if
    anything, was dropped after it.
    """

    def __init__(self, path: Path, *, first: bool, last: bool) -> None:
        self.path = path
        self.first = first
        self.last = last
        self.good_end = 0
        self.torn: _Torn | None = None

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        with open(self.path, "rb", buffering=_BUFFER_BYTES) as file:
            size = os.fstat(file.fileno()).st_size
            if not self._header_ok(file.read(len(MAGIC)), size):
                return
            self.good_end = len(MAGIC)
            while self.good_end < size:
                payload = self._next_payload(file, self.good_end, size)
                if payload is None:
                    return
                yield self.good_end, payload
                self.good_end += FRAME_HEADER.size + len(payload)

    def _header_ok(self, head: bytes, size: int) -> bool:
        """Check the magic; a cut-short header is a torn tail only in the last file."""
        if head == MAGIC:
            return True
        if len(head) < len(MAGIC) and MAGIC.startswith(head):
            if not self.last:
                raise JournalCorrupt(f"{self.path}: header cut short at byte offset 0, later files exist")
            self.torn = _Torn(0, "incomplete file header", size)
            return False
        if self.first:
            raise NotAJournal(f"{self.path} is not a bidhive journal: it starts with {head!r}, not {MAGIC!r}")
        raise JournalCorrupt(f"{self.path}: bad file header {head!r} at byte offset 0")

    def _next_payload(self, file: BinaryIO, offset: int, size: int) -> bytes | None:
        """Read and check the frame at ``offset``; None when the rest is a torn tail."""
        remaining = size - offset
        if remaining < FRAME_HEADER.size:
            return self._damaged(offset, size, "incomplete frame header")
        length, crc = FRAME_HEADER.unpack(file.read(FRAME_HEADER.size))
        if not 0 < length <= MAX_RECORD_BYTES:
            return self._damaged(offset, size, f"bad length field {length}")
        if length > remaining - FRAME_HEADER.size:
            have = remaining - FRAME_HEADER.size
            return self._damaged(offset, size, f"incomplete payload, {have} of {length} bytes")
        payload = file.read(length)
        if len(payload) != length:  # the file shrank under us
            return self._damaged(offset, size, f"incomplete payload, {len(payload)} of {length} bytes")
        if google_crc32c.value(payload) != crc:
            return self._damaged(offset, size, "CRC32C mismatch")
        return payload

    def _damaged(self, offset: int, size: int, reason: str) -> None:
        """Classify damage at ``offset``: a torn tail (returns None) or corruption (raises).

        A crash mid-write leaves only a prefix of the last frame, so no good
        frame can follow a torn one. If one does, the damage is corruption
        of a record the writer had finished, and hiding it would silently
        drop the good records after it.
        """
        if not self.last:
            raise JournalCorrupt(f"{self.path}: {reason} at byte offset {offset} (not the last journal file)")
        following = _next_good_frame(self.path, offset, size)
        if following is not None:
            raise JournalCorrupt(
                f"{self.path}: {reason} at byte offset {offset}, "
                f"followed by a good record at byte offset {following}"
            )
        self.torn = _Torn(offset, reason, size)
        return None


def _next_good_frame(path: Path, offset: int, size: int) -> int | None:
    """Offset of the first CRC-valid frame that starts after ``offset``, or None.

    Candidates are found by the ``seq`` key every payload starts with, so this
    is a fast scan even over a large tail.
    """
    with open(path, "rb") as file, mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ) as view:
        hit = view.find(_SEQ_KEY, offset + 1)
        while hit != -1:
            for header_len, first_bytes in _MAP_HEADER_LEN.items():
                start = hit - header_len - FRAME_HEADER.size
                if start > offset and view[start + FRAME_HEADER.size] in first_bytes:
                    if _frame_ok(view, start, size):
                        return start
            hit = view.find(_SEQ_KEY, hit + 1)
    return None


def _frame_ok(view: mmap.mmap, start: int, size: int) -> bool:
    """Whether a complete frame with a matching CRC32C starts at ``start``."""
    length, crc = FRAME_HEADER.unpack_from(view, start)
    end = start + FRAME_HEADER.size + length
    if not 0 < length <= MAX_RECORD_BYTES or end > size:
        return False
    return google_crc32c.value(view[start + FRAME_HEADER.size : end]) == crc


def _decode(payload: bytes, path: Path, offset: int) -> dict[str, Any]:
    """Decode a CRC-checked payload; a failure here is a writer bug, so corruption."""
    try:
        record = unpack(payload)
    except ValueError as exc:
        raise JournalCorrupt(f"{path}: undecodable record at byte offset {offset}: {exc}") from exc
    if type(record.get("seq")) is not int or not isinstance(record.get("type"), str):
        raise JournalCorrupt(f"{path}: record at byte offset {offset} lacks an int 'seq' or a str 'type'")
    return record


@dataclass
class JournalStats:
    """What a :class:`JournalReader` has read so far.

    Attributes:
        files: The journal's files, in reading order.
        records: Records yielded.
        bytes: Bytes of the good prefix (file headers and complete frames).
        last_seq: ``seq`` of the last record yielded, None before the first.
        torn_offset: Byte offset in the last file of an ignored torn tail.
        corrupt: With ``strict=False``, the error that stopped reading early.
    """

    files: list[Path] = field(default_factory=list)
    records: int = 0
    bytes: int = 0
    last_seq: int | None = None
    torn_offset: int | None = None
    corrupt: str | None = None


class JournalReader:
    """Streaming reader over a journal and its rotated files, with stats.

    Iterating yields each record as a dict (``seq``, ``type`` and the writer's
    fields) and checks, as it goes, the frames, the CRCs and that ``seq`` runs
    0, 1, 2, ... without a gap. Memory stays at one record, whatever the size.

    Recovery rules:
        - A torn last record (the end of the last file is an incomplete frame
          header or payload, a bad length or a CRC mismatch, and no good frame
          follows) is dropped with a :class:`TornTailWarning` naming its offset.
        - Any other damage raises :class:`JournalCorrupt` naming file and
          offset: a bad frame with a good frame after it, a damaged frame in a
          rotated file that has a successor, an undecodable payload, a seq gap.
        - A first file without :data:`MAGIC` raises :class:`NotAJournal`.

    Args:
        path: The journal's first file.
        strict: If False, corruption ends the iteration with a warning
            instead of an exception (to salvage the good prefix); the error
            is kept in ``stats.corrupt``.
        defer_warnings: Keep the torn-tail warning's message for
            :meth:`take_deferred_warnings` instead of warning. For a caller
            that reads ahead of what it acts on (replay), and must warn only
            once it has acted on every record before the tail.
        start: ``(file_index, seq)``: read from the start of that rotated file,
            whose first record must have that ``seq`` (a checkpoint of what the
            earlier files hold, `serve.index_checkpoint`). A mismatch is a
            :class:`JournalCorrupt` at the first record.

    Example:
        >>> reader = JournalReader("run.bhj")
        >>> rounds = [r for r in reader if r["type"] == "round_cleared"]
        >>> reader.stats.last_seq
    """

    def __init__(self, path: str | os.PathLike[str], *, strict: bool = True, defer_warnings: bool = False,
                 start: tuple[int, int] = (0, 0)) -> None:
        self.path = Path(path)
        self.strict = strict
        self.stats = JournalStats()
        self._deferred: list[str] | None = [] if defer_warnings else None
        self._first_file, first_seq = start
        if first_seq:
            self.stats.last_seq = first_seq - 1

    def take_deferred_warnings(self) -> list[str]:
        """The torn-tail warnings kept so far (with ``defer_warnings``), now handed over."""
        if self._deferred is None:
            return []
        taken, self._deferred = self._deferred, []
        return taken

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from self._records()
        except JournalCorrupt as exc:
            if self.strict:
                raise
            self.stats.corrupt = str(exc)
            warnings.warn(f"stopped reading a corrupt journal: {exc}", RuntimeWarning, stacklevel=2)

    def _records(self) -> Iterator[dict[str, Any]]:
        """Records of every file in order, with seq continuity checked across files."""
        files = journal_files(self.path)
        self.stats.files = files
        if self._first_file >= len(files):
            raise JournalCorrupt(f"{self.path}: no file {self._first_file} to start from ({len(files)} files)")
        for index, path in enumerate(files[self._first_file:], self._first_file):
            scan = _FileScan(path, first=index == 0, last=index == len(files) - 1)
            for offset, payload in scan:
                yield self._checked(_decode(payload, path, offset), path, offset, len(payload))
            self.stats.bytes += scan.good_end
            if scan.torn is not None:
                self.stats.torn_offset = scan.torn.offset
                if self._deferred is not None:
                    self._deferred.append(scan.torn.message(path))
                else:
                    scan.torn.warn(path)

    def _checked(self, record: dict[str, Any], path: Path, offset: int, length: int) -> dict[str, Any]:
        """Enforce seq continuity and count the record."""
        expected = 0 if self.stats.last_seq is None else self.stats.last_seq + 1
        if record["seq"] != expected:
            raise JournalCorrupt(
                f"{path}: record at byte offset {offset} has seq {record['seq']}, expected {expected}"
            )
        self.stats.last_seq = expected
        self.stats.records += 1
        return record


def read_journal(path: str | os.PathLike[str], *, strict: bool = True) -> Iterator[dict[str, Any]]:
    """Stream the records of a journal (all rotated files, in order).

    See :class:`JournalReader` for the recovery rules; use that class directly
    when you also want the stats.

    Args:
        path: The journal's first file.
        strict: If False, stop with a warning at corruption instead of raising.

    Yields:
        Each record as a dict, ``seq`` 0, 1, 2, ...

    Raises:
        JournalCorrupt: Damage other than a torn tail (``strict=True``).
        NotAJournal: ``path`` does not start with :data:`MAGIC`.
        FileNotFoundError: No journal at ``path``.
    """
    return iter(JournalReader(path, strict=strict))


@dataclass
class _Tail:
    """Where a reopened writer continues: the last file's index and the next seq."""

    index: int
    next_seq: int


def _recover(base: Path) -> _Tail:
    """Find where to append: after the last good record; truncates a torn tail.

    Only the last file is scanned (CRC only, decoding just its last record),
    so reopening costs one file, not the whole journal. Full seq checking is
    the reader's job.
    """
    files = journal_files(base)
    scan = _FileScan(files[-1], first=len(files) == 1, last=True)
    last = _last_frame(scan)
    if scan.torn is not None:
        scan.torn.warn(files[-1])
        os.truncate(files[-1], scan.good_end)
    index = len(files) - 1
    while last is None and index > 0:
        index -= 1
        last = _last_frame(_FileScan(files[index], first=index == 0, last=False))
    next_seq = 0 if last is None else _decode(last[1], files[index], last[0])["seq"] + 1
    return _Tail(len(files) - 1, next_seq)


def _last_frame(scan: _FileScan) -> tuple[int, bytes] | None:
    """The last good ``(offset, payload)`` of a file, or None if it has none."""
    last = None
    for last in scan:
        pass
    return last


class JournalWriter:
    """Appends records to a journal, one complete frame per record.

    Each record gets the next ``seq``; the writer never reuses or skips one.
    Opening an existing journal continues it: a torn tail left by a crash is
    truncated (with a :class:`TornTailWarning`) and numbering resumes after
    the last good record, so a restarted service keeps one journal. Only one
    writer may hold a journal at a time (an advisory ``flock``; a second one
    gets :class:`JournalLocked`). The writer is thread-safe.

    Durability (``fsync``):
        - ``"always"``: flush and ``fdatasync`` after every record; a record is
          on disk when :meth:`append` returns. For records that must survive
          before someone acts on them (an award before the client hears).
        - ``"interval"``: records collect in a user-space buffer; on an append
          at least ``fsync_interval_s`` after the last sync, flush and sync. A
          crash loses at most the records since the last sync. There is no
          timer thread: an idle writer syncs on :meth:`flush` or :meth:`close`.
        - ``"never"``: the OS decides; :meth:`close` still flushes.

    A crash at any moment, under any policy, leaves a journal that reads back
    as a complete prefix with contiguous ``seq``.

    Rotation: with ``rotate_bytes``, a record that would take the current file
    past that size goes to a new file instead: ``path.1``, ``path.2``, ...
    (a record larger than ``rotate_bytes`` gets a file of its own).

    Args:
        path: The journal's first file; created if missing.
        fsync: Durability policy, see above.
        fsync_interval_s: Sync period of the ``"interval"`` policy.
        rotate_bytes: File size that starts a new file; None never rotates.
        clock: Monotonic clock in seconds (injected for deterministic tests).

    Raises:
        NotAJournal: ``path`` exists and is not a journal (never clobbered).
        JournalCorrupt: The existing journal is damaged before its tail.
        JournalLocked: Another writer has the journal open.

    Example:
        >>> with JournalWriter("run.bhj", fsync="always") as journal:
        ...     journal.append("order_received", order_id="o-1", value=12.5)
        0
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fsync: FsyncPolicy = "interval",
        fsync_interval_s: float = 0.2,
        rotate_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if fsync not in ("always", "interval", "never"):
            raise ValueError(f"fsync must be 'always', 'interval' or 'never', not {fsync!r}")
        if rotate_bytes is not None and rotate_bytes <= len(MAGIC):
            raise ValueError(f"rotate_bytes must exceed the {len(MAGIC)}-byte header, got {rotate_bytes}")
        self.path = Path(path)
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.rotate_bytes = rotate_bytes
        self._clock = clock
        self._mutex = threading.Lock()
        self._failed: BaseException | None = None
        lock_fd = self._take_lock()
        self._lock_fd: int | None = lock_fd  # None once closed
        try:
            fresh = os.fstat(lock_fd).st_size == 0 and not _rotated_indices(self.path)
            tail = _Tail(0, 0) if fresh else _recover(self.path)
            self._index = tail.index
            self._next_seq = tail.next_seq
            self._synced_next = tail.next_seq  # what was there at open is as durable as it gets
            self._file, self._size = self._open(rotated_path(self.path, tail.index), create=False)
        except BaseException:
            os.close(lock_fd)
            raise
        self._sync_due = self._next_sync_due()
        #: Called with each record (as a dict, in ``seq`` order) once it is written: lets a
        #: shell keep views that are exactly what the journal says (the HTTP service).
        self.on_append: Callable[[dict[str, Any]], None] | None = None
        #: Called, under the writer's lock, with ``(file_index, seq, finished_bytes)`` once a
        #: rotation has closed the previous file (of ``finished_bytes``) and before the
        #: record ``seq`` starts the new one: the point at which views fed by `on_append`
        #: hold exactly the earlier files.
        self.on_rotate: Callable[[int, int, int], None] | None = None

    @property
    def next_seq(self) -> int:
        """The ``seq`` the next :meth:`append` will assign."""
        return self._next_seq

    @property
    def unsynced(self) -> bool:
        """Whether records were appended since the last sync (a :meth:`flush` would write them)."""
        return self._synced_next < self._next_seq

    @property
    def current_path(self) -> Path:
        """The file records are being appended to."""
        return rotated_path(self.path, self._index)

    def footprint(self) -> tuple[int, int]:
        """The journal's files and their bytes, the one being appended to included (with
        what is still in the write buffer): what a restart or `bidhive replay` reads. A
        finished file moved away (to a backup) counts 0 bytes rather than failing the
        health check that asks."""
        index, size = self._index, self._size
        return index + 1, size + sum(_size_of(rotated_path(self.path, i)) for i in range(index))

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._lock_fd is None

    def append(self, type: str, /, **fields: Any) -> int:  # noqa: A002 - the record's "type"
        """Append one record and return its ``seq``.

        The record is encoded before a ``seq`` is taken, so a value the codec
        rejects raises without leaving a gap.

        Args:
            type: The record type, e.g. ``"order_received"``.
            **fields: The record's fields (see :mod:`market.codec` for the
                value types); ``seq`` and ``type`` are reserved.

        Returns:
            The record's ``seq``.

        Raises:
            TypeError: A field value cannot be encoded.
            ValueError: A reserved field name, or the record is larger than
                :data:`MAX_RECORD_BYTES`, or the writer is closed.
            JournalError: An earlier write failed (e.g. disk full); the file
                may end in a partial frame, so nothing more is appended.
        """
        if "seq" in fields or "type" in fields:
            raise ValueError("'seq' and 'type' are set by the journal, not passed as fields")
        return self.append_record({"seq": None, "type": type, **fields})

    def append_record(self, record: dict[str, Any]) -> int:
        """Append a record built by the caller and return its ``seq``: `append` without
        the keyword arguments, for a shell that writes a record per hook call.

        Args:
            record: ``{"seq": None, "type": TYPE, **fields}`` with ``str`` keys, ``seq``
                first; its ``seq`` is filled in here, before it is encoded (a value
                the codec rejects still raises without leaving a gap).

        Returns and raises as `append`; also ValueError when ``seq`` and ``type`` are not
        the first two keys (the reader finds frames after damage by that start).
        """
        keys = iter(record)
        if next(keys, None) != "seq" or next(keys, None) != "type":
            raise ValueError("a record's first two keys are 'seq' and 'type', in that order")
        if not isinstance(record["type"], str):
            raise TypeError(f"record type must be str, not {type(record['type']).__qualname__}")
        with self._mutex:  # the hot path of every shell: a few attribute reads, no helper calls
            if self._failed is not None or self._file.closed:
                self._check_usable()
            seq = record["seq"] = self._next_seq
            payload = pack(record, keys_checked=True)
            if len(payload) > MAX_RECORD_BYTES:
                raise ValueError(f"record of {len(payload)} bytes exceeds MAX_RECORD_BYTES ({MAX_RECORD_BYTES})")
            frame = _FRAME_HEAD(len(payload), _crc32c(payload)) + payload
            try:
                if self.rotate_bytes is not None:
                    self._rotate_for(len(frame))
                self._file.write(frame)
                self._size += len(frame)
                self._next_seq = seq + 1
                if self._clock() >= self._sync_due:
                    self._sync()
            except BaseException as exc:
                self._failed = exc
                raise
            if self.on_append is not None:
                self.on_append(record)
            return seq

    def rotate(self, min_bytes: int = 0) -> bool:
        """Finish the current file now and start the next, as a full file would.

        Args:
            min_bytes: Keep the current file if it is smaller than this. A file that
                holds no record yet is always kept (a call per restart would otherwise
                pile up empty files).

        Returns:
            Whether a new file was started.
        """
        with self._mutex:
            self._check_usable()
            if self._size <= len(MAGIC) or self._size < min_bytes:
                return False
            try:
                self._rotate()
            except BaseException as exc:
                self._failed = exc
                raise
            return True

    def flush(self) -> None:
        """Hand buffered records to the OS and, unless ``fsync="never"``, sync them to disk."""
        with self._mutex:
            self._check_usable()
            try:
                self._sync()
            except BaseException as exc:
                self._failed = exc
                raise

    def close(self) -> None:
        """Flush, sync (unless ``fsync="never"``), close and release the lock; idempotent."""
        with self._mutex:
            if self._lock_fd is None:
                return
            try:
                if self._failed is None and not self._file.closed:
                    self._sync()
            finally:
                try:
                    self._file.close()  # may raise too (a full disk): the lock goes all the same
                finally:
                    os.close(self._lock_fd)
                    self._lock_fd = None

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _take_lock(self) -> int:
        """Open (creating if needed) the first file and lock it against a second writer."""
        if not self.path.exists() and _rotated_indices(self.path):
            journal_files(self.path)  # raises the "first file missing" error
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:  # pragma: no cover - Windows
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalLocked(f"{self.path} is already open by another JournalWriter") from None
        return fd

    def _open(self, path: Path, *, create: bool) -> tuple[BinaryIO, int]:
        """Open a file for appending; a new or emptied file gets the header, synced."""
        file = open(path, "xb" if create else "ab", buffering=_BUFFER_BYTES)  # noqa: SIM115
        try:
            size = file.tell()
            if size == 0:
                file.write(MAGIC)
                file.flush()
                size = len(MAGIC)
                if self.fsync != "never":
                    _datasync(file.fileno())
                    sync_dir(path.parent)
        except BaseException:
            with contextlib.suppress(OSError):  # its own flush may fail the same way: the first error stands
                file.close()
            raise
        return file, size

    def _rotate_for(self, frame_bytes: int) -> None:
        """Start the next file first if this frame would take the current one past ``rotate_bytes``."""
        limit = self.rotate_bytes
        if limit is not None and self._size > len(MAGIC) and self._size + frame_bytes > limit:
            self._rotate()

    def _rotate(self) -> None:
        """Finish the current file (synced, so only the last file can be torn) and start the next."""
        self._sync()
        self._file.close()
        finished = self._size
        self._index += 1
        self._file, self._size = self._open(self.current_path, create=True)
        if self.on_rotate is not None:
            self.on_rotate(self._index, self._next_seq, finished)

    def _next_sync_due(self) -> float:
        """When the fsync policy next syncs on an append (clock time; -inf: every append)."""
        if self.fsync == "always":
            return -math.inf
        if self.fsync == "interval":
            return self._clock() + self.fsync_interval_s
        return math.inf

    def _sync(self) -> None:
        """Flush the buffer to the OS and, unless ``fsync="never"``, to the disk."""
        self._file.flush()
        if self.fsync != "never":
            _datasync(self._file.fileno())
        self._sync_due = self._next_sync_due()
        self._synced_next = self._next_seq

    def _check_usable(self) -> None:
        """Refuse to write after close or after a failed write."""
        if self._lock_fd is None:
            raise ValueError(f"journal {self.path} is closed")
        if self._failed is not None:  # a failed rotation leaves no open file: say why, not "closed"
            raise JournalError(f"journal {self.path} stopped after a failed write: {self._failed!r}")


def _size_of(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _datasync(fd: int) -> None:
    """fdatasync where available: it persists the data and the file size, skipping mtime."""
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def sync_dir(directory: Path) -> None:
    """Sync a directory so a newly created file's name survives a power loss."""
    if os.name != "posix":  # pragma: no cover
        return
    fd = os.open(directory if str(directory) else ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
