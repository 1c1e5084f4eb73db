"""Ended orders, compressed: what lets the service answer old orders and keys in bounded memory.

An ended order as live Python objects (its view, the dicts of its award and timeline)
takes about 3.8 KB; the same order as one zlib-compressed msgpack blob takes about
0.25 KB, and a bytes object is nothing the garbage collector walks. The order index
moves orders here once no journal record can still touch them.

The blobs share a preset dictionary: the first order archived. Orders of one service
repeat the same field names, event names and bidder ids, so that first order is what
makes a 1.2 KB record compress to a fifth instead of a half.
"""
from __future__ import annotations

import zlib
from collections import deque
from typing import Any

import msgpack

# fast; raw deflate (no header: the dictionary is known); a 4 KB window covers the dictionary
# and a record, and sets up in 13 µs against 17 µs for the default 32 KB (1.2 KB records)
_LEVEL, _WBITS, _MEM_LEVEL = 1, -12, 8


class OrderArchive:
    """Order id -> (idempotency key, body hash, `GET /orders/{id}` body), oldest first."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}
        self._age: deque[str] = deque()
        self._zdict: bytes | None = None

    def __len__(self) -> int:
        return len(self._blobs)

    def __contains__(self, order_id: object) -> bool:
        return order_id in self._blobs

    def put(self, order_id: str, key: str | None, digest: str | None, detail: dict[str, Any]) -> None:
        """Archives an ended order (the newest)."""
        packed = msgpack.packb(key) + msgpack.packb(digest) + msgpack.packb(detail)
        if self._zdict is None:
            self._zdict = packed
        deflate = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, _MEM_LEVEL, zlib.Z_DEFAULT_STRATEGY, self._zdict)
        self._blobs[order_id] = deflate.compress(packed) + deflate.flush()
        self._age.append(order_id)

    def get(self, order_id: str) -> tuple[str | None, str | None, dict[str, Any]] | None:
        """The order's key, body hash and detail, or None if it is not here."""
        blob = self._blobs.get(order_id)
        if blob is None:
            return None
        key, digest, detail = self._unpacker(blob)
        return key, digest, detail

    def pop_oldest(self) -> tuple[str, str | None]:
        """Forgets the oldest order; returns its id and key."""
        order_id = self._age.popleft()
        key = next(self._unpacker(self._blobs.pop(order_id)))
        return order_id, key

    def _unpacker(self, blob: bytes) -> msgpack.Unpacker:
        inflate = zlib.decompressobj(_WBITS, self._zdict or b"")
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(inflate.decompress(blob) + inflate.flush())
        return unpacker
