"""A restart's rebuild of the order index: from the whole journal, from the checkpoint the
last rotation left (a restart after a crash), and from the one a clean stop leaves.

Builds a service journal (an in-process desk, local bidders, metro fleet, every order with
an idempotency key) in files of `rotate_mb`, so the desk checkpoints its index at each
rotation as the service does (`serve.index_checkpoint`). The last rotation's checkpoint is
copied aside before the desk stops; stopping starts a new file and checkpoints again.
Then, alternating, the index is rebuilt the three ways (`rebuild_index`, wall and CPU
time), and the bench checks that all three answer alike.

The running service pays for a checkpoint in two places: the round loop waits while
`OrderIndex.state` runs under the desk's lock (the live views and the key map copied),
timed here on the full index; and the checkpoint's own thread packs and writes the file
(timed here in this thread). Run ``bidhive bench restart``.
"""
from __future__ import annotations

import gc
import json
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from bench.retention_bench import _journal
from bench.stats import machine
from market.journal import journal_files
from serve.desk import OrderDesk
from serve.index_checkpoint import Cut, checkpoint_path, parts_of, read_checkpoint, rebuild_index, write_checkpoint
from serve.order_index import HOT_ENDED, IndexState, OrderIndex

RETAIN = 1_000_000  # the service's default


def _rebuild(journal: Path, checkpoint: Path | None) -> tuple[OrderIndex, dict[str, Any]]:
    """One restart's rebuild, from `checkpoint` (put in place) or from the whole journal."""
    cp = checkpoint_path(journal)
    cp.unlink(missing_ok=True)
    if checkpoint is not None:
        shutil.copy(checkpoint, cp)
    gc.collect()
    t0, cpu0 = time.perf_counter(), time.process_time()
    rebuilt = rebuild_index(journal, RETAIN, HOT_ENDED)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return rebuilt.index, {"from": rebuilt.source, "records": rebuilt.records, "wall_s": round(wall, 3),
                           "cpu_s": round(cpu, 3)}


def _keep_last_rotations_checkpoint(journal: Path, to: Path) -> Callable[[OrderDesk], None]:
    """Before the desk stops: wait for the checkpoint of its last rotation, and copy it."""
    def keep(desk: OrderDesk) -> None:
        last, path, end = len(journal_files(journal)) - 1, checkpoint_path(journal), time.monotonic() + 120
        while not (path.exists() and read_checkpoint(path)[0]["first_file"] == last):
            if time.monotonic() > end:
                raise RuntimeError(f"no checkpoint at journal file {last} after 120 s")
            time.sleep(0.05)
        shutil.copy(path, to)
    return keep


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
        size = write_checkpoint(tmp / "probe.index", Cut(b"", 0, 0, 0), state)
        writes.append(time.perf_counter() - t0)
        parts.append(_longest_part_ms(state) / 1e3)
    return {"state_under_lock_ms": _ms(held), "write_ms": _ms(writes), "longest_part_ms": _ms(parts),
            "checkpoint_bytes_per_order": round(size / len(index))}


def run(quick: bool = False) -> dict[str, Any]:
    """Builds the journal, then measures both rebuilds twice each, alternating."""
    n_orders, rotate_mb = (3_000, 0.5) if quick else (120_000, 16.0)
    with tempfile.TemporaryDirectory(prefix="bh-restart-") as tmp:
        journal, crash, clean = Path(tmp) / "j.bhj", Path(tmp) / "last_rotation.index", Path(tmp) / "stop.index"
        t0 = time.perf_counter()
        _journal(journal, n_orders, rotate_mb=rotate_mb, before_close=_keep_last_rotations_checkpoint(journal, crash))
        build_s = time.perf_counter() - t0
        shutil.copy(checkpoint_path(journal), clean)
        files = journal_files(journal)
        arms: dict[str, Path | None] = {"journal": None, "last_rotation": crash, "clean_stop": clean}
        cuts = {arm: {k: read_checkpoint(path)[0][k] for k in ("first_file", "next_seq")}
                for arm, path in arms.items() if path is not None}
        runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
        indexes: dict[str, OrderIndex] = {}
        for _ in range(2):
            for arm, path in arms.items():
                indexes[arm], facts = _rebuild(journal, path)
                runs[arm].append(facts)
        alike = all(_alike(indexes["journal"], indexes[arm]) for arm in cuts)
        cost = _checkpoint_cost(indexes["journal"], Path(tmp))
        return {"benchmark": "restart", "machine": machine(), "orders": n_orders, "rotate_mb": rotate_mb,
                "journal_files": len(files), "journal_bytes": sum(f.stat().st_size for f in files),
                "journal_build_s": round(build_s, 1), "checkpoints": cuts, "rebuild": runs, "same_answers": alike,
                "checkpoint_cost": cost}


def main() -> None:
    print(json.dumps(run(), indent=2))


if __name__ == "__main__":
    main()
