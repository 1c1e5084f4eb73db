"""A checkpoint of the order index beside the service's journal, so that a restart reads it
and then only the journal files written after it, not the whole journal.

The desk takes one each time the journal rotates (`ServeCfg.journal_rotate_mb`). At that
moment the index holds exactly the finished files, so the checkpoint names the new file
and the seq of its first record. A restart checks that the journal still starts with
the same record, that the named file starts with that seq and that the retention
settings are the same, then applies the records from that file on. Anything else (no
checkpoint, a damaged or cut-short one, another journal, other settings, another format)
reads the whole journal instead, with a log line that says why. So a checkpoint can make
a restart faster, never different.

The file is `MAGIC`, then frames as in the journal (u32 length, u32 CRC32C, payload),
each payload msgpack: a header, the parts, and an end mark with the number of frames.
It is written under a temporary name, synced, then renamed over the last one. A crash
while writing leaves the previous checkpoint, which stays valid: the journal only grows.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import pickle
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import google_crc32c
import msgpack

from market.journal import FRAME_HEADER, JournalCorrupt, JournalReader, journal_head, rotated_path, sync_dir
from serve.order_archive import ArchiveState
from serve.order_index import IndexState, OrderIndex, OrderView

logger = logging.getLogger("bidhive.serve")

MAGIC = b"BHIDX01\n"
FORMAT = 1  # raise when IndexState, OrderView or the archive's chunks change shape
# Parts small enough to pack in a few ms each: packing holds the GIL, and the service's
# round loop must not wait for the checkpoint's thread for longer than that.
VIEWS_PER_PART = 128
ROUNDS_PER_PART = 256  # up to 64 order ids each
KEYS_PER_PART = 5_000
CHUNKS_PER_PART = 64  # 4,096 archived orders, about 0.8 MB


def _layout() -> list[str]:
    """The pickled classes' fields: a checkpoint from code where they differ is not read
    (an old view would lack a new field), whether or not `FORMAT` was raised."""
    return [*(f.name for f in dataclasses.fields(OrderView)), "|", *(f.name for f in dataclasses.fields(IndexState)),
            "|", *OrderIndex.SCALAR_FIELDS]


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why."""


def checkpoint_path(journal: Path) -> Path:
    """Where a journal's checkpoint lives: beside its first file."""
    return journal.with_name(journal.name + ".index")


@dataclass(frozen=True)
class Cut:
    """Where a checkpoint sits in its journal."""

    head: bytes  # `journal_head`: which journal
    first_file: int  # the rotated file that follows the checkpoint...
    next_seq: int  # ...the seq of its first record...
    prev_bytes: int  # ...and the size of the file before it, finished at the cut


@dataclass(frozen=True)
class Rebuilt:
    """The index a start-up built, and how."""

    index: OrderIndex
    source: str  # "checkpoint" or "journal"
    records: int  # journal records applied
    seconds: float
    why_not: str = ""  # why a checkpoint on disk was not used

    def facts(self) -> dict[str, Any]:
        """For `/healthz`."""
        return {"from": self.source, "records": self.records, "seconds": round(self.seconds, 3)}


