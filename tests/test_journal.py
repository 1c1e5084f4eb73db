"""Tests of the journal storage layer: codec, framing, recovery, rotation, crashes."""

from __future__ import annotations

import enum
import math
import os
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import google_crc32c
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import market.codec as codec_module
import market.journal as journal_module
from market.codec import NUMPY_ARRAY_EXT, NUMPY_SCALAR_EXT, pack, unpack
from market.journal import (
    FRAME_HEADER,
    MAGIC,
    MAX_RECORD_BYTES,
    JournalCorrupt,
    JournalError,
    JournalLocked,
    JournalReader,
    JournalWriter,
    NotAJournal,
    TornTailWarning,
    journal_files,
    journal_head,
    read_journal,
    rotated_path,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SIGNALING_NAN = struct.unpack("<d", bytes.fromhex("010000000000f07f"))[0]
NEGATIVE_NAN_WITH_PAYLOAD = struct.unpack("<d", bytes.fromhex("efbeadde0000f8ff"))[0]


# --------------------------------------------------------------------------- helpers


def assert_same(got: Any, expected: Any, where: str = "record") -> None:
    """Exact equality: same bits for floats (NaN too), same dtype for NumPy values.

    Tuples are expected back as lists and non-native byte order as native.
    """
    if isinstance(expected, np.ndarray):
        assert isinstance(got, np.ndarray), where
        native = expected.dtype.newbyteorder("=")
        assert got.dtype == native and got.shape == expected.shape, where
        assert got.tobytes() == expected.astype(native).tobytes(), where
    elif isinstance(expected, np.generic):
        assert type(got) is type(expected), where
        assert np.asarray(got).tobytes() == np.asarray(expected).tobytes(), where
    elif isinstance(expected, float):
        assert type(got) is float and struct.pack("<d", got) == struct.pack("<d", expected), where
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and list(got) == list(expected), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(got) is list and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same(g, e, f"{where}[{i}]")
    else:
        assert type(got) is type(expected) and got == expected, where


def sample_record(i: int) -> dict[str, Any]:
    """A record shaped like a cleared round, with NumPy values and awkward floats."""
    rng = np.random.default_rng(i)
    return {
        "round_id": i,
        "t": i * 0.25,
        "profile": "balanced",
        "order_ids": [f"o-{i}-{k}" for k in range(3)],
        "prices": rng.normal(10, 2, size=8),
        "etas": rng.uniform(0, 3600, size=8).astype(np.float32),
        "won": rng.random(8) > 0.5,
        "n_bidders": np.int64(17 + i),
        "reserve": np.float32(12.5),
        "nan": math.nan,
        "odd_floats": [SIGNALING_NAN, NEGATIVE_NAN_WITH_PAYLOAD, -0.0, math.inf, -math.inf, 5e-324],
        "shape": (2, 3),
    }


def write_records(path: Path, n: int, **writer_kwargs: Any) -> list[dict[str, Any]]:
    """Write ``n`` sample records; return them as the reader should see them."""
    expected = []
    with JournalWriter(path, **writer_kwargs) as writer:
        for i in range(n):
            fields = sample_record(i)
            assert writer.append("round_cleared", **fields) == i
            expected.append({"seq": i, "type": "round_cleared", **fields})
    return expected


def frame_offsets(path: Path) -> list[int]:
    """Byte offsets of every frame in one journal file (it must be intact)."""
    data = path.read_bytes()
    offsets, offset = [], len(MAGIC)
    while offset < len(data):
        offsets.append(offset)
        length, _ = FRAME_HEADER.unpack_from(data, offset)
        offset += FRAME_HEADER.size + length
    assert offset == len(data)
    return offsets


def raw_frame(record: dict[str, Any], payload: bytes | None = None) -> bytes:
    """A frame built by hand (to forge seq gaps and bad payloads with valid CRCs)."""
    payload = pack(record) if payload is None else payload
    return FRAME_HEADER.pack(len(payload), google_crc32c.value(payload)) + payload


def read_quietly(path: Path, **kwargs: Any) -> list[dict[str, Any]]:
    """Read a journal, failing the test if it warns about a torn tail."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", TornTailWarning)
        return list(read_journal(path, **kwargs))


# --------------------------------------------------------------------------- codec


ALL_DTYPES = ["<f8", ">f8", "<f4", "<f2", "|b1", "|i1", "<i2", ">i4", "<i8"]
ALL_DTYPES += ["|u1", "<u2", "<u4", "<u8", "<c8", ">c16"]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_codec_arrays_round_trip_exactly_in_any_dtype_and_layout(dtype: str) -> None:
    base = (np.arange(24) * 7 - 50).reshape(2, 3, 4).astype(dtype)
    values = {
        "c": base,
        "fortran": np.asfortranarray(base),
        "strided": base[:, ::2, 1:],
        "zero_d": np.asarray(base.flat[5]),
        "empty": base[:0],
        "scalar": base.flat[7],
    }
    got = unpack(pack(values))
    assert_same(got, values)
    assert got["strided"].flags.c_contiguous and got["strided"].flags.writeable


@settings(max_examples=150, deadline=None)
@given(dtype=st.sampled_from(ALL_DTYPES), shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=70),
       repeat=st.booleans())
@example(dtype="<i8", shape=(3,), repeat=True)  # bin 8
@example(dtype="<f8", shape=(40,), repeat=True)  # bin 16
@example(dtype="|u1", shape=(70_000,), repeat=True)  # bin 32
def test_property_array_bodies_are_what_msgpack_itself_frames(dtype: str, shape: tuple[int, ...], repeat: bool) -> None:
    """The codec packs each (dtype, shape)'s body head once and reuses it (a first use and
    a cached one here); the bytes must be exactly msgpack's own framing of the spec's body."""
    array = np.ones(shape, dtype=dtype)
    little = np.dtype(dtype).newbyteorder("<")
    want = msgpack.packb([little.str, list(shape), array.astype(little).tobytes()], use_bin_type=True)
    for _ in range(2 if repeat else 1):
        assert codec_module._numeric_body(array) == want


def test_codec_keeps_float_bits_and_numpy_scalar_types() -> None:
    record = {
        "nans": [math.nan, SIGNALING_NAN, NEGATIVE_NAN_WITH_PAYLOAD],
        "f64": np.float64(0.1),
        "f32": np.float32(0.1),
        "f16_nan": np.float16("nan"),
        "i64": np.int64(-(2**63)),
        "u64": np.uint64(2**64 - 1),
        "bool": np.bool_(True),
        "nan_array": np.array([math.nan, SIGNALING_NAN, -0.0]),
    }
    assert_same(unpack(pack(record)), record)


def test_codec_turns_tuples_and_plain_subclasses_into_plain_types() -> None:
    class Tier(enum.IntEnum):
        VIP = 1

    got = unpack(pack({"t": (1, (2, "x")), "tier": Tier.VIP, "nested": {"k": (np.int8(3),)},
                       "np_text": np.str_("abc"), "np_bytes": np.bytes_(b"xy")}))
    assert got == {"t": [1, [2, "x"]], "tier": 1, "nested": {"k": [np.int8(3)]}, "np_text": "abc", "np_bytes": b"xy"}
    assert type(got["tier"]) is int and type(got["np_text"]) is str and type(got["np_bytes"]) is bytes
    keyed = {"by_pair": {("o-1", 2): [1, 2], (1, (2, 3)): "x", 7: None}}
    assert unpack(pack(keyed)) == keyed  # tuple keys stay tuples: a list cannot be a key


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        ({1, 2}, "set"),
        (object(), "object"),
        (1 + 2j, "complex"),
        (np.array(["a"]), "<U1"),
        (np.datetime64(1, "s"), "datetime64"),
        (2**64, "64-bit range"),
        (-(2**63) - 1, "64-bit range"),
    ],
)
def test_codec_rejects_unknown_types_by_name(value: Any, type_name: str) -> None:
    with pytest.raises(TypeError, match=type_name):
        pack({"x": value})


def test_codec_rejects_non_records() -> None:
    with pytest.raises(TypeError, match="dict"):
        pack([1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="keys must be str"):
        pack({1: 2})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        unpack(msgpack.packb([1, 2]))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        pack({"a": 1})[:-1],
        pack({"a": 1}) + b"\x00",
        msgpack.packb({"a": msgpack.ExtType(9, b"")}),
        msgpack.packb({"a": msgpack.ExtType(NUMPY_ARRAY_EXT, msgpack.packb(["<f8", [3], b"\x00" * 8]))}),
        msgpack.packb({"a": msgpack.ExtType(NUMPY_ARRAY_EXT, msgpack.packb(["|O", [1], b"\x00" * 8]))}),
        msgpack.packb({"a": msgpack.ExtType(NUMPY_SCALAR_EXT, msgpack.packb(["<f8", [1], b"\x00" * 8]))}),
        msgpack.packb({"a": msgpack.ExtType(NUMPY_ARRAY_EXT, b"\x01")}),
    ],
)
def test_codec_rejects_malformed_bytes_with_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        unpack(data)


# --------------------------------------------------------------------------- hypothesis

_DTYPES = st.sampled_from(["<f8", ">f8", "<f4", "<f2", "|b1", "|i1", ">i4", "<i8", "|u1", "<u8", "<c8"])
_ARRAYS = _DTYPES.flatmap(
    lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
)
_SCALARS = _DTYPES.flatmap(lambda dt: hnp.arrays(np.dtype(dt).newbyteorder("="), ())).map(lambda a: a[()])
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | _ARRAYS
    | _SCALARS
)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
_FIELD_NAMES = st.text(max_size=10).filter(lambda k: k not in ("seq", "type"))
_RECORDS = st.dictionaries(_FIELD_NAMES, _VALUES, max_size=6)


@settings(max_examples=150, deadline=None)
@given(_RECORDS)
def test_property_codec_round_trips_any_record(record: dict[str, Any]) -> None:
    assert_same(unpack(pack(record)), record)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.text(min_size=1, max_size=12), _RECORDS), max_size=12),
    st.sampled_from([None, 200]),
)
def test_property_journal_round_trips_any_records(
    records: list[tuple[str, dict[str, Any]]], rotate_bytes: int | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.bhj"
        with JournalWriter(path, fsync="never", rotate_bytes=rotate_bytes) as writer:
            for kind, fields in records:
                writer.append(kind, **fields)
        expected = [{"seq": i, "type": kind, **fields} for i, (kind, fields) in enumerate(records)]
        assert_same(read_quietly(path), expected)


# --------------------------------------------------------------------------- round trip


def test_many_records_round_trip_with_numpy_and_nan(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    expected = write_records(path, 500, fsync="never")
    assert path.read_bytes()[: len(MAGIC)] == MAGIC
    reader = JournalReader(path)
    got = list(reader)
    assert_same(got, expected)
    assert reader.stats.records == 500 and reader.stats.last_seq == 499
    assert reader.stats.bytes == path.stat().st_size and reader.stats.torn_offset is None


def test_empty_journal_reads_as_no_records(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    JournalWriter(path).close()
    assert path.read_bytes() == MAGIC
    assert read_quietly(path) == []


def test_append_rejects_reserved_fields_and_bad_values_without_using_a_seq(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    with JournalWriter(path) as writer:
        with pytest.raises(ValueError, match="seq"):
            writer.append("x", seq=3)
        with pytest.raises(ValueError, match="type"):
            writer.append("x", type="y")
        with pytest.raises(TypeError, match="set"):
            writer.append("x", bad={1})
        assert writer.append("x", ok=1) == 0
    assert [r["seq"] for r in read_quietly(path)] == [0]
    with pytest.raises(ValueError, match="closed"):
        writer.append("x")

def test_append_record_wants_seq_then_type_and_leaves_no_gap_on_a_bad_value(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    with JournalWriter(path) as writer:
        with pytest.raises(ValueError, match="first two keys"):
            writer.append_record({"type": "x", "seq": None})  # the reader finds frames by a "seq" first
        with pytest.raises(ValueError, match="first two keys"):
            writer.append_record({"seq": None, "ok": 1, "type": "x"})
        with pytest.raises(TypeError, match="record type must be str, not int"):
            writer.append_record({"seq": None, "type": 7})
        with pytest.raises(TypeError, match="set"):
            writer.append_record({"seq": None, "type": "x", "bad": {1}})
        record = {"seq": None, "type": "x", "ok": 1}
        assert writer.append_record(record) == 0 and record["seq"] == 0
    assert read_quietly(path) == [{"seq": 0, "type": "x", "ok": 1}]



# --------------------------------------------------------------------------- torn tails


def test_truncation_at_every_offset_inside_the_last_record_keeps_the_prefix(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    expected = write_records(path, 4, fsync="never")
    data = path.read_bytes()
    last = frame_offsets(path)[-1]
    cut_path = tmp_path / "cut.bhj"

    cut_path.write_bytes(data[:last])  # cut exactly between records: nothing torn
    assert_same(read_quietly(cut_path), expected[:-1])

    for cut in range(last + 1, len(data)):
        cut_path.write_bytes(data[:cut])
        reader = JournalReader(cut_path)
        with pytest.warns(TornTailWarning, match=rf"byte offset {last} \(") as caught:
            got = list(reader)
        assert len(caught) == 1, cut
        assert_same(got, expected[:-1], f"cut at {cut}")
        assert reader.stats.torn_offset == last and reader.stats.bytes == last


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("crc mismatch", lambda data, last: data[:-1] + bytes([data[-1] ^ 0x01])),
        ("bad crc field", lambda data, last: data[: last + 4] + b"\0\0\0\0" + data[last + 8 :]),
        ("zero-filled tail", lambda data, last: data[:last] + b"\0" * 4096),
        ("garbage tail", lambda data, last: data[:last] + b"\xff\xfe garbage \x00" * 7),
        ("absurd length at end", lambda data, last: data[:last] + struct.pack("<II", 2**31, 0)),
        ("partial magic of a header", lambda data, last: data[:last] + MAGIC[:3]),
    ],
)
def test_damaged_last_record_with_nothing_good_after_is_a_torn_tail(
    tmp_path: Path, name: str, damage: Any
) -> None:
    path = tmp_path / "run.bhj"
    expected = write_records(path, 3, fsync="never")
    last = frame_offsets(path)[-1]
    path.write_bytes(damage(path.read_bytes(), last))
    with pytest.warns(TornTailWarning, match=rf"byte offset {last} "):
        got = list(read_journal(path))
    assert_same(got, expected[:-1])


def test_torn_file_header_is_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    path.write_bytes(MAGIC[:5])
    with pytest.warns(TornTailWarning, match="byte offset 0 "):
        assert list(read_journal(path)) == []


# --------------------------------------------------------------------------- corruption


def test_flipped_byte_anywhere_in_the_middle_record_is_corruption_naming_its_offset(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    write_records(path, 3, fsync="never")
    data = path.read_bytes()
    _, middle, last = frame_offsets(path)
    bad_path = tmp_path / "bad.bhj"
    for position in range(middle, last):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(data)
            damaged[position] ^= mask
            bad_path.write_bytes(bytes(damaged))
            with pytest.raises(JournalCorrupt, match=rf"bad\.bhj: .* at byte offset {middle}\b"):
                list(read_journal(bad_path))


def test_corruption_message_names_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    write_records(path, 3, fsync="never")
    data = bytearray(path.read_bytes())
    _, middle, _ = frame_offsets(path)
    data[middle + 20] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt) as info:
        list(read_journal(path))
    assert str(path) in str(info.value) and f"byte offset {middle}" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_absurd_length_field_is_corruption_not_an_allocation(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    write_records(path, 3, fsync="never")
    data = bytearray(path.read_bytes())
    _, middle, _ = frame_offsets(path)
    data[middle : middle + 4] = struct.pack("<I", MAX_RECORD_BYTES + 1)
    path.write_bytes(bytes(data))
    expected = rf"bad length field {MAX_RECORD_BYTES + 1} at byte offset {middle}"
    with pytest.raises(JournalCorrupt, match=expected):
        list(read_journal(path))


def test_seq_gap_is_corruption(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    frames = [raw_frame({"seq": seq, "type": "x"}) for seq in (0, 1, 3)]
    path.write_bytes(MAGIC + b"".join(frames))
    gap_offset = len(MAGIC) + len(frames[0]) + len(frames[1])
    with pytest.raises(JournalCorrupt, match=rf"byte offset {gap_offset} has seq 3, expected 2"):
        list(read_journal(path))


def test_undecodable_payload_with_valid_crc_is_corruption_even_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    first = raw_frame({"seq": 0, "type": "x"})
    path.write_bytes(MAGIC + first + raw_frame({}, payload=b"\xc1\xc1"))
    with pytest.raises(JournalCorrupt, match=rf"undecodable record at byte offset {len(MAGIC) + len(first)}"):
        list(read_journal(path))
    path.write_bytes(MAGIC + raw_frame({"type": "no seq"}))
    with pytest.raises(JournalCorrupt, match="lacks an int 'seq'"):
        list(read_journal(path))


def test_non_strict_reading_salvages_the_prefix(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    expected = write_records(path, 3, fsync="never")
    data = bytearray(path.read_bytes())
    _, middle, _ = frame_offsets(path)
    data[middle + 30] ^= 0xFF
    path.write_bytes(bytes(data))
    reader = JournalReader(path, strict=False)
    with pytest.warns(RuntimeWarning, match=f"byte offset {middle}"):
        got = list(reader)
    assert_same(got, expected[:1])
    assert reader.stats.corrupt is not None and f"byte offset {middle}" in reader.stats.corrupt


def test_not_a_journal(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a journal\n")
    with pytest.raises(NotAJournal) as info:
        list(read_journal(path))
    message = str(info.value)
    assert "\n" not in message and "not a bidhive journal" in message and str(path) in message
    with pytest.raises(NotAJournal):
        JournalWriter(path)
    assert path.read_text() == "hello, this is not a journal\n"  # never clobbered


def test_missing_journal_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(read_journal(tmp_path / "nope.bhj"))


# --------------------------------------------------------------------------- rotation


def test_rotation_splits_into_files_that_read_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    expected = write_records(path, 60, fsync="never", rotate_bytes=4_000)
    files = journal_files(path)
    assert len(files) > 3
    assert files == [path] + [tmp_path / f"run.bhj.{i}" for i in range(1, len(files))]
    assert all(f.stat().st_size <= 4_000 and f.read_bytes()[:8] == MAGIC for f in files)
    assert_same(read_quietly(path), expected)


def test_a_rotation_says_where_the_new_file_starts_and_a_reader_can_start_there(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    rotations: list[tuple[int, int, int]] = []
    with JournalWriter(path, fsync="never", rotate_bytes=4_000) as writer:
        writer.on_rotate = lambda index, seq, finished: rotations.append((index, seq, finished))
        for i in range(60):
            writer.append("round_cleared", **sample_record(i))
        files, size = writer.footprint()  # the buffered tail included, so the same once flushed
        writer.flush()
        assert (files, size) == (len(journal_files(path)), sum(f.stat().st_size for f in journal_files(path)))
        first = journal_files(path)[0]
        first.rename(tmp_path / "backup.bhj")  # an operator's backup moves a finished file away
        assert writer.footprint() == (files, size - (tmp_path / "backup.bhj").stat().st_size)
        (tmp_path / "backup.bhj").rename(first)
        assert not writer.rotate(min_bytes=4_000)  # the last file is smaller than that: kept
        assert writer.rotate() and not writer.rotate()  # a file with no record yet is not finished
    assert [r[0] for r in rotations] == list(range(1, files + 1)) and rotations[-1][1] == 60
    assert [r[2] for r in rotations] == [f.stat().st_size for f in journal_files(path)[:-1]]
    assert journal_files(path)[-1].read_bytes() == MAGIC
    everything = read_quietly(path)
    for index, seq, _ in rotations:
        assert [r["seq"] for r in JournalReader(path, start=(index, seq))] == list(range(seq, 60))
    index, seq, _ = rotations[-2]
    with pytest.raises(JournalCorrupt, match=f"has seq {seq}, expected {seq + 1}"):
        list(JournalReader(path, start=(index, seq + 1)))
    with pytest.raises(JournalCorrupt, match="no file 99"):
        list(JournalReader(path, start=(99, seq)))
    assert everything[0]["seq"] == 0
    other, same, empty = tmp_path / "other.bhj", tmp_path / "same.bhj", tmp_path / "empty.bhj"
    with JournalWriter(other) as writer:
        writer.append("round_cleared", **sample_record(5))
    write_records(same, 1)  # the head is the first record's frame header: same record, same head
    JournalWriter(empty).close()
    assert journal_head(path) != journal_head(other) and journal_head(path) == journal_head(same)
    assert journal_head(empty) == b""


def test_oversized_record_gets_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    with JournalWriter(path, rotate_bytes=100) as writer:
        writer.append("small")
        writer.append("big", blob=b"x" * 500)
        writer.append("small")
    assert [len(frame_offsets(f)) for f in journal_files(path)] == [1, 1, 1]
    assert [r["type"] for r in read_quietly(path)] == ["small", "big", "small"]


def test_missing_rotated_file_is_corruption(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    write_records(path, 60, fsync="never", rotate_bytes=4_000)
    rotated_path(path, 1).unlink()
    with pytest.raises(JournalCorrupt, match="not numbered"):
        list(read_journal(path))


def test_torn_record_in_a_rotated_file_before_the_last_is_corruption(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    write_records(path, 60, fsync="never", rotate_bytes=4_000)
    first = journal_files(path)[0]
    first.write_bytes(first.read_bytes()[:-3])
    with pytest.raises(JournalCorrupt, match="not the last journal file"):
        list(read_journal(path))


# --------------------------------------------------------------------------- reopening


def test_reopening_continues_seq_across_rotation(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    write_records(path, 30, fsync="never", rotate_bytes=4_000)
    n_files = len(journal_files(path))
    with JournalWriter(path, rotate_bytes=4_000) as writer:
        assert writer.next_seq == 30 and writer.current_path == journal_files(path)[-1]
        assert writer.append("restarted") == 30
        for _ in range(30):
            writer.append("more", pad=np.zeros(50))
    records = read_quietly(path)
    assert [r["seq"] for r in records] == list(range(61))
    assert records[30]["type"] == "restarted" and len(journal_files(path)) > n_files


def test_reopening_truncates_a_torn_tail_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    write_records(path, 5, fsync="never")
    last = frame_offsets(path)[-1]
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.warns(TornTailWarning, match=f"byte offset {last} "):
        writer = JournalWriter(path)
    with writer:
        assert writer.append("after_crash") == 4
    records = read_quietly(path)
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 4] and records[-1]["type"] == "after_crash"


def test_reopening_a_torn_header_or_an_empty_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    path.write_bytes(MAGIC[:3])
    with pytest.warns(TornTailWarning):
        writer = JournalWriter(path)
    with writer:
        writer.append("a")
    write_records(tmp_path / "r.bhj", 20, fsync="never", rotate_bytes=4_000)
    last_index = len(journal_files(tmp_path / "r.bhj"))
    rotated_path(tmp_path / "r.bhj", last_index).write_bytes(MAGIC)  # rotated, crashed before a record
    with JournalWriter(tmp_path / "r.bhj") as writer:
        assert writer.append("b") == 20
    assert [r["type"] for r in read_quietly(path)] == ["a"]
    assert [r["seq"] for r in read_quietly(tmp_path / "r.bhj")] == list(range(21))


def test_reopening_a_corrupt_journal_refuses(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    write_records(path, 3, fsync="never")
    data = bytearray(path.read_bytes())
    data[frame_offsets(path)[1] + 12] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt):
        JournalWriter(path)


def test_second_writer_is_locked_out(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    with JournalWriter(path) as writer:
        writer.append("a")
        with pytest.raises(JournalLocked):
            JournalWriter(path)
    with JournalWriter(path) as writer:  # released on close
        assert writer.append("b") == 1


def test_a_failed_rotation_names_its_cause_and_close_still_lets_go(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    writer = JournalWriter(path, rotate_bytes=100)
    writer.append("a", pad="x" * 40)
    stale = tmp_path / "run.bhj.1"
    stale.write_bytes(b"")  # a stale copy where the next file goes: the writer never clobbers one
    with pytest.raises(FileExistsError):
        writer.append("b", pad="y" * 40)
    with pytest.raises(JournalError, match="FileExistsError"):
        writer.append("c")
    assert not writer.closed
    writer.close()
    assert writer.closed
    stale.unlink()
    with JournalWriter(path) as again:  # the lock went with close
        assert again.append("b") == 1
    assert [r["type"] for r in read_journal(path)] == ["a", "b"]


def test_close_lets_go_of_the_journal_when_the_last_write_fails(tmp_path: Path) -> None:
    path = tmp_path / "run.bhj"
    writer = JournalWriter(path, fsync="never")
    writer.append("a")
    real = writer._file

    class FullDisk:
        closed = False

        def flush(self) -> None:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            real.close()
            raise OSError(28, "No space left on device")

    writer._file = FullDisk()  # type: ignore[assignment]
    with pytest.raises(OSError, match="No space"):
        writer.close()
    assert writer.closed
    with JournalWriter(path) as again:
        assert again.append("b") == 1


# --------------------------------------------------------------------------- fsync policy


def test_fsync_policies_sync_when_they_promise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[int] = []
    monkeypatch.setattr(journal_module, "_datasync", lambda fd: syncs.append(fd))
    now = [0.0]
    interval = JournalWriter(tmp_path / "i.bhj", fsync="interval", fsync_interval_s=0.2, clock=lambda: now[0])
    with interval as writer:
        syncs.clear()  # creating the file synced it
        for t in (0.0, 0.1, 0.19):
            now[0] = t
            writer.append("x")
        assert syncs == []
        now[0] = 0.2
        writer.append("x")
        assert len(syncs) == 1
        now[0] = 0.3
        writer.append("x")
        assert len(syncs) == 1
    assert len(syncs) == 2  # close syncs
    syncs.clear()
    with JournalWriter(tmp_path / "a.bhj", fsync="always") as writer:
        syncs.clear()
        for _ in range(3):
            writer.append("x")
        assert len(syncs) == 3
    syncs.clear()
    with JournalWriter(tmp_path / "n.bhj", fsync="never") as writer:
        writer.append("x")
        writer.flush()
    assert syncs == []
    assert len(read_quietly(tmp_path / "n.bhj")) == 1


# --------------------------------------------------------------------------- crashes

_KILLED_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from market.journal import JournalWriter

    path, policy, rotate = sys.argv[1], sys.argv[2], int(sys.argv[3]) or None
    writer = JournalWriter(path, fsync=policy, fsync_interval_s=0.005, rotate_bytes=rotate)
    prices = np.linspace(0.0, 1.0, 50)
    i = writer.next_seq
    while True:
        blob = bytes(1 << 18) if i % 10 == 9 else b""  # big frames can be torn by SIGKILL
        writer.append("tick", i=i, prices=prices * i, note="x" * (i % 300), blob=blob)
        if i % 25 == 0:
            print(i, flush=True)  # after append returns: durable under "always"
        i += 1
    """
)


