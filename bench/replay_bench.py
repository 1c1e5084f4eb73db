"""Replay throughput and the journal's cost to a simulation.

Three figures:

- ``read``: records/s (and MB/s) reading a real auction journal back with full checks.
- ``reclear``: single-order rounds/s re-cleared from a journal of a 50-bidder fleet
  (``bench.fleets.synthetic_fleet(50)``, scenario ``weekday`` with ``max_batch: 1``):
  end to end (``market.replay.replay``: read, clear, compare, KPIs) in wall and in CPU
  time (the machine is shared: CPU time is the steadier single-process figure), and
  end to end again with the re-clearing shared by ``PARALLEL_WORKERS`` processes
  (``replay(..., workers=N)``, wall time). Replay clears one-order rounds as columns,
  a chunk of ``CHUNK_ROUNDS`` at a time, so the parts are: ``read`` (records, orders and
  logged rounds, as replay reads them), ``columns`` (re-clearing and comparing the
  chunks as columns, on rounds already read) and the rest (KPIs, the per-round path for
  the rounds the columns leave to it, the loop). The per-round path's own parts are
  kept for comparison: ``per_round_read_rebuild`` (``JournalReplay.rounds()``, each round
  rebuilt) and ``per_round_clear_only`` (``build_book`` + the mechanism per round).
- ``overhead``: a simulation (``weekday``, default fleet, the same seed) with a
  `NullRecorder` against the same run journaled as ``bidhive simulate`` journals it (in
  bursts, `market.journal_batch.simulation_journal`) under each fsync policy, and with
  every record written in its hook (``interval_at_once``, as the Ray and HTTP shells
  write), interleaved
  in one process, in alternating order; each figure is the best of its runs (the machine
  is shared, so the minimum is the least noisy estimate), and
  ``overhead_wall_median_of_reps`` is the median of each repetition's ratio to the null
  run beside it (slow drift of the machine hits both runs of a repetition alike).
  ``overhead.isolated`` times the journal's own work per round without the simulation's
  noise: the run's recorder hook calls are taped once and replayed into a
  `JournalRecorder` in a loop. Hot in the cache there, the journal costs about 0.6x of
  what a journal written at once costs inside a run (`bench.journal_ablation`); the
  bursts `simulate` writes in bring the two close. Either way this figure is a floor.
  ``overhead.simultaneous`` runs the null and the journaled simulation at the same time
  in two processes, pair after pair, so both meet the same machine (`_simultaneous`);
  its median of pairs is the target's figure.

The issue states the target as a share of ``simulate``'s throughput: the journaled run
keeps at least 90% of the orders per second of the run without it, a throughput loss
of ``1 - t_null / t_journal``. The ``overhead_*`` fields are added run time
(``t_journal / t_null - 1``), a stricter reading (10% of throughput lost is 11.1% of
added time); both are printed, and ``met`` follows the issue's.

Run ``python -m bench.replay_bench`` (prints JSON) or ``bidhive bench replay``.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bench.fleets import synthetic_fleet
from bench.journal_bench import read_rate
from bench.stats import machine
from market.journal import journal_files
from market.journal_batch import simulation_journal
from market.journal_recorder import JournalRecorder
from market.recorder import NullRecorder, Recorder
from market.replay import CHUNK_ROUNDS, JournalReplay, ReadStep, by_columns, clear, make_mechanism, replay
from market.replay_columns import OneOrderColumns
from market.simulator import SimSetup, Simulator
from policies.registry import make_policy

T = TypeVar("T")

TARGET_ROUNDS_PER_S = 20_000
TARGET_OVERHEAD = 0.10
FSYNC_POLICIES = ("never", "interval", "always")
AT_ONCE = "interval_at_once"
"""The `_overhead` arm whose journal writes every record in its hook (no bursts)."""
PARALLEL_WORKERS = 2


def _single_order_setup(n_orders: int, recorder: Recorder, seed: int = 7) -> SimSetup:
    from market.config import load_scenario

    sc = load_scenario("weekday")
    sc = sc.model_copy(update={"round": sc.round.model_copy(update={"max_batch": 1})})
    return SimSetup.build(sc, make_policy("heuristic"), seed=seed, n_orders=n_orders, recorder=recorder,
                          fleet_cfg=synthetic_fleet(50), exact_every=0)


def _read(path: Path) -> dict[str, Any]:
    """Read rate of the journal (journal_bench's measurement) plus its size."""
    return {"mb": round(sum(f.stat().st_size for f in journal_files(path)) / 1e6, 2), **read_rate(path)}


def _reclear(path: Path, reps: int) -> dict[str, Any]:
    """End to end (wall and CPU), then the parts: read, columns, and the per-round path's own.

    Each repetition times every figure once, one after the other, and each figure is its
    best repetition: on a shared machine the parts are then taken at about the load the
    end-to-end figure was, so they add up to it.
    """
    runs, parallel_runs = [], []
    read_s = columns_s = rebuild_s = clear_s = float("inf")
    for _ in range(reps):
        runs.append(_timed_replay(path))
        parallel_runs.append(_timed_replay(path, PARALLEL_WORKERS))
        t, steps = _timed(lambda: _read_steps(path))
        read_s = min(read_s, t)
        t, verified = _timed(lambda: _columns(steps))
        columns_s = min(columns_s, t)
        t, rounds = _timed(lambda: list(JournalReplay(path).rounds()))
        rebuild_s = min(rebuild_s, t)
        header = steps[0].header
        assert header is not None
        mech = make_mechanism(header.mechanism)
        t, _ = _timed(lambda: [clear(header, rr.rnd, rr.quotes, rr.profile, mech) for rr in rounds])
        clear_s = min(clear_s, t)
    report, seconds, _ = min(runs, key=lambda r: r[1])
    cpu_seconds = min(r[2] for r in runs)
    parallel, parallel_s, _ = min(parallel_runs, key=lambda r: r[1])
    n = len(rounds)
    sizes = [rr.rnd.size for rr in rounds]
    return {
        "bidders": len(header.bidder_ids),
        "rounds": n,
        "orders_per_round": round(sum(sizes) / max(1, n), 3),
        "quotes_per_round": round(sum(len(rr.quotes) for rr in rounds) / max(1, n), 2),
        "chunk_rounds": CHUNK_ROUNDS,
        "by_columns_share": round(verified / max(1, n), 4),
        "verified": report.ok and parallel.ok and parallel.verified_rounds == report.verified_rounds,
        "end_to_end_rounds_per_s": round(report.rounds / seconds),
        "end_to_end_cpu_rounds_per_s": round(report.rounds / cpu_seconds),
        f"end_to_end_{PARALLEL_WORKERS}_workers_rounds_per_s": round(parallel.rounds / parallel_s),
        "read_rounds_per_s": round(n / read_s),
        "columns_rounds_per_s": round(n / columns_s),
        "read_rebuild_rounds_per_s": round(n / rebuild_s),
        "clear_only_rounds_per_s": round(n / clear_s),
        "us_per_round": {
            "end_to_end": round(seconds / n * 1e6, 1),
            "read": round(read_s / n * 1e6, 1),
            "columns": round(columns_s / n * 1e6, 1),
            "kpis_and_rest": round(max(0.0, seconds - read_s - columns_s) / n * 1e6, 1),
            "per_round_read_rebuild": round(rebuild_s / n * 1e6, 1),
            "per_round_clear_only": round(clear_s / n * 1e6, 1),
        },
    }


def _timed(run: Callable[[], T]) -> tuple[float, T]:
    """Wall seconds of one run, and its result."""
    t0 = time.perf_counter()
    out = run()
    return time.perf_counter() - t0, out


def _read_steps(path: Path) -> list[ReadStep]:
    """Every round of the journal as replay reads it (records, orders, logged rounds), each settled."""
    journal = JournalReplay(path)
    steps = []
    for step in journal.steps():
        journal.settle(step)
        if step.round is not None:
            steps.append(step)
    return steps


def _columns(steps: list[ReadStep]) -> int:
    """Re-clears the rounds as columns, chunk by chunk as replay does; how many the columns verified."""
    state = OneOrderColumns()
    verified = 0
    for start in range(0, len(steps), CHUNK_ROUNDS):
        ok, _ = by_columns(steps[start:start + CHUNK_ROUNDS], state)
        verified += sum(ok)
    return verified


def _timed_replay(path: Path, workers: int = 1) -> tuple[Any, float, float]:
    """A replay's report, wall seconds and CPU seconds (of this process only)."""
    t0, c0 = time.perf_counter(), time.process_time()
    report = replay(path, workers=workers)
    return report, time.perf_counter() - t0, time.process_time() - c0


def overhead_day(recorder: Recorder, n_orders: int, seed: int) -> Simulator:
    """The simulation the journal's overhead is measured on: weekday, default fleet,
    heuristic bidders, no exact-clearing samples (`bench.journal_instructions` uses it too)."""
    from market.config import load_scenario

    setup = SimSetup.build(load_scenario("weekday"), make_policy("heuristic"), seed=seed, n_orders=n_orders,
                           recorder=recorder, exact_every=0)
    return Simulator(setup)


def _sim(recorder: Recorder, n_orders: int, seed: int) -> tuple[float, float, int]:
    """One `overhead_day` run: wall seconds, CPU seconds, rounds."""
    sim = overhead_day(recorder, n_orders, seed)
    w0, c0 = time.perf_counter(), time.process_time()
    report = sim.run()
    return time.perf_counter() - w0, time.process_time() - c0, report["rounds"]


def _overhead(tmp: Path, n_orders: int, reps: int, seed: int = 11) -> dict[str, Any]:
    """Simulation wall and CPU time without a journal, with `simulate`'s per fsync policy, and
    with one written at once (`AT_ONCE`)."""
    arms = ("null", *FSYNC_POLICIES, AT_ONCE)
    wall: dict[str, list[float]] = {k: [] for k in arms}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    sizes: dict[str, int] = {}
    rounds = 0
    for rep in range(reps):
        for name in (list(wall) if rep % 2 == 0 else list(wall)[::-1]):  # alternate: drift hits both alike
            recorder = _overhead_recorder(name, tmp / f"overhead-{name}-{rep}.bhj")
            w, c, rounds = _sim(recorder, n_orders, seed)
            wall[name].append(w)
            cpu[name].append(c)
            if name != "null":
                sizes[name] = sum(f.stat().st_size for f in journal_files(tmp / f"overhead-{name}-{rep}.bhj"))
    base_w, base_c = min(wall["null"]), min(cpu["null"])
    out: dict[str, Any] = {"orders": n_orders, "rounds": rounds, "reps": reps,
                           "null": {"wall_s": round(base_w, 3), "cpu_s": round(base_c, 3),
                                    "rounds_per_s": round(rounds / base_w)}}
    for name in arms[1:]:
        w, c = min(wall[name]), min(cpu[name])
        pairs = [j / n - 1.0 for j, n in zip(wall[name], wall["null"])]
        out[name] = {"wall_s": round(w, 3), "cpu_s": round(c, 3), "rounds_per_s": round(rounds / w),
                     "overhead_wall": round(w / base_w - 1.0, 4), "overhead_cpu": round(c / base_c - 1.0, 4),
                     "overhead_wall_median_of_reps": round(statistics.median(pairs), 4),
                     "throughput_loss_wall": round(throughput_loss(w / base_w - 1.0), 4),
                     "journal_bytes_per_round": round(sizes[name] / max(1, rounds))}
    return out


def _overhead_recorder(arm: str, path: Path) -> Recorder:
    """An `_overhead` arm's recorder: none, `simulate`'s journal under an fsync policy, or
    `AT_ONCE` (``interval``, every record written in its hook, as the Ray and HTTP shells do)."""
    if arm == "null":
        return NullRecorder()
    if arm == AT_ONCE:
        return JournalRecorder(path, fsync="interval")
    return simulation_journal(path, fsync=arm)  # type: ignore[arg-type]


class HookTape:
    """A recorder that keeps every hook call, to play them into a real recorder later."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def hook(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, args, kwargs))
        return hook

    def play(self, recorder: Recorder) -> None:
        """Makes every kept call on `recorder`, in order."""
        for hook, args, kwargs in self.calls:
            getattr(recorder, hook)(*args, **kwargs)


def _recorder_cost(tmp: Path, n_orders: int, reps: int, seed: int = 11) -> dict[str, Any]:
    """The journal's own time per round, isolated: the run's hook calls replayed into a recorder.

    Less noisy than comparing whole simulations, and it counts only the journal's work.
    """
    tape = HookTape()
    wall, _, rounds = _sim(tape, n_orders, seed)  # type: ignore[arg-type]
    null_wall = min([wall] + [_sim(NullRecorder(), n_orders, seed)[0] for _ in range(reps - 1)])
    out: dict[str, Any] = {"null_sim_us_per_round": round(null_wall / rounds * 1e6, 1)}
    for name in FSYNC_POLICIES:
        best = float("inf")
        for rep in range(reps):
            recorder = JournalRecorder(tmp / f"tape-{name}-{rep}.bhj", fsync=name)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            tape.play(recorder)
            best = min(best, time.perf_counter() - t0)
        out[name] = {"us_per_round": round(best / rounds * 1e6, 1), "overhead": round(best / null_wall, 4)}
    return out


def _child_sim(mode: str, n_orders: int, seed: int) -> None:
    """One simulation in this process (a child of `_simultaneous`); prints its wall and CPU seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        recorder: Recorder = NullRecorder() if mode == "null" else simulation_journal(Path(tmp) / "run.bhj")
        print(json.dumps(_sim(recorder, n_orders, seed)[:2]))
        recorder.close()


def _simultaneous(n_orders: int, pairs: int, seed: int = 11) -> dict[str, Any]:
    """Whole simulations without and with the journal (``interval``), the two of a pair at the
    same time in two processes: on a shared machine whatever slows one core at that moment
    mostly slows the other too, which runs one after the other do not share. Not so when a
    third process wants a core: it shares one with either of the pair, so each pair's wall
    times swing (-12% to +30% beside a busy loop taking a quarter of a core). The CPU times
    (``cpu_median_of_pairs``, added CPU time) stay put, and tell such a run apart."""
    def start(mode: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "bench.replay_bench", "--child-sim", mode, str(n_orders),
                                 str(seed)], stdout=subprocess.PIPE, text=True)

    null: list[float] = []
    journal: list[float] = []
    cpu_per_pair: list[float] = []
    for k in range(pairs):
        procs = {m: start(m) for m in (("null", "journal") if k % 2 == 0 else ("journal", "null"))}
        times = {m: json.loads(p.communicate()[0]) for m, p in procs.items()}
        null.append(times["null"][0])
        journal.append(times["journal"][0])
        cpu_per_pair.append(times["journal"][1] / times["null"][1] - 1.0)
    per_pair = sorted(j / n - 1.0 for j, n in zip(journal, null))
    return {"pairs": pairs, "orders": n_orders,
            "cpu_median_of_pairs": round(statistics.median(cpu_per_pair), 4),
            "median_of_pairs": round(statistics.median(per_pair), 4),
            "throughput_loss_median_of_pairs": round(statistics.median(throughput_loss(x) for x in per_pair), 4),
            "quartiles_of_pairs": [round(q, 4) for q in statistics.quantiles(per_pair, n=4)] if pairs > 1 else [],
            "ratio_of_medians": round(statistics.median(journal) / statistics.median(null) - 1.0, 4),
            "ratio_of_minimums": round(min(journal) / min(null) - 1.0, 4)}


