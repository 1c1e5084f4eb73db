"""Full garbage collections whose pause does not grow with uptime, for long-running processes.

CPython's full (oldest-generation) collection walks every container object of the
process with the GIL held, so every request in flight waits for it. In the Serve
replica that is about 130,000 objects right after start-up (FastAPI, pydantic, Ray,
NumPy) plus about 17 more for every order taken and still live (order index, ledger,
idempotency keys; `serve.order_archive` turns older ended orders into bytes). Measured with in-process bidders at 200 orders/s, a full collection took 105 ms
(median of 12, 205 ms max) by 9,000 orders, and the p99 of the answers rose from 60
to 161 ms over three 15 s runs (docs/BENCHMARKS.md, "GC pauses").

`bound_gc_pauses` freezes (`gc.freeze`) what exists once the process is set up, and
again whatever survives each full collection, so a full collection walks only what
was allocated since the previous one.

What it gives up: a reference cycle among frozen objects is never collected (objects
freed by reference counting still are, frozen or not). What these processes keep for
long (modules, agents, the order index) is dropped rarely or never and holds no
cycles; `audit` counts what would have leaked, and /metrics shows the frozen count.
"""
from __future__ import annotations

import gc
import os
import time
from collections import deque
from typing import Any

#: Full-collection pauses (ms) not yet taken by `take_pauses`; bounded so that a
#: process nobody scrapes does not grow.
_PAUSES: deque[float] = deque(maxlen=4096)
_started = [0.0]


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    """Times full collections and freezes their survivors (the GIL serialises collections)."""
    if info.get("generation") != 2:
        return
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    _PAUSES.append((time.perf_counter() - _started[0]) * 1e3)
    gc.freeze()


def bound_gc_pauses() -> None:
    """Freezes the process as it is now and keeps freezing what survives full collections.

    Call it once the process is set up (imports done, long-lived state built); calling
    it again only freezes again. `BIDHIVE_GC_FREEZE=0` in the environment turns it off
    (to compare, or to rule it out when memory grows).
    """
    if os.environ.get("BIDHIVE_GC_FREEZE", "1") == "0":
        return
    gc.collect()
    gc.freeze()
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


def release() -> None:
    """Undoes `bound_gc_pauses`: no more freezing, and everything frozen is walked again."""
    if _on_gc in gc.callbacks:
        gc.callbacks.remove(_on_gc)
    gc.unfreeze()


def refreeze() -> None:
    """After dropping long-lived state that holds cycles (a restarted desk): walks what is
    frozen once more, so those cycles are collected, then freezes again. A no-op unless
    `bound_gc_pauses` is on. Costs one full collection of the whole process."""
    if _on_gc in gc.callbacks:
        gc.unfreeze()
        bound_gc_pauses()


def take_pauses() -> list[float]:
    """The full-collection pauses (ms) since the last call, oldest first."""
    out: list[float] = []
    while _PAUSES:
        out.append(_PAUSES.popleft())
    return out


def frozen() -> int:
    """Objects in the permanent generation."""
    return gc.get_freeze_count()


def audit() -> int:
    """Collects everything once, frozen objects included; returns the unreachable ones found.

    A non-zero result is cyclic garbage that `bound_gc_pauses` kept alive. The pause is
    as long as an unbounded full collection, so this is for tests and maintenance.
    """
    gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    return found