def _run_and_kill(path: Path, policy: str, rotate: int, lines: int, extra_s: float) -> int:
    """Start a writer in a tight loop, SIGKILL it mid-write; return its last reported seq."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", _KILLED_WRITER, str(path), policy, str(rotate)]
    reported = -1
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            for _ in range(lines):
                line = proc.stdout.readline()
                assert line, f"writer died early with {proc.poll()}"
                reported = int(line)
            time.sleep(extra_s)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    return reported


@pytest.mark.parametrize(
    ("policy", "rotate"), [("always", 0), ("interval", 0), ("interval", 20_000), ("never", 0)]
)
def test_sigkilled_writer_leaves_a_readable_journal(tmp_path: Path, policy: str, rotate: int) -> None:
    path = tmp_path / "run.bhj"
    for round_ in range(3):
        reported = _run_and_kill(path, policy, rotate, lines=4, extra_s=0.003 * round_)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            records = list(read_journal(path))
        assert [r["seq"] for r in records] == list(range(len(records)))
        assert all(r["i"] == r["seq"] and r["prices"].shape == (50,) for r in records)
        if policy == "always":
            assert len(records) > reported, "a record acknowledged under fsync='always' was lost"
        # The next run reopens the same journal: torn tail truncated, seq continues.
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with JournalWriter(path) as writer:
            final = writer.append("done")
    assert [r["seq"] for r in read_quietly(path)] == list(range(final + 1))


# --------------------------------------------------------------------------- docs


def test_standalone_reader_in_the_docs_reads_a_rotated_journal(tmp_path: Path) -> None:
    doc = (REPO_ROOT / "docs" / "JOURNAL.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/JOURNAL.md", "exec"), namespace)  # noqa: S102 - our own doc
    path = tmp_path / "run.bhj"
    expected = write_records(path, 40, fsync="never", rotate_bytes=4_000)
    got = list(namespace["read_journal"](str(path)))
    assert len(journal_files(path)) > 1 and len(got) == len(expected)
    for record, want in zip(got, expected):
        assert record["seq"] == want["seq"] and record["type"] == want["type"]
        dtype, shape, data = record["prices"]
        assert np.frombuffer(data, dtype).reshape(shape).tolist() == want["prices"].tolist()