def throughput_loss(added_time: float) -> float:
    """The share of throughput a run loses when its time grows by ``added_time`` (0.1: 10% longer)."""
    return 1.0 - 1.0 / (1.0 + added_time)


def _load() -> list[float]:
    """The 1, 5 and 15 minute load averages: the machine is shared, so every figure carries them."""
    return [round(x, 2) for x in os.getloadavg()]


def _overhead_target(overhead: dict[str, Any]) -> dict[str, Any]:
    """The journal target's verdict: throughput lost (the issue's measure) by both estimators."""
    pairs, best = overhead["simultaneous"], overhead["interval"]
    return {
        "measured": pairs["throughput_loss_median_of_pairs"],
        "measured_end_to_end": best["throughput_loss_wall"],
        "added_time": pairs["median_of_pairs"],
        "added_time_end_to_end": best["overhead_wall"],
        "measured_taped_hooks": overhead["isolated"]["interval"]["overhead"],
        "target": TARGET_OVERHEAD,
        "met": max(pairs["throughput_loss_median_of_pairs"], best["throughput_loss_wall"]) <= TARGET_OVERHEAD,
        "note": "measured: simulate's throughput lost to the journal, 1 - t_null / t_journal, whole simulations "
                "without and with it, the two of a pair at the same time (median of the pairs); "
                "measured_end_to_end: the same from the best of sequential runs, which met needs under the "
                "target too. added_time: the same runs as t_journal / t_null - 1. The taped hook calls "
                "(added time) time the journal's work alone, hot in the cache, a floor of what it costs in "
                "place (`bidhive bench journal-ablation`), so they are not used for met",
    }


