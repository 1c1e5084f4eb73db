"""The bidder fleet's live state across a stop of the service: saved beside the journal at
the stop, taken up by the next start.

Without it a restart began with a new fleet: every rider free and every warehouse's stock
back at its first level, while the journal says those riders are still out and that stock
was sold, so the next rounds could sell it again. A clean stop now copies the bidders'
snapshots (`agents.durable`) to ``J.fleet/`` beside the journal's first file, with a
``manifest.json`` naming the fleet (`fleet_fingerprint`) and the journal as it was then
(`journal_extent`). The next start copies them into its own fleet's state dir and marks
them carried, and each bidder takes its state over without the old run's holds
(`agents.actor.BidderHost`). Agents that run inside the service (``bidders: local``) are
saved and taken over through the same files and the same `BidderHost` code
(`save_agents`, `carry_into`).

A saved fleet is taken up only where it is exactly the state the journal ends with: the
same journal, nothing written to it since, the same fleet and seed, and the same agents'
code (a snapshot unpickles into the classes of the code reading it). A bidder saves before
it acknowledges a commit and the journal records the commit after the acknowledgement, so
at a clean stop the snapshots hold every commit the journal holds. A stop that Serve cut
short (the replica killed before its own save) is saved by `bidhive serve` once Ray is
down (`save_after_kill`), and a service killed outright is saved by the next start of
any service, from the dir its bidders left, beside its own journal
(`rescue_dead_fleets`). Where neither could be done (the machine rebooted: ``/dev/shm``
is memory), the journal has moved on from the saved fleet and the start takes a new
fleet, saying why. A save is only written once
each bidder's snapshot loads from the copy. The bidding policy may change between runs:
the bidders bid with the new one.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import agents as agents_package
import market.packing
from agents.actor import SNAPSHOT_VERSION, AgentSpec, BidderHost, default_state_root
from agents.base import Agent
from agents.durable import NOT_STATE, SnapshotStore
from market.config import FleetCfg
from market.journal import JournalLocked, JournalWriter, journal_files, journal_head, sync_dir
from runtime.leftovers import claim, dead_dirs
from runtime.owner import Owner, read_owner, write_owner
from serve.config import FLEET_DIR_PREFIX, FLEET_DIR_PREFIX_ENV, SERVICE_PROCESS_ENV

logger = logging.getLogger("bidhive.serve")

__all__ = [
    "FleetOrigin", "FleetSaveError", "agents_code", "as_taken", "carry_fleet", "carry_into", "claim_state_dir",
    "fleet_fingerprint", "journal_extent", "rescue_dead_fleets", "save_after_kill", "save_agents", "save_fleet",
    "saved_fleet_path",
]

MANIFEST = "manifest.json"
OWNER = "fleet.json"  # in a running fleet's state dir: the fingerprint it started under
MANIFEST_VERSION = 1
_SNAPSHOT_FILES = ("*.snap", "*.log")
COPY_TRIES, COPY_RETRY_S = 5, 0.2
#: How the saved fleet's service stopped, by the manifest's ``saved_by``: what the next start says it resumed.
SAVED_BY = {
    "stop": "the state saved at the last stop",
    "cut_short": "the state the bidders had when the last stop was cut short, saved once they were gone",
    "replica_died": "the state the bidders had when the service's replica died, saved by the next fleet",
    "killed": "the state the bidders had when the service was killed, saved by a later start",
}


class FleetSaveError(RuntimeError):
    """The stopped fleet's snapshots could not be copied whole."""


@dataclass(frozen=True)
class FleetOrigin:
    """Where a fleet's state came from, for the log and ``/healthz``.

    Attributes:
        carried: the bidders resumed the state saved at the last stop.
        why: one line saying which, and why not when not.
        agents: the bidders whose snapshots were carried.
    """

    carried: bool
    why: str
    agents: tuple[str, ...] = ()

    def facts(self) -> dict[str, Any]:
        """What ``/healthz`` shows."""
        return {"from": "last_stop" if self.carried else "new", "why": self.why}


def saved_fleet_path(journal: Path) -> Path:
    """Where a journal's saved fleet lives: beside its first file."""
    return journal.with_name(journal.name + ".fleet")


