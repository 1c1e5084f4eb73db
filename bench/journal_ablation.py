"""Where the journal's cost to a simulation goes, measured inside the run.

Timing the recorder on taped hook calls (`bench.replay_bench`, ``overhead.isolated``) gives
the journal about half of what whole runs show: in a real run the journal's code and data
are cold each time the simulation calls it. So this benchmark times the journal in place.
The same seeded day (`bench.replay_bench.overhead_day`: ``weekday``, 2,500 orders, no
exact-clearing samples) runs twice in one process, once with a `NullRecorder` and once
journaled, taking turns every ``CHUNK_ROUNDS`` rounds (the arm that goes first
alternates), timed in thread CPU time. Both arms trade the same rounds, so each chunk's
twin runs a few tens of milliseconds away, on the same machine state. Then it runs again
with one part of the journal's work taken out at a time:

- ``none``: both arms unjournaled (what the estimator reads when there is nothing to find);
- ``full``: the journal as ``bidhive simulate`` writes it: ``interval`` fsync, in bursts
  (`market.journal_batch`);
- ``at_once``: every record written in its hook, as the Ray and HTTP shells write it
  (the difference to ``full`` is what the bursts save);
- ``fsync_never``: no syncs;
- ``no_encode``: records built and framed, but the payload written is a constant instead
  of the codec's encoding (the difference to ``at_once`` is the codec's share);
- ``no_writer``: records built by the recorder, then dropped (the recorder's own share).

``fsync_never``, ``no_encode`` and ``no_writer`` write at once, so ``at_once`` is theirs
to compare with.

Each variant runs ``--reps`` times in fresh processes, variants interleaved; the figures
are each variant's runs and their median.

Run ``python -m bench.journal_ablation [--reps N]`` or ``bidhive bench journal-ablation``
(about 15 s per repetition).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import market.journal as journal_module
from bench.replay_bench import overhead_day
from bench.stats import machine
from market.journal_batch import simulation_journal
from market.journal_recorder import JournalRecorder
from market.recorder import NullRecorder, Recorder

VARIANTS = ("none", "full", "at_once", "fsync_never", "no_encode", "no_writer")
CHUNK_ROUNDS = 64
ORDERS = 2500
SEED = 11
_CONSTANT_PAYLOAD = b"\x81\xa3seq\x00" * 100  # 600 bytes, about a record; the file is never read back


def _recorder(variant: str, path: Path) -> Recorder:
    """The second arm's recorder, with the variant's part of the journal taken out (``no_encode``
    patches the journal module for good: each run has a process of its own)."""
    if variant == "none":
        return NullRecorder()
    if variant == "full":
        return simulation_journal(path)
    recorder = JournalRecorder(path, fsync="never" if variant == "fsync_never" else "interval")
    if variant == "no_encode":  # the writer looks `pack` up in its module on every record
        journal_module.pack = lambda record, keys_checked=False: _CONSTANT_PAYLOAD  # type: ignore[assignment]
    elif variant == "no_writer":
        recorder.writer.append_record = lambda record: 0  # type: ignore[method-assign]
    return recorder


def _turns(steps: dict[str, Iterator[Any]]) -> dict[str, float]:
    """Drains the arms' round generators in turns of ``CHUNK_ROUNDS``; thread CPU seconds per arm."""
    spent = dict.fromkeys(steps, 0.0)
    running, order = set(steps), list(steps)
    while running:
        for name in [n for n in order if n in running]:
            start = time.thread_time()
            for _ in range(CHUNK_ROUNDS):
                if next(steps[name], None) is None:
                    running.discard(name)
                    break
            spent[name] += time.thread_time() - start
        order.reverse()
    return spent


def in_place_overhead(variant: str) -> float:
    """One run: the variant's arm's CPU time over the unjournaled arm's, minus one."""
    with tempfile.TemporaryDirectory() as tmp:
        arms = {"null": overhead_day(NullRecorder(), ORDERS, SEED),
                "journal": overhead_day(_recorder(variant, Path(tmp) / "run.bhj"), ORDERS, SEED)}
        spent = _turns({name: sim.rounds() for name, sim in arms.items()})
    return spent["journal"] / spent["null"] - 1.0


def run(quick: bool = False, reps: int = 3) -> dict[str, Any]:
    """Every variant ``reps`` times (once if ``quick``), each run in a fresh process, variants
    interleaved."""
    reps = 1 if quick else reps
    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(reps):
        for variant in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
            out = subprocess.run([sys.executable, "-m", "bench.journal_ablation", "--child", variant],
                                 capture_output=True, text=True, check=True)
            runs[variant].append(float(out.stdout))
    return {
        "benchmark": "journal-ablation",
        "machine": machine(),
        "day": {"scenario": "weekday", "orders": ORDERS, "seed": SEED, "exact_every": 0},
        "chunk_rounds": CHUNK_ROUNDS,
        "overhead": {v: {"median": round(statistics.median(r), 4), "runs": [round(x, 4) for x in r]}
                     for v, r in runs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(in_place_overhead(args.child))
    else:
        print(json.dumps(run(reps=args.reps), indent=2))


if __name__ == "__main__":
    main()
