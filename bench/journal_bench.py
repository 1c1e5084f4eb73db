"""Journal throughput: writes under each fsync policy, and reads.

The record is shaped like a cleared round (about ten fields and three float
arrays of 50 entries), so the numbers say how many rounds per second the
journal can take before it, not the auction, is the bottleneck.

Run ``python -m bench.journal_bench`` (prints JSON); results go to
``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from market.codec import pack
from market.journal import JournalReader, JournalWriter, journal_files

POLICIES = ("never", "interval", "always")
ALWAYS_RECORDS = 2_000  # one fdatasync each: keep the run short on slow disks
ALWAYS_BUDGET_S = 5.0  # and stop early where the disk is slower than 400 syncs/s
POOL_SIZE = 64  # distinct records cycled through, built before timing


def realistic_record(i: int, rng: np.random.Generator) -> dict[str, Any]:
    """A round_cleared-like record: ids, times, strings and three 50-float arrays."""
    return {
        "round_id": i,
        "t_open": 1_000.0 + i * 0.05,
        "t_close": 1_000.0 + i * 0.05 + 0.012,
        "profile": "balanced",
        "payment_rule": "second_score",
        "order_ids": [f"o-{i}-{k}" for k in range(4)],
        "bidders_asked": 50,
        "timed_out": int(rng.integers(0, 3)),
        "prices": rng.normal(8.0, 2.0, size=50),
        "etas_s": rng.uniform(600.0, 5_400.0, size=50),
        "scores": rng.normal(20.0, 5.0, size=50),
    }


def _write(
    path: Path, policy: str, records: list[dict[str, Any]], n: int, budget_s: float = float("inf")
) -> dict[str, float]:
    """Append ``n`` records (cycling the pool), or fewer if ``budget_s`` runs out, and close."""
    start = time.perf_counter()
    with JournalWriter(path, fsync=policy) as writer:  # type: ignore[arg-type]
        for i in range(n):
            writer.append("round_cleared", **records[i % len(records)])
            if time.perf_counter() - start > budget_s:
                break
        n = writer.next_seq
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in journal_files(path))
    return _rates(n, size, seconds)


def read_rate(path: Path) -> dict[str, float]:
    """Read every record back with full checks (CRC, decode, seq)."""
    start = time.perf_counter()
    reader = JournalReader(path)
    for _ in reader:
        pass
    seconds = time.perf_counter() - start
    return _rates(reader.stats.records, reader.stats.bytes, seconds)


def _rates(n: int, size: int, seconds: float) -> dict[str, float]:
    """Records/s and MB/s (10^6 bytes) of one timed run."""
    return {
        "records": n,
        "seconds": round(seconds, 4),
        "records_per_s": round(n / seconds),
        "mb_per_s": round(size / seconds / 1e6, 2),
    }


def run(n_records: int = 50_000, directory: str | None = None, *, quick: bool = False) -> dict[str, Any]:
    """Measure journal write and read throughput.

    Args:
        n_records: Records written under ``"never"`` and ``"interval"`` and
            read back; ``"always"`` writes ``min(2000, n_records)``, or
            fewer if that takes more than 5 s.
        directory: Where to put the journals (default: the temp dir); use a
            directory on the disk that will hold real journals.
        quick: A smoke run (``bidhive bench --quick``): 2,000 records at most.

    Returns:
        JSON-ready results: per-policy write rates, the read rate, the size
        of one record, and the machine.
    """
    if quick:
        n_records = min(n_records, 2_000)
    rng = np.random.default_rng(0)
    records = [realistic_record(i, rng) for i in range(POOL_SIZE)]
    sizes = [len(pack({"seq": i, "type": "round_cleared", **r})) for i, r in enumerate(records)]
    record_bytes = round(float(np.mean(sizes)))
    results: dict[str, Any] = {"benchmark": "journal", "record_bytes": record_bytes, "write": {}}
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        for policy in POLICIES:
            path = Path(tmp) / f"{policy}.bhj"
            if policy == "always":
                n, budget_s = min(ALWAYS_RECORDS, n_records), ALWAYS_BUDGET_S
            else:
                n, budget_s = n_records, float("inf")
            results["write"][policy] = _write(path, policy, records, n, budget_s)
        results["read"] = read_rate(Path(tmp) / "never.bhj")
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "system": platform.system(),
    }
    return results


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
