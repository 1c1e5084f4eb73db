"""A restart's rebuild of the order index, from the whole journal and from the checkpoint
the last rotation left; and what taking a checkpoint costs the running service.

Builds a service journal (an in-process desk, local bidders, metro fleet, every order with
an idempotency key) in files of `rotate_mb`, so the desk checkpoints its index at each
rotation as the service does (`serve.index_checkpoint`). Then, alternating, rebuilds the
index both ways (`rebuild_index`, wall and CPU time) and checks that both answer alike.

The running service pays for a checkpoint in two places: the round loop waits while
`OrderIndex.state` runs under the desk's lock (the live views pickled, the key map
copied), timed here on the full index; and the checkpoint's own thread packs and writes
the file (timed here in this thread). Run ``bidhive bench restart``.
"""
from __future__ import annotations

import gc
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack

from bench.retention_bench import _journal
from bench.stats import machine
from market.journal import journal_files
from serve.config import MB
from serve.index_checkpoint import Cut, checkpoint_path, parts_of, read_checkpoint, rebuild_index, write_checkpoint
from serve.order_index import HOT_ENDED, IndexState, OrderIndex

RETAIN = 1_000_000  # the service's default


def _rebuild(journal: Path, use_checkpoint: bool) -> tuple[OrderIndex, dict[str, Any]]:
    """One restart's rebuild; the checkpoint is moved aside for the whole-journal arm."""
    cp = checkpoint_path(journal)
    aside = cp.with_name(cp.name + ".aside")
    if not use_checkpoint:
        cp.rename(aside)
    gc.collect()
    try:
        t0, cpu0 = time.perf_counter(), time.process_time()
        rebuilt = rebuild_index(journal, RETAIN, HOT_ENDED)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        if not use_checkpoint:
            aside.rename(cp)
    return rebuilt.index, {"from": rebuilt.source, "records": rebuilt.records, "wall_s": round(wall, 3),
                           "cpu_s": round(cpu, 3)}


def _alike(a: OrderIndex, b: OrderIndex, sample: int = 500) -> bool:
    """Both indexes keep the same orders and keys and answer a sample of them alike."""
    if (len(a), a.forgotten, a.keys) != (len(b), b.forgotten, b.keys):
        return False
    ids = random.Random(0).sample(list(a.keys.values()), min(sample, len(a.keys)))
    return all(json.dumps(a.detail(oid)) == json.dumps(b.detail(oid)) for oid in ids)


def _longest_part_ms(state: IndexState) -> float:
    """The longest the checkpoint's thread holds the GIL in one go: building and packing a part."""
    longest, parts = 0.0, parts_of(state)
    while True:
        t0 = time.perf_counter()
        part = next(parts, None)
        if part is None:
            return round(longest * 1e3, 2)
        msgpack.packb(part, use_bin_type=True)
        longest = max(longest, time.perf_counter() - t0)


def _ms(samples: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(samples) * 1e3, 2), "max": round(max(samples) * 1e3, 2)}


def _checkpoint_cost(index: OrderIndex, tmp: Path, repeats: int = 5) -> dict[str, Any]:
    """The wait under the desk's lock (`state`), and the checkpoint thread's pack and write."""
    held, writes, parts, size = [], [], [], 0
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        state = index.state()
        held.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        size = write_checkpoint(tmp / "probe.index", Cut(b"", 0, 0), state)
        writes.append(time.perf_counter() - t0)
        parts.append(_longest_part_ms(state) / 1e3)
    return {"state_under_lock_ms": _ms(held), "write_ms": _ms(writes), "longest_part_ms": _ms(parts),
            "checkpoint_bytes_per_order": round(size / len(index))}


def run(quick: bool = False) -> dict[str, Any]:
    """Builds the journal, then measures both rebuilds twice each, alternating."""
    n_orders, rotate_mb = (3_000, 0.5) if quick else (120_000, 16.0)
    with tempfile.TemporaryDirectory(prefix="bh-restart-") as tmp:
        journal = Path(tmp) / "j.bhj"
        t0 = time.perf_counter()
        _journal(journal, n_orders, rotate_mb=rotate_mb)
        build_s = time.perf_counter() - t0
        files = journal_files(journal)
        header, _ = read_checkpoint(checkpoint_path(journal))
        runs: dict[str, list[dict[str, Any]]] = {"journal": [], "checkpoint": []}
        indexes: dict[str, OrderIndex] = {}
        for _ in range(2):
            for arm in runs:
                indexes[arm], facts = _rebuild(journal, arm == "checkpoint")
                runs[arm].append(facts)
        alike = _alike(indexes["journal"], indexes["checkpoint"])
        cost = _checkpoint_cost(indexes["checkpoint"], Path(tmp))
        return {"bench": "restart", "machine": machine(), "orders": n_orders, "rotate_mb": rotate_mb,
                "journal_files": len(files), "journal_bytes": sum(f.stat().st_size for f in files),
                "journal_build_s": round(build_s, 1), "checkpoint_next_seq": header["next_seq"],
                "checkpoint_first_file": header["first_file"], "rebuild": runs, "same_answers": alike,
                "checkpoint_cost": cost, "rotate_bytes": int(rotate_mb * MB)}


def main() -> None:
    print(json.dumps(run(), indent=2))


if __name__ == "__main__":
    main()