def run(quick: bool = False, directory: str | None = None) -> dict[str, Any]:
    """All three figures; ``quick`` makes a smoke run (small journal, one repetition)."""
    n_replay = 300 if quick else 3000
    n_sim = 300 if quick else 2500
    reps = 1 if quick else 3
    load_start = _load()
    with tempfile.TemporaryDirectory(dir=directory) as tmp_name:
        tmp = Path(tmp_name)
        path = tmp / "replay.bhj"
        t0 = time.perf_counter()
        Simulator(_single_order_setup(n_replay, JournalRecorder(path, fsync="never"))).run()
        record_s = time.perf_counter() - t0
        read = _read(path)
        reclear = _reclear(path, reps)
        overhead = _overhead(tmp, n_sim, 1 if quick else 5)
        overhead["isolated"] = _recorder_cost(tmp, n_sim, reps)
        overhead["simultaneous"] = _simultaneous(n_sim, 2 if quick else 12)
    return {
        "benchmark": "replay",
        "machine": {**machine(), "load_average_at_start": load_start, "load_average_at_end": _load()},
        "journal": {"orders": n_replay, "simulate_seconds": round(record_s, 2), **{k: read[k] for k in ("records", "mb")}},
        "read": read,
        "reclear": reclear,
        "overhead": overhead,
        "targets": {
            "reclear_rounds_per_s_50_bidders": {
                "measured": reclear["end_to_end_rounds_per_s"],
                "measured_cpu": reclear["end_to_end_cpu_rounds_per_s"],
                f"measured_{PARALLEL_WORKERS}_workers": reclear[f"end_to_end_{PARALLEL_WORKERS}_workers_rounds_per_s"],
                "target": TARGET_ROUNDS_PER_S,
                "met": reclear["end_to_end_rounds_per_s"] >= TARGET_ROUNDS_PER_S,
                "note": "met: one process, wall time; the CPU figure and the one with workers are given beside it",
            },
            "journal_overhead_interval": _overhead_target(overhead),
        },
    }


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child-sim":
        _child_sim(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        print(json.dumps(run(), indent=2))
