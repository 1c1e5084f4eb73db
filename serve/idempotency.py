"""Idempotency keys: one auction per key, the same answer for the same request.

Pure state machine. The journal holds every key with its order, so the order index
answers for a key once its request is journaled; this store covers the moment before
that, and a restart needs nothing from it.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any


class IdempotencyConflict(Exception):
    """The request cannot proceed under this key; `status` is the HTTP code to answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


#: A placed key's body hash and answer (None while its order is pending), or None for a new key.
Lookup = Callable[[str], "tuple[str, dict[str, Any] | None] | None"]


def body_hash(body: dict[str, Any]) -> str:
    """A canonical hash of a request body (key order and whitespace do not matter)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyStore:
    """Keys claimed by a request whose order is not yet journaled and ended.

    Once an order has ended, the order index answers for its key (`placed`), so the
    store itself only holds the keys in flight and stays small however long the
    service runs.

    Args:
        placed: the journal's view of a key (`OrderIndex.by_key`).
    """

    def __init__(self, placed: Lookup = lambda key: None) -> None:
        self._claims: dict[str, str] = {}  # key -> body hash
        self._placed = placed

    def __len__(self) -> int:
        return len(self._claims)

    def begin(self, key: str, digest: str) -> dict[str, Any] | None:
        """Claims `key` for a new request, or returns the stored answer to replay.

        Raises:
            IdempotencyConflict: 422 when the key was used with another body,
                409 while the first request with the key is still in flight.
        """
        claimed = self._claims.get(key)
        placed = (claimed, None) if claimed is not None else self._placed(key)
        if placed is None:
            self._claims[key] = digest
            return None
        stored_digest, answer = placed
        if stored_digest != digest:
            raise IdempotencyConflict(422, "Idempotency-Key was already used with a different request body")
        if answer is None:
            raise IdempotencyConflict(409, "a request with this Idempotency-Key is still in flight")
        return answer

    def release(self, key: str) -> None:
        """Drops the claim on `key`: its order has ended (and `placed` answers for it now), or
        its request failed before anything was decided (and the key is free again)."""
        self._claims.pop(key, None)