def fleet_fingerprint(fleet: FleetCfg, seed: int) -> str:
    """What a saved fleet must match: the resources as configured, the seed they were built
    with, and the code that wrote the snapshots (`agents_code`)."""
    blob = json.dumps({"fleet": fleet.model_dump(mode="json"), "seed": seed, "snapshot": SNAPSHOT_VERSION,
                       "code": agents_code()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def agents_code() -> str:
    """A hash of the agents' code and of what packs their state. A snapshot unpickles into the
    classes of the code that reads it, skipping their constructors, so a state saved by other
    code could lack what that code expects; an upgrade starts a new fleet instead."""
    digest = hashlib.sha256()
    for module in (agents_package, market.packing):
        path = Path(str(module.__file__))
        files = sorted(path.parent.glob("*.py")) if module is agents_package else [path]
        for file in files:
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def journal_extent(journal: Path) -> dict[str, Any] | None:
    """The journal as it stands: its first record's frame header, its files and their bytes
    (None without a journal). Any record appended changes it."""
    if not journal.exists():
        return None
    files = journal_files(journal)
    return {"head": journal_head(journal).hex(), "files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def save_fleet(state_dir: str | Path, journal: Path, fingerprint: str, saved_by: str = "stop") -> int:
    """Copies a stopped fleet's snapshots beside its (closed) journal, replacing an older save;
    returns how many bidders were saved. `saved_by` (a key of `SAVED_BY`) tells the next
    start how the fleet stopped.

    The copy is complete, and each agent's snapshot loads from it, before it takes the
    place of the old one, so a crash part way leaves the old save (which the journal has
    moved on from) or none, never half of one.

    Raises:
        FleetSaveError: a snapshot did not load from its copy (nothing is saved).
        OSError: the copy failed (nothing is saved).
    """
    source, target = Path(state_dir), saved_fleet_path(journal)
    staging = target.with_name(target.name + ".new")
    _copy_whole(source, staging)
    manifest = {"version": MANIFEST_VERSION, "fingerprint": fingerprint, "journal": journal_extent(journal),
                "saved_unix": time.time(), "saved_by": saved_by}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _sync_tree(staging)
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    sync_dir(target.parent)
    return len(_agent_ids(target))


def claim_state_dir(state_dir: str | Path, fingerprint: str, run_prefix: str | None, journal: Path) -> None:
    """Marks a new fleet's state dir with the fingerprint it was started under, and takes
    up the dir an earlier fleet of the same run (`run_prefix`: one `bidhive serve`) left.

    A fleet starts only once the one before it is gone: stopped by the keeper, which saves
    and removes its dir, or dead with a replica that Serve restarts, which leaves it. Such a
    dir is saved beside the journal as a killed replica's is (`save_after_kill`), so this
    fleet carries it, and removed, so the dir `save_after_kill` finds at the stop is this
    fleet's. The dirs of services killed outright are saved and removed
    too (`rescue_dead_fleets`). The dir belongs to the service's process where the
    service names it (`SERVICE_PROCESS_ENV`), else to this one.
    """
    state = Path(state_dir)
    service = _service_process()  # first: a start killed during the rescue leaves a dir a later one clears
    write_owner(state, OWNER, service, fingerprint=fingerprint, journal=str(journal.resolve()), service=bool(service))
    rescue_dead_fleets(state.parent)
    for stale in state.parent.glob(f"{run_prefix}*") if run_prefix else ():
        if stale == state:
            continue
        try:
            if save_after_kill(stale, journal, "replica_died"):
                logger.warning("saved the state a stopped replica's bidders left in %s", stale.name)
        except Exception:  # noqa: BLE001 - this fleet starts new instead
            logger.exception("the state a stopped replica's bidders left in %s could not be saved", stale.name)
        shutil.rmtree(stale, ignore_errors=True)


def _service_process() -> tuple[int, int] | None:
    """The (pid, start time) `bidhive serve` names for its fleets, if it does."""
    pid, _, started = os.environ.get(SERVICE_PROCESS_ENV, "").partition(":")
    return (int(pid), int(started)) if pid.isdigit() and started.isdigit() else None


def save_after_kill(state_dir: str | Path, journal: Path, saved_by: str = "cut_short") -> bool:
    """`save_fleet` for a service whose replica was killed before it could save (Serve's
    grace period spent on requests under load), run by the process that started it once
    every bidder is gone; returns whether it saved. Nothing is done where the replica's
    own save got through (the saved fleet matches the journal already), or for a dir
    that no fleet claimed (`claim_state_dir`: the fingerprint is the one it started under).

    The bidders saved before each acknowledgement, so their state holds every commit the
    journal holds. Commits the journal lost with the replica's unwritten buffer stay with
    their bidders: a rider busy until that job ends, a warehouse's stock short until it is
    replenished; never sold twice.
    """
    owner = read_owner(state_dir, OWNER)
    fingerprint = owner.facts.get("fingerprint") if owner is not None else None
    if not isinstance(fingerprint, str):
        return False
    if _mismatch(saved_fleet_path(journal), journal, fingerprint) is None:
        return False
    save_fleet(state_dir, journal, fingerprint, saved_by)
    return True


def rescue_dead_fleets(root: str | Path) -> list[str]:
    """Saves the fleets that services killed outright left in `root` beside their journals,
    then removes their dirs; returns the names of the dirs saved. Best effort: a failure
    is logged, and costs only the carry-over.

    A service killed with SIGKILL (or by the OOM killer) saves nothing and leaves its
    bidders' snapshots in `root` (``/dev/shm``: memory). Those hold every commit its
    journal holds, as at a clean stop (`save_after_kill`), so the next start on that
    journal resumes them. Any start saves them, so memory is not held until a start on
    that journal that may never come. The journal's lock is taken before the dir is
    claimed and held until the save is done: a start on that journal meanwhile waits for
    it, or finds the saved fleet, never a claimed dir without its save. Its torn last
    record, if any, is cut first, as the next writer would cut it, so the saved extent is
    the one that writer finds. A dir whose journal a live service holds is left to a later
    start; one whose journal is certainly gone (its folder is there, the file is not) is
    only removed; one whose journal cannot be seen (an unmounted or unreadable folder) is
    left for later.
    """
    saved: list[str] = []
    try:
        for path, owner, name in dead_dirs(root, FLEET_DIR_PREFIX, OWNER):
            theirs = _theirs(owner)
            try:
                if theirs is None:  # nothing could ever resume it
                    _remove(claim(path, name))
                elif not theirs:
                    _say_left(path, owner)
                elif _save_dead(path, name, Path(theirs), owner):
                    logger.warning("saved the bidders' state a killed service (pid %d) left in %s beside %s",
                                   owner.pid, name, theirs)
                    saved.append(name)
            except Exception:  # noqa: BLE001 - that journal's next start takes a new fleet
                logger.exception("the state a killed service's bidders left in %s could not be saved", name)
    except Exception:  # noqa: BLE001 - what is left stays for a later start
        logger.exception("could not look for the fleets killed services left in %s", root)
    return saved


def _say_left(path: Path, owner: Owner) -> None:
    """Names a dead fleet left for later, what it holds (memory, under ``/dev/shm``) and how
    to free it: nothing else would tell an operator whose journal's volume never comes back."""
    journal = owner.facts.get("journal")
    if not journal:
        logger.warning("the bidders of a service that died (pid %d) left %s (%.1f MB of memory), which names no "
                       "journal, so no start will resume it; remove it to free the memory", owner.pid, path,
                       _megabytes(path))
        return
    logger.warning("the bidders of a service that died (pid %d) left %s (%.1f MB of memory), kept for the next "
                   "start that can see their journal %s; remove it to free the memory (that journal then "
                   "starts with a new fleet)", owner.pid, path, _megabytes(path), journal)


def _megabytes(path: Path) -> float:
    """The size of the files under `path`, in MB (what can be read of it)."""
    total = 0
    for file in path.rglob("*"):
        with contextlib.suppress(OSError):
            total += file.stat().st_size if file.is_file() else 0
    return total / 1e6


def _theirs(owner: Owner) -> str | None:
    """The journal a dead fleet's dir names, if it is there; None where it is certainly
    gone (its folder is there, the file is not); "" where that cannot be told (no journal
    named, or its folder not there or not readable: an unmounted volume comes back)."""
    named = owner.facts.get("journal")
    if not isinstance(named, str) or not named:
        return ""
    try:
        if Path(named).is_file():
            return named
        return None if Path(named).parent.is_dir() else ""
    except OSError:
        return ""


def _save_dead(path: Path, name: str, journal: Path, owner: Owner) -> bool:
    """`save_after_kill` of a dead dir, claimed and removed under the journal's lock;
    whether it saved. The owner was the service's process (`bidhive serve`: the service
    was killed), else the replica's."""
    saved_by = "killed" if owner.facts.get("service") else "replica_died"
    with _locked(journal) as at_rest:
        if not at_rest:  # a live service holds it, or it is gone since: left to a later start
            return False
        claimed = claim(path, name)
        try:
            return claimed is not None and save_after_kill(claimed, journal, saved_by)
        finally:
            _remove(claimed)


def _remove(claimed: Path | None) -> None:
    if claimed is not None:
        shutil.rmtree(claimed, ignore_errors=True)


@contextlib.contextmanager
def _locked(journal: Path) -> Iterator[bool]:
    """Holds `journal`'s writer lock, with a torn last record cut as a writer would cut it;
    yields False (holding nothing) where it is gone or a live service holds it."""
    if not journal.exists():  # deleted since: nothing to save beside
        yield False
        return
    try:
        writer = JournalWriter(journal)
    except JournalLocked:
        yield False
        return
    try:
        yield True
    finally:
        writer.close()


def _copy_whole(source: Path, staging: Path) -> None:
    """Copies a state dir's snapshots and checks that each agent's loads from the copy.

    A bidder still finishing a save (a call the stop did not wait for) can leave a copy whose
    newest slot names a log the copy missed; loading it would then start that bidder new.
    Such a copy is taken again, and after `COPY_TRIES` the save is given up (the next start
    takes a new fleet, and says so) rather than keeping a state that does not load.
    """
    if not _agent_ids(source):  # a dir gone, or never written to: not a fleet's state
        raise FleetSaveError(f"no bidder snapshot in {source}")
    for attempt in range(COPY_TRIES):
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        _copy_snapshots(source, staging)
        unreadable = [a for a in _agent_ids(staging) if not _loads(staging, a)]
        if not unreadable:
            return
        time.sleep(COPY_RETRY_S * (attempt + 1))
    shutil.rmtree(staging, ignore_errors=True)
    raise FleetSaveError(f"the snapshots of {', '.join(unreadable)} did not load from a copy after {COPY_TRIES} tries")


def _copy_snapshots(source: Path, target: Path) -> None:
    """Copies a state dir's snapshot slots and change logs (not its markers or owner file)."""
    for pattern in _SNAPSHOT_FILES:
        for file in source.glob(pattern):
            shutil.copy2(file, target / file.name)


def _loads(directory: Path, agent_id: str) -> bool:
    try:
        SnapshotStore(directory, agent_id).load()
    except Exception:  # noqa: BLE001 - whatever the reason, this copy is not the state
        return False
    return True


def carry_fleet(journal: Path, fingerprint: str, state_dir: str | Path) -> FleetOrigin:
    """Copies the fleet saved at the last stop into a new fleet's state dir, marked carried,
    when it is the state the journal ends with; else leaves the dir empty. Says which."""
    saved = saved_fleet_path(journal)
    try:
        why_not = _mismatch(saved, journal, fingerprint)
    except Exception as err:  # noqa: BLE001 - a journal this cannot read: the desk's start will say more
        why_not = f"the journal could not be read ({err})"
    if why_not is not None:
        return FleetOrigin(False, why_not)
    agents, target = _agent_ids(saved), Path(state_dir)
    try:
        _copy_snapshots(saved, target)
        for agent_id in agents:
            SnapshotStore(target, agent_id).carried_marker.touch()
    except OSError as err:  # a half copy must not be taken up either
        for file in target.glob("*"):
            file.unlink(missing_ok=True)
        return FleetOrigin(False, f"the saved fleet could not be copied ({err})")
    return FleetOrigin(True, f"{_how_saved(saved)} ({len(agents)} bidders had one; a bidder that had committed "
                             "nothing yet starts new, as it was)", tuple(agents))


def _how_saved(saved: Path) -> str:
    """What the manifest says of the stop it was saved at (a save without the field: a stop)."""
    saved_by = json.loads((saved / MANIFEST).read_text()).get("saved_by")
    return SAVED_BY.get(saved_by if isinstance(saved_by, str) else "stop", SAVED_BY["stop"])


def save_agents(agents: Sequence[Agent], specs: Sequence[AgentSpec], journal: Path, fingerprint: str) -> int:
    """`save_fleet` for agents that ran inside the service (``bidders: local``): each is
    saved as its bidder actor would save it, then the lot is saved beside the journal."""
    by_id = {spec.agent_id: spec for spec in specs}
    with _local_scratch() as tmp:
        for agent in agents:
            host = BidderHost(by_id[agent.agent_id], tmp)
            host.agent = agent
            host._snapshot()
            host.store.close()  # type: ignore[union-attr] - it has a state dir
        return save_fleet(tmp, journal, fingerprint)


def carry_into(agents: Sequence[Agent], specs: Sequence[AgentSpec], journal: Path, fingerprint: str) -> FleetOrigin:
    """`carry_fleet` for agents that run inside the service: each agent object (the engine
    holds them) takes over its saved state as its bidder actor would (`BidderHost`)."""
    by_id = {spec.agent_id: spec for spec in specs}
    with _local_scratch() as tmp:
        origin = carry_fleet(journal, fingerprint, tmp)
        if not origin.carried:
            return origin
        taken = set()
        for agent in agents:
            if agent.agent_id in origin.agents:
                host = BidderHost(by_id[agent.agent_id], tmp)
                if host.carried:  # not its store's change log either: nothing here would ever empty it
                    agent.__dict__.update({k: v for k, v in host.agent.__dict__.items() if k not in NOT_STATE})
                    taken.add(agent.agent_id)
                if host.store is not None:
                    host.store.close()
    return as_taken(origin, taken)


def _local_scratch() -> tempfile.TemporaryDirectory[str]:
    """A scratch state dir for agents run in the service, named as the run's fleet dirs are,
    so that `bidhive serve` removes one a killed replica left."""
    prefix = (os.environ.get(FLEET_DIR_PREFIX_ENV) or FLEET_DIR_PREFIX) + "local-"
    return tempfile.TemporaryDirectory(prefix=prefix, dir=default_state_root())


def as_taken(origin: FleetOrigin, taken: set[str]) -> FleetOrigin:
    """The origin as the bidders took it: one whose saved state did not load started new."""
    new = sorted(set(origin.agents) - taken)
    if not new:
        return origin
    return FleetOrigin(False, f"{origin.why}; but {', '.join(new)} could not load theirs and started new",
                       origin.agents)


def _mismatch(saved: Path, journal: Path, fingerprint: str) -> str | None:
    """Why the saved fleet cannot be taken up, or None if it can."""
    if not saved.is_dir():
        return "no fleet saved beside the journal"
    try:
        manifest = json.loads((saved / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        return f"the saved fleet's manifest is unreadable ({err})"
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        return "the saved fleet has another format"
    if manifest.get("fingerprint") != fingerprint:
        return "the fleet, its seed or the agents' code changed since it was saved"
    if manifest.get("journal") != journal_extent(journal):
        return "the journal has moved on since the fleet was saved (the last stop did not save it)"
    return None


def _agent_ids(directory: Path) -> list[str]:
    """The agents with a snapshot slot in a state dir (``{agent}.{0|1}.snap``)."""
    return sorted({f.name.rsplit(".", 2)[0] for f in directory.glob("*.snap")})


def _sync_tree(directory: Path) -> None:
    """fsync a folder's files, then the folder: the save survives a power cut once renamed."""
    for file in directory.iterdir():
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
    sync_dir(directory)
