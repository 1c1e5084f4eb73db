"""msgpack encoding of plain records, with exact NumPy support.

The journal stores every record through this module, and replay re-clears
rounds from what it decodes, so a value must come back *exactly* as it went in:
the same bits (NaN payloads and ``-0.0`` included) and, for NumPy values, the
same dtype. A ``float32`` price that came back as a Python ``float`` would make
replayed arithmetic differ from the live run.

Supported values:

- ``None``, ``bool``, ``int`` (64-bit range), ``float``, ``str``, ``bytes``,
  ``list`` and ``dict`` (nested freely; nested dicts may have any hashable
  keys of these types). Tuples are written as lists, so they come back as
  lists, except as dict keys, where they come back as tuples. Subclasses of
  the plain types (``IntEnum``, ``StrEnum``, ``OrderedDict``...) are written
  as their plain base type.
- NumPy scalars of a numeric dtype (bool, signed/unsigned int, float, complex):
  msgpack ext type ``NUMPY_SCALAR_EXT`` (2); they come back as the same NumPy
  scalar type (``np.float64`` stays ``np.float64``).
- NumPy arrays of those dtypes, any shape and memory layout: msgpack ext type
  ``NUMPY_ARRAY_EXT`` (1); they come back as a writable, C-contiguous array of
  the same dtype and shape.

Both ext types carry the same body: a msgpack array
``[dtype: str, shape: [int, ...], data: bin]`` where ``dtype`` is the NumPy
type string in little-endian form (``"<f8"``, ``"|b1"``, ``"<c8"``), shape is
empty for a scalar, and ``data`` is the raw little-endian element bytes in C
order. ``docs/JOURNAL.md`` has the full layout for outside readers.

Anything else raises ``TypeError`` naming the type, at write time, so an
undecodable record never reaches the disk.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import msgpack
import numpy as np

__all__ = ["NUMPY_ARRAY_EXT", "NUMPY_SCALAR_EXT", "pack", "unpack"]

NUMPY_ARRAY_EXT = 1
"""msgpack ext type code of a NumPy array."""

NUMPY_SCALAR_EXT = 2
"""msgpack ext type code of a NumPy scalar (same body as an array, empty shape)."""

# bool, signed int, unsigned int, float, complex. Everything else (object,
# strings, datetimes, structured) has no portable raw-byte form.
_NUMERIC_KINDS = frozenset("biufc")
# long double / complex long double: platform-specific layout, so not portable.
_UNPORTABLE_CHARS = frozenset("gG")


class _Packers(threading.local):
    """Reusable packers, one set per thread.

    ``msgpack.packb`` builds a new packer per call, which was most of the cost
    of a small record (29 µs of it vs 11 µs). Two packers, because the record's
    packer calls ``_default``, which packs array bodies mid-record.
    """

    def __init__(self) -> None:
        # strict_types sends np.float64 (a float subclass) and tuples to _default,
        # so the NumPy scalar keeps its dtype and the tuple becomes a list.
        self.record = msgpack.Packer(default=_default, use_bin_type=True, strict_types=True)
        self.body = msgpack.Packer(use_bin_type=True)


def pack(record: dict[str, Any], *, keys_checked: bool = False) -> bytes:
    """Encode one record as a msgpack map.

    Args:
        record: A dict with ``str`` keys whose values are the types listed in
            the module docstring.
        keys_checked: The caller guarantees every key is a ``str`` (the journal
            builds records from keyword arguments), so the per-key check is skipped.

    Returns:
        The msgpack bytes; ``unpack`` returns an equal record.

    Raises:
        TypeError: ``record`` is not a dict, has a non-str key, or holds a
            value of an unsupported type (the message names the type).
    """
    if not isinstance(record, dict):
        raise TypeError(f"a record must be a dict, not {type(record).__qualname__}")
    if not keys_checked:
        for key in record:
            if not isinstance(key, str):
                raise TypeError(f"record keys must be str, got {type(key).__qualname__} key {key!r}")
    try:
        return _packers.record.pack(record)
    except OverflowError as exc:  # an int msgpack's 64 bits cannot hold: an unsupported value too
        _packers.record.reset()
        raise TypeError(f"cannot encode an int outside the signed/unsigned 64-bit range ({exc})") from None
    except BaseException:
        _packers.record.reset()  # never leave a half-written record in the buffer
        raise


def unpack(data: bytes) -> dict[str, Any]:
    """Decode one record written by :func:`pack`.

    Args:
        data: Exactly one msgpack map.

    Returns:
        The record, with NumPy arrays and scalars restored.

    Raises:
        ValueError: ``data`` is not one well-formed record (truncated, trailing
            bytes, unknown ext type, inconsistent array body, not a map).
    """
    try:
        try:
            record = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
        except TypeError:  # a tuple dict key came back as a list, which cannot be a key
            record = msgpack.unpackb(data, object_pairs_hook=_dict_with_tuple_keys, ext_hook=_ext_hook, raw=False,
                                     strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"undecodable record: {exc or type(exc).__name__}") from exc
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a msgpack map, got {type(record).__name__}")
    return record


def _dict_with_tuple_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """Rebuild a map whose keys include lists (written from tuples) with tuple keys."""
    return {_as_tuple(key): value for key, value in pairs}


def _as_tuple(key: Any) -> Any:
    """A list key, recursively, as a tuple; anything else unchanged."""
    return tuple(_as_tuple(k) for k in key) if isinstance(key, list) else key


def _default(obj: Any) -> Any:
    """Translate a value msgpack cannot write natively (called by msgpack)."""
    if isinstance(obj, np.ndarray):
        return _ext(NUMPY_ARRAY_EXT, _numeric_body(obj))
    if isinstance(obj, (str, bytes)):  # np.str_ and np.bytes_ too: text, not numbers
        return str(obj) if isinstance(obj, str) else bytes(obj)
    if isinstance(obj, np.generic):
        return _ext(NUMPY_SCALAR_EXT, _numeric_body(np.asarray(obj)))
    for plain in (bool, int, float):
        if isinstance(obj, plain):
            return plain(obj)
    if isinstance(obj, (tuple, list)):
        return list(obj)
    if isinstance(obj, dict):
        return dict(obj)
    raise TypeError(f"cannot encode value of type {type(obj).__module__}.{type(obj).__qualname__}")


def _ext(code: int, body: bytes) -> msgpack.ExtType:
    """`msgpack.ExtType` without its argument checks (a third of its cost; a journal record
    holds a few arrays): the code is one of ours and the body is bytes."""
    return tuple.__new__(msgpack.ExtType, (code, body))


def _numeric_body(array: np.ndarray) -> bytes:
    """Body shared by both ext types: ``[dtype, shape, raw little-endian bytes]``.

    Everything before the raw bytes depends only on the dtype and the shape, so it is
    packed once per (dtype, shape) (`_body_head`); packing it per array was two thirds
    of an array's cost, and a journal writes a few small arrays per record.
    """
    key = (array.dtype, array.shape)
    known = _HEADS.get(key)
    if known is None:
        known = _body_head(array.dtype, array.shape)
        if len(_HEADS) < _MAX_HEADS:
            _HEADS[key] = known
    head, little = known
    return head + (array if little is None else array.astype(little)).tobytes()


_MAX_HEADS = 4096
_HEADS: dict[tuple[np.dtype, tuple[int, ...]], tuple[bytes, np.dtype | None]] = {}
"""Per (dtype, shape) written so far: the packed body up to the raw bytes, and the
dtype to convert to first (None when the array's bytes already are little-endian)."""


def _body_head(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[bytes, np.dtype | None]:
    """The body's msgpack bytes before the raw data: array header, dtype, shape, bin header.

    Raises:
        TypeError: not a portable numeric dtype.
    """
    if dtype.kind not in _NUMERIC_KINDS or dtype.char in _UNPORTABLE_CHARS:
        raise TypeError(f"cannot encode NumPy value of dtype {dtype} (only portable numeric dtypes)")
    little = dtype.newbyteorder("<")
    body = _packers.body
    head = b"\x93" + body.pack(little.str) + body.pack(list(shape)) + _bin_header(math.prod(shape) * dtype.itemsize)
    return head, None if little == dtype else little


def _bin_header(n_bytes: int) -> bytes:
    """msgpack's bin 8/16/32 header for that many bytes (what the packer writes before them)."""
    if n_bytes < 1 << 8:
        return b"\xc4" + n_bytes.to_bytes(1, "big")
    if n_bytes < 1 << 16:
        return b"\xc5" + n_bytes.to_bytes(2, "big")
    return b"\xc6" + n_bytes.to_bytes(4, "big")


def _ext_hook(code: int, body: bytes) -> np.ndarray | np.generic:
    """Rebuild a NumPy array or scalar from its ext body (called by msgpack).

    Replay decodes a few arrays per record, so the dtype is parsed and checked once
    per dtype string (`_checked_dtype`), and a native-order array is one copy of the
    raw bytes: writable, and independent of the record's buffer.
    """
    if code not in (NUMPY_ARRAY_EXT, NUMPY_SCALAR_EXT):
        raise ValueError(f"unknown msgpack ext type {code}")
    dtype_str, shape, raw = msgpack.unpackb(body, raw=False, use_list=True)
    dtype = _checked_dtype(dtype_str)
    if code == NUMPY_SCALAR_EXT and shape:
        raise ValueError(f"a NumPy scalar has an empty shape, got {shape}")
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"array body has {len(raw)} bytes; dtype {dtype_str} shape {shape} needs {expected}")
    if dtype.isnative and _plain_shape(shape):  # one call makes the array on the copy
        array = np.ndarray(shape, dtype, bytearray(raw))
    elif dtype.isnative:
        array = np.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
    else:  # astype to native order copies, so the result is writable and owns its data.
        array = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    return array[()] if code == NUMPY_SCALAR_EXT else array


def _plain_shape(shape: list[Any]) -> bool:
    """Whether every dimension is a non-negative int, as the writer makes them.

    Only then does ``np.ndarray(shape, ...)`` do exactly what ``reshape(shape)`` does;
    any other shape takes the reshape, and its error if it has one.
    """
    if type(shape) is not list:
        return False
    for n in shape:
        if type(n) is not int or n < 0:
            return False
    return True


_DTYPES: dict[str, np.dtype] = {}
"""Dtype strings already parsed and checked by `_checked_dtype` (at most a few dozen)."""


def _checked_dtype(dtype_str: str) -> np.dtype:
    """The portable numeric dtype an ext body names; ValueError for any other."""
    dtype = _DTYPES.get(dtype_str)
    if dtype is None:
        dtype = np.dtype(dtype_str)
        if dtype.kind not in _NUMERIC_KINDS or dtype.char in _UNPORTABLE_CHARS:
            raise ValueError(f"ext body has unsupported dtype {dtype_str!r}")
        _DTYPES[dtype_str] = dtype
    return dtype


_packers = _Packers()  # after _default, which its packers call