# -- writing ------------------------------------------------------------------------------
def _pickled(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _slices(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """`items` a list of `size` at a time, taken lazily (never all copied at once)."""
    it = iter(items)
    while part := list(itertools.islice(it, size)):
        yield part


def parts_of(state: IndexState) -> Iterator[list[Any]]:
    """The checkpoint's body, a part at a time (each built and packed in a short GIL hold)."""
    yield ["run", _pickled((state.ended, state.scalars))]
    for rounds in _slices(state.open_rounds, ROUNDS_PER_PART):
        yield ["rounds", _pickled(rounds)]
    for views in _slices(state.views.values(), VIEWS_PER_PART):
        yield ["views", _pickled(views)]
    for pairs in _slices(state.keys.items(), KEYS_PER_PART):
        yield ["keys", [x for pair in pairs for x in pair]]
    for chunks in state.archive.parts(CHUNKS_PER_PART):
        yield ["chunks", chunks]


def _put(file: BinaryIO, obj: Any) -> None:
    payload = msgpack.packb(obj, use_bin_type=True)
    file.write(FRAME_HEADER.pack(len(payload), google_crc32c.value(payload)) + payload)


def write_checkpoint(path: Path, cut: Cut, state: IndexState) -> int:
    """Writes the checkpoint atomically (temporary file, sync, rename); returns its bytes."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        file.write(MAGIC)
        header = {"format": FORMAT, "layout": _layout(), "head": cut.head, "first_file": cut.first_file,
                  "next_seq": cut.next_seq, "prev_bytes": cut.prev_bytes,
                  "archive": list(state.archive.counters), "open": [list(r) for r in state.archive.open]}
        _put(file, header)
        frames = 1
        for part in parts_of(state):
            _put(file, part)
            frames += 1
        _put(file, ["end", frames])
        file.flush()
        os.fsync(file.fileno())
        size = file.tell()
    os.replace(tmp, path)
    sync_dir(path.parent)
    return size


class CheckpointWriter:
    """Writes checkpoints on a thread of its own, newest first: a cut that arrives while
    one is being written replaces any still waiting (only the latest is worth having)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written = 0
        self.last_error = ""
        self._pending: tuple[Cut, IndexState] | None = None
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="bidhive-index-checkpoint", daemon=True)
        self._thread.start()

    def submit(self, cut: Cut, state: IndexState) -> None:
        """Queues a checkpoint."""
        with self._cv:
            self._pending = (cut, state)
            self._cv.notify()

    def close(self, timeout_s: float = 60.0) -> None:
        """Finishes the checkpoint waiting or being written, then stops."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._closed:
                    self._cv.wait()
                if self._pending is None:
                    return
                (cut, state), self._pending = self._pending, None
            self._write(cut, state)

    def _write(self, cut: Cut, state: IndexState) -> None:
        t0 = time.perf_counter()
        try:
            size = write_checkpoint(self.path, cut, state)
        except Exception as err:  # noqa: BLE001 - the journal is the record; no checkpoint only slows a restart
            self.last_error = f"{type(err).__name__}: {err}"
            logger.warning("order index checkpoint %s not written: %s", self.path, self.last_error)
            return
        self.written += 1
        logger.info("order index checkpoint at journal file %d (seq %d): %.1f MB in %.2f s",
                    cut.first_file, cut.next_seq, size / 1e6, time.perf_counter() - t0)


# -- reading ------------------------------------------------------------------------------
def _frames(data: bytes) -> Iterator[Any]:
    if not data.startswith(MAGIC):
        raise CheckpointError("not a bidhive index checkpoint")
    at = len(MAGIC)
    while at < len(data):
        if at + FRAME_HEADER.size > len(data):
            raise CheckpointError(f"cut short at byte offset {at}")
        length, crc = FRAME_HEADER.unpack_from(data, at)
        payload = data[at + FRAME_HEADER.size:at + FRAME_HEADER.size + length]
        if len(payload) != length:
            raise CheckpointError(f"cut short in the frame at byte offset {at}")
        if google_crc32c.value(payload) != crc:
            raise CheckpointError(f"damaged frame at byte offset {at}")
        yield msgpack.unpackb(payload, raw=False, strict_map_key=False)
        at += FRAME_HEADER.size + length


def read_checkpoint(path: Path) -> tuple[dict[str, Any], IndexState]:
    """The checkpoint's header and index state.

    Raises:
        CheckpointError: not a checkpoint, damaged, cut short or of another format.
    """
    frames = _frames(path.read_bytes())
    header = next(frames, None)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"format {header.get('format') if isinstance(header, dict) else None}, "
                              f"this version reads {FORMAT}")
    if header.get("layout") != _layout():
        raise CheckpointError("written by a version whose order views have other fields")
    run: tuple[Any, ...] = ()
    rounds: list[tuple[int, list[str]]] = []
    views: dict[str, OrderView] = {}
    keys: dict[str, str] = {}
    chunks: list[Any] = []
    count = 1
    for tag, body in frames:
        count += 1
        if tag == "run":
            run = pickle.loads(body)  # noqa: S301 - the service's own file, beside its journal
        elif tag == "rounds":
            rounds += pickle.loads(body)  # noqa: S301 - as below
        elif tag == "views":
            views.update((v.order_id, v) for v in pickle.loads(body))  # noqa: S301 - as above
        elif tag == "keys":
            keys.update(zip(body[::2], body[1::2]))
        elif tag == "chunks":
            chunks += ArchiveState.chunks_of(body)
        elif tag == "end":
            if body != count - 1 or not run:
                raise CheckpointError(f"{count - 1} frames before the end mark, which says {body}")
            archive = ArchiveState(tuple(header["archive"]), tuple(chunks), tuple(map(tuple, header["open"])))
            ended, scalars = run
            return header, IndexState(views, ended, tuple(rounds), scalars, keys, archive)
    raise CheckpointError("cut short: no end mark")


def rebuild_index(journal: Path, retain: int | None, hot: int) -> Rebuilt:
    """The order index over `journal`: from its checkpoint and the files after it where
    one fits, else from every record."""
    t0 = time.perf_counter()
    path, why_not = checkpoint_path(journal), ""
    if path.exists():
        try:
            header, state = read_checkpoint(path)
            index, records = _from_checkpoint(journal, header, state, retain, hot)
            return Rebuilt(index, "checkpoint", records, time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001 - whatever is wrong with it, the whole journal is the answer
            why_not = f"{type(err).__name__}: {err}" if not isinstance(err, CheckpointError) else str(err)
            logger.warning("order index checkpoint %s not used (%s): reading the whole journal", path, why_not)
    index = OrderIndex(retain, hot)
    records = _apply_all(index, JournalReader(journal))
    return Rebuilt(index, "journal", records, time.perf_counter() - t0, why_not)


def _apply_all(index: OrderIndex, records: Iterable[dict[str, Any]]) -> int:
    """Feeds `records` to `index`; how many there were."""
    count = 0
    for count, rec in enumerate(records, 1):
        index.apply(rec)
    return count


def _from_checkpoint(journal: Path, header: dict[str, Any], state: IndexState, retain: int | None,
                     hot: int) -> tuple[OrderIndex, int]:
    if state.settings != (retain, hot):
        raise CheckpointError(f"taken with retain_orders {state.settings[0]} and {state.settings[1]} live, "
                              f"now {retain} and {hot}")
    if bytes(header["head"]) != journal_head(journal):
        raise CheckpointError("it belongs to another journal (the first record differs)")
    first_file, next_seq = header["first_file"], header["next_seq"]
    before = rotated_path(journal, first_file - 1) if first_file > 0 else None
    if before is None or not before.is_file() or before.stat().st_size != header["prev_bytes"]:
        raise CheckpointError(f"the journal does not continue where it ends: file {first_file - 1} is not "
                              f"the {header['prev_bytes']} bytes it was")
    reader = iter(JournalReader(journal, start=(first_file, next_seq)))
    try:  # the seq check; an empty file has none, and the finished file's size stands for it
        first = next(reader, None)
    except JournalCorrupt as err:
        raise CheckpointError(f"the journal does not continue where it ends: {err}") from None
    index = OrderIndex.restored(state)
    if first is None:
        return index, 0
    return index, _apply_all(index, itertools.chain([first], reader))
