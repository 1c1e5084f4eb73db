"""A bidder's save after a commit (`agents.durable`), against the whole-state snapshot it replaced.

A bidder saves after every commit, before it acknowledges it, so the save is on the
round's path. Its cost grows with the agent's pending jobs in the old scheme (the whole
heap pickled every time) and should not in the new one (the heap's changes appended to
a log). For a rider pool and a warehouse of the metro fleet with N pending jobs (N as
in a service that has run for a while: a few thousand), this times:

- ``whole``: the scheme before, kept here as the reference: the agent's state with its
  heap and a dict of the last 4,096 commit outcomes pickled, written to a temp file,
  renamed. It goes through today's `freeze`, so the agent's arrays and generator are
  packed (`market.packing`), which the scheme before did not do: a lower bound on it.
- ``logged``: `SnapshotStore.save` after a commit that adds one job and finishes one
  (the steady state: the log appends those changes and the new job's booking). Every
  pending job is booked to its line, as `Agent.commit` books it, and the header is the
  one the bidder writes (`BidderHost.snapshot_header`).
- ``new_generation``: the same save when a new log generation is due (the heap whole,
  once per ``COMPACT_RATIO`` x N changes).

Each figure is the median of `REPS` saves, in µs, in the state dir bidders use
(`agents.actor.default_state_root`, tmpfs where there is one).

``stop_and_start``: what a stop and the next start add for the fleet's state
(`serve.fleet_state`), for the whole metro fleet with N pending jobs per bidder: the
stop's copy of every snapshot beside the journal (on disk, synced), the start's copy
back into a new state dir, and each bidder's take-over (its load, the old holds dropped,
a save), summed over the fleet (the service starts them in parallel processes).
``killed_and_started``: the same where the service was killed outright and the start
saves the fleet its bidders left (`serve.fleet_state.rescue_dead_fleets`). ``leftovers``:
what each embedded start pays to look for a killed run's Ray session.

Run ``python -m bench.snapshot_bench`` or ``bidhive bench snapshot``.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agents.actor import COMMIT_MEMORY, AgentSpec, BidderHost, default_state_root, fleet_specs
from agents.base import Agent
from agents.durable import CommitMemory, SnapshotStore, freeze
from bench.stats import machine
from market.config import load_fleet
from market.journal import JournalWriter
from runtime.leftovers import RAY_OWNER, RAY_TEMP_PREFIX, reap_dead_ray_sessions, session_processes
from runtime.owner import all_pids, write_owner
from serve.config import FLEET_DIR_PREFIX
from serve.fleet_state import carry_fleet, fleet_fingerprint, rescue_dead_fleets, save_fleet, saved_fleet_path

REPS = 300
BEFORE_COMMIT_MEMORY = 4096  # the commit outcomes the scheme before kept, as a dict
PENDING = (0, 500, 2000, 5000)


def _spec(kind: str) -> AgentSpec:
    return next(s for s in fleet_specs(load_fleet("metro"), 0, "heuristic") if s.kind.value == kind)


def _payload(agent: Agent, k: int) -> Any:
    """A pending job's payload as the agent's kind schedules it (a rider pool: rider, x, y, on
    time; a warehouse: on time, the SKUs and quantities it picks)."""
    if agent.kind.value == "rider_pool":
        return k % 40, 1.5 + k % 7, -2.25 + k % 5, True
    if agent.kind.value == "warehouse":
        return k % 9 != 0, (k % 50,), (1 + k % 3,)
    return k % 9 != 0


def _agent(spec: AgentSpec, pending: int) -> Agent:
    """The agent with `pending` committed jobs, each booked to its line as `Agent.commit` books it."""
    agent = spec.build()
    for k in range(pending):
        _add_job(agent, 60_000.0 + 3.7 * k, k)
    return agent


def _add_job(agent: Agent, done_s: float, k: int) -> None:
    agent.schedule_completion(done_s, _payload(agent, k))
    agent.book((k, 0), agent._completion_seq)


def _whole(directory: Path, spec: AgentSpec, agent: Agent, committed: dict[int, bool]) -> None:
    """The save before `agents.durable`: everything pickled and written, every time."""
    data = pickle.dumps({"version": 1, "spec": spec, "agent": freeze(agent), "committed": committed},
                        protocol=pickle.HIGHEST_PROTOCOL)
    path = directory / f"{spec.agent_id}.old.pkl"
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _median_us(run: Any, reps: int) -> float:
    times = []
    for k in range(reps):
        t0 = time.perf_counter()
        run(k)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 1)


def _one(directory: Path, kind: str, pending: int, reps: int) -> dict[str, Any]:
    spec = _spec(kind)
    agent = _agent(spec, pending)
    memory = CommitMemory(COMMIT_MEMORY)
    committed = {r: True for r in range(BEFORE_COMMIT_MEMORY)}
    for r in range(COMMIT_MEMORY):
        memory[r] = True
    host = BidderHost(spec)
    host.committed = memory
    header = host.snapshot_header()  # what the bidder writes beside its agent
    store = SnapshotStore(directory, spec.agent_id)
    store.save(header, agent)

    def commit(k: int) -> None:  # one job added, the earliest one finished: the heap keeps its size
        _add_job(agent, 70_000.0 + k, PENDING[-1] + k)
        agent.advance(agent._completions[0][0])

    def logged(k: int) -> None:
        commit(k)
        store.save(header, agent)

    def new_generation(k: int) -> None:
        commit(k)
        store._log_changes = 1 << 40  # due now
        store.save(header, agent)

    out = {"whole_us": _median_us(lambda k: _whole(directory, spec, agent, committed), reps),
           "logged_us": _median_us(logged, reps), "new_generation_us": _median_us(new_generation, reps)}
    store.close()
    return out


def _fleet_dir(specs: list[AgentSpec], pending: int, run_dir: Path) -> None:
    """Each bidder's snapshot in `run_dir`, with `pending` jobs."""
    for spec in specs:
        host = BidderHost(spec, str(run_dir))
        host.agent = _agent(spec, pending)
        host._snapshot()
        host.store.close()


