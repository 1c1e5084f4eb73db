"""Idempotency keys: one auction per key, the same answer for the same request.

Pure state machine; the service persists its transitions in the journal, so the
store rebuilds after a restart from the same records it wrote.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any


class KeyState(Enum):
    IN_FLIGHT = "in_flight"
    DONE = "done"


class IdempotencyConflict(Exception):
    """The request cannot proceed under this key; `status` is the HTTP code to answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class Entry:
    body_hash: str
    state: KeyState
    response: dict[str, Any] | None = None


def body_hash(body: dict[str, Any]) -> str:
    """A canonical hash of a request body (key order and whitespace do not matter)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyStore:
    """Key -> (body hash, state, response)."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def begin(self, key: str, digest: str) -> dict[str, Any] | None:
        """Claims `key` for a new request, or returns the stored answer to replay.

        Raises:
            IdempotencyConflict: 422 when the key was used with another body,
                409 while the first request with the key is still in flight.
        """
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = Entry(digest, KeyState.IN_FLIGHT)
            return None
        if entry.body_hash != digest:
            raise IdempotencyConflict(422, "Idempotency-Key was already used with a different request body")
        if entry.state is KeyState.IN_FLIGHT:
            raise IdempotencyConflict(409, "a request with this Idempotency-Key is still in flight")
        return entry.response

    def finish(self, key: str, response: dict[str, Any]) -> None:
        """Stores the answer for `key`."""
        entry = self._entries[key]
        entry.state, entry.response = KeyState.DONE, response

    def abandon(self, key: str) -> None:
        """Frees a key whose request failed before anything was decided."""
        entry = self._entries.get(key)
        if entry is not None and entry.state is KeyState.IN_FLIGHT:
            del self._entries[key]

    def restore(self, key: str, digest: str, response: dict[str, Any] | None) -> None:
        """Replays a journaled transition when rebuilding after a restart."""
        state = KeyState.IN_FLIGHT if response is None else KeyState.DONE
        self._entries[key] = Entry(digest, state, response)
