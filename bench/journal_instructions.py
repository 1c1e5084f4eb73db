"""The journal's cost to a simulation in instructions executed: a figure noise cannot move.

Wall-clock comparisons of whole runs scatter by ±20% on a shared 2-core machine, more
than the 10% they are meant to resolve. Instruction counts from valgrind's cachegrind
(no cache simulation) are the same from run to run, so this benchmark runs the same
seeded simulation (`bench.replay_bench.overhead_day`: ``weekday``, 2,500 orders, the
default fleet, heuristic policy, no exact-clearing samples) three times under it: set up only, run with a `NullRecorder`,
and run with a `JournalRecorder` (``interval`` fsync). The simulation's instructions
are null − setup; the journal's are journal − null.

What it leaves out: cache misses and the kernel's side of the writes (both real costs
that `bench.replay_bench`'s wall-clock figures include, with their noise). With
``--cache-sim`` cachegrind also simulates the caches, and each run gets cachegrind's
cycle estimate, Ir + 10 x (I1 + D1 misses) + 100 x LL misses: a model, but one that
counts the journal's cache misses and its eviction of the simulation's lines, the
same every run.

Run ``python -m bench.journal_instructions [--cache-sim]`` or ``bidhive bench
journal-instructions`` (about 3 minutes, 6 with ``--cache-sim``; needs ``valgrind`` on PATH).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.stats import machine

ORDERS = 2500
SEED = 11
MODES = ("setup", "null", "journal")
_COUNTS = {name: re.compile(rf"{label}:\s+([\d,]+)") for name, label in
           (("ir", r"I\s+refs"), ("i1", r"I1\s+misses"), ("d1", r"D1\s+misses"), ("ll", r"LL misses"))}


def _child(mode: str, n_orders: int) -> None:
    """The measured process: build the replay bench's overhead day and, unless ``setup``, run it."""
    from bench.replay_bench import overhead_day
    from market.journal_recorder import JournalRecorder
    from market.recorder import NullRecorder, Recorder

    with tempfile.TemporaryDirectory() as tmp:
        recorder: Recorder = JournalRecorder(os.path.join(tmp, "run.bhj")) if mode == "journal" else NullRecorder()
        sim = overhead_day(recorder, n_orders, SEED)
        if mode != "setup":
            sim.run()
        recorder.close()


def _cost(mode: str, n_orders: int, cache_sim: bool) -> int:
    """Instructions the whole child process executed (or, with ``cache_sim``, cachegrind's
    cycle estimate for it)."""
    cmd = ["valgrind", "--tool=cachegrind", f"--cache-sim={'yes' if cache_sim else 'no'}",
           "--cachegrind-out-file=/dev/null", sys.executable, "-m", "bench.journal_instructions", "--child", mode,
           str(n_orders)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict layouts every run
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    found = {k: pattern.search(done.stderr) for k, pattern in _COUNTS.items()}
    if done.returncode != 0 or found["ir"] is None or (cache_sim and None in found.values()):
        raise RuntimeError(f"cachegrind run '{mode}' failed (exit {done.returncode}): {done.stderr[-400:]}")
    n = {k: int(m.group(1).replace(",", "")) for k, m in found.items() if m is not None}
    return n["ir"] + 10 * (n["i1"] + n["d1"]) + 100 * n["ll"] if cache_sim else n["ir"]


def run(quick: bool = False, cache_sim: bool = False) -> dict[str, Any]:
    """Counts the three runs (two at a time: counts do not depend on load) and compares them."""
    if shutil.which("valgrind") is None:
        raise RuntimeError("bench journal-instructions needs valgrind on PATH")
    n_orders = 200 if quick else ORDERS
    with ThreadPoolExecutor(max_workers=2) as pool:
        counts = dict(zip(MODES, pool.map(lambda m: _cost(m, n_orders, cache_sim), MODES)))
    sim = counts["null"] - counts["setup"]
    journal = counts["journal"] - counts["null"]
    unit = "estimated_cycles" if cache_sim else "instructions"
    return {
        "benchmark": "journal-instructions",
        "machine": machine(),
        "orders": n_orders,
        unit: counts,
        f"simulation_{unit}": sim,
        f"journal_{unit}": journal,
        "overhead": round(journal / sim, 4),
        "target": 0.10,
    }


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv, cache_sim="--cache-sim" in sys.argv), indent=2))