def _stop_and_start(journal_dir: Path, pending: int, killed: bool) -> dict[str, Any]:
    """The metro fleet, each bidder with `pending` jobs saved, through a stop and a start.

    `killed`: the service was killed outright, so the stop saved nothing; the start's
    rescue (`rescue_dead_fleets`: the journal's torn record cut, the dead fleet's dir saved
    beside it and removed) is timed as the stop's save.
    """
    specs = fleet_specs(load_fleet("metro"), 0, "heuristic")
    root = Path(tempfile.mkdtemp(prefix="bidhive-snapbench-", dir=default_state_root()))
    run_dir, new_dir = root / f"{FLEET_DIR_PREFIX}dead", root / "new"
    new_dir.mkdir()
    try:
        run_dir.mkdir()
        _fleet_dir(specs, pending, run_dir)
        journal = journal_dir / f"j-{pending}-{killed}.bhj"
        with JournalWriter(journal, fsync="never") as writer:
            writer.append("run_started", shell="bench")
        fingerprint = fleet_fingerprint(load_fleet("metro"), 0)
        if killed:
            _killed_owner(run_dir, fingerprint, journal)
        t0 = time.perf_counter()
        if not killed:
            save_fleet(run_dir, journal, fingerprint)
        elif rescue_dead_fleets(root) != [run_dir.name]:
            raise RuntimeError("the killed fleet was not saved")
        t1 = time.perf_counter()
        origin = carry_fleet(journal, fingerprint, new_dir)
        t2 = time.perf_counter()
        carried = [BidderHost(spec, str(new_dir)) for spec in specs]
        t3 = time.perf_counter()
        assert origin.carried and all(h.carried and len(h.agent._completions) == pending for h in carried)
        saved_bytes = sum(f.stat().st_size for f in saved_fleet_path(journal).iterdir())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    saved_as = "start_rescue_ms" if killed else "stop_save_ms"
    return {"bidders": len(specs), "saved_mb": round(saved_bytes / 1e6, 2), saved_as: round((t1 - t0) * 1e3, 1),
            "start_copy_ms": round((t2 - t1) * 1e3, 1), "take_over_ms_all_bidders": round((t3 - t2) * 1e3, 1)}


def run(quick: bool = False) -> dict[str, Any]:
    """Save times by kind and number of pending jobs; a stop and a start of a whole fleet."""
    reps = 30 if quick else REPS
    directory = Path(tempfile.mkdtemp(prefix="bidhive-snapbench-", dir=default_state_root()))
    journal_dir = Path(tempfile.mkdtemp(prefix="bidhive-snapbench-"))  # on disk, as a journal is
    try:
        results = {kind: {str(n): _one(directory, kind, n, reps) for n in PENDING} for kind in ("rider_pool", "warehouse")}
        counts = PENDING[:2] if quick else PENDING
        restarts = {str(n): _stop_and_start(journal_dir, n, killed=False) for n in counts}
        rescues = {str(n): _stop_and_start(journal_dir, n, killed=True) for n in counts}
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(journal_dir, ignore_errors=True)
    return {"benchmark": "snapshot", "machine": machine(), "state_dir": default_state_root(), "reps": reps,
            "commit_memory": {"before": BEFORE_COMMIT_MEMORY, "now": COMMIT_MEMORY}, "by_kind_and_pending_jobs": results,
            "stop_and_start_by_pending_jobs": restarts, "killed_and_started_by_pending_jobs": rescues,
            "leftovers": _leftovers_scan()}


def _killed_owner(run_dir: Path, fingerprint: str, journal: Path) -> None:
    """Marks `run_dir` as a killed service's fleet (its owner this pid with another start
    time: a process that is gone, its pid reused) and leaves a torn record at the end of
    `journal`, as the killed writer would."""
    owner = run_dir / "fleet.json"
    write_owner(run_dir, owner.name, fingerprint=fingerprint, journal=str(journal.resolve()), service=True)
    record = json.loads(owner.read_text())
    owner.write_text(json.dumps({**record, "started": record["started"] - 1}))
    with journal.open("ab") as file:
        file.write(b"\x40\x00\x00\x00torn")


def _leftovers_scan() -> dict[str, Any]:
    """What every embedded start pays to look for killed runs' Ray sessions (a temp root
    holding 5 live ones, none dead), and the scan of every process's environment it makes
    once when it finds some. Run on a private root: the bench clears nothing of the machine's."""
    with tempfile.TemporaryDirectory(prefix="bidhive-snapbench-") as root:
        for k in range(5):
            live = Path(root) / f"{RAY_TEMP_PREFIX}{k}"
            live.mkdir(mode=0o700)
            write_owner(live, RAY_OWNER)
        t0 = time.perf_counter()
        cleared = reap_dead_ray_sessions(root)
        t1 = time.perf_counter()
        session_processes([(str(Path(root) / "none"), str(Path(root) / "none"), 0)])
        t2 = time.perf_counter()
    if cleared:
        raise RuntimeError(f"live sessions taken for dead: {cleared}")
    return {"look_with_5_live_sessions_ms": round((t1 - t0) * 1e3, 2), "process_scan_ms": round((t2 - t1) * 1e3, 1),
            "processes": len(all_pids())}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
