"""The journal's cost to a simulation in instructions executed: a figure noise cannot move.

Wall-clock comparisons of whole runs scatter by ±20% on a shared 2-core machine, more
than the 10% they are meant to resolve. Instruction counts from valgrind's cachegrind
(no cache simulation) are the same from run to run, so this benchmark runs the same
seeded simulation (``weekday``, 2,500 orders, the default fleet, heuristic policy, no
exact-clearing samples) three times under it: set up only, run with a `NullRecorder`,
and run with a `JournalRecorder` (``interval`` fsync). The simulation's instructions
are null − setup; the journal's are journal − null.

What it leaves out: cache misses and the kernel's side of the writes (both real costs
that `bench.replay_bench`'s wall-clock figures include, with their noise).

Run ``python -m bench.journal_instructions`` or ``bidhive bench journal-instructions``
(about 3 minutes; needs ``valgrind`` on PATH).
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
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def _child(mode: str, n_orders: int) -> None:
    """The measured process: build the simulation and, unless ``setup``, run it."""
    from market.config import load_scenario
    from market.journal_recorder import JournalRecorder
    from market.recorder import NullRecorder, Recorder
    from market.simulator import SimSetup, Simulator
    from policies.registry import make_policy

    with tempfile.TemporaryDirectory() as tmp:
        recorder: Recorder = JournalRecorder(os.path.join(tmp, "run.bhj")) if mode == "journal" else NullRecorder()
        setup = SimSetup.build(load_scenario("weekday"), make_policy("heuristic"), seed=SEED, n_orders=n_orders,
                               recorder=recorder, exact_every=0)
        sim = Simulator(setup)
        if mode != "setup":
            sim.run()
        recorder.close()


def _instructions(mode: str, n_orders: int) -> int:
    """Instructions the whole child process executed, as cachegrind counts them."""
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
           sys.executable, "-m", "bench.journal_instructions", "--child", mode, str(n_orders)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict layouts every run
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    found = _REFS.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"cachegrind run '{mode}' failed (exit {done.returncode}): {done.stderr[-400:]}")
    return int(found.group(1).replace(",", ""))


def run(quick: bool = False) -> dict[str, Any]:
    """Counts the three runs (two at a time: counts do not depend on load) and compares them."""
    if shutil.which("valgrind") is None:
        raise RuntimeError("bench journal-instructions needs valgrind on PATH")
    n_orders = 200 if quick else ORDERS
    with ThreadPoolExecutor(max_workers=2) as pool:
        counts = dict(zip(MODES, pool.map(lambda m: _instructions(m, n_orders), MODES)))
    sim = counts["null"] - counts["setup"]
    journal = counts["journal"] - counts["null"]
    return {
        "benchmark": "journal-instructions",
        "machine": machine(),
        "orders": n_orders,
        "instructions": counts,
        "simulation_instructions": sim,
        "journal_instructions": journal,
        "overhead": round(journal / sim, 4),
        "target": 0.10,
    }


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
