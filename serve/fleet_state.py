"""The bidder fleet's live state across a stop of the service: saved beside the journal at
the stop, taken up by the next start.

Without it a restart began with a new fleet: every rider free and every warehouse's stock
back at its first level, while the journal says those riders are still out and that stock
was sold, so the next rounds could sell it again. A clean stop now copies the bidders'
snapshots (`agents.durable`) to ``J.fleet/`` beside the journal's first file, with a
``manifest.json`` naming the fleet (`fleet_fingerprint`) and the journal as it was then
(`journal_extent`). The next start copies them into its own fleet's state dir and marks
them carried, and each bidder takes its state over without the old run's holds
(`agents.actor.BidderHost`).

A saved fleet is taken up only where it is exactly the state the journal ends with: the
same journal, nothing written to it since, the same fleet and seed. A bidder saves before
it acknowledges a commit and the journal records the commit after the acknowledgement, so
at a clean stop the snapshots hold every commit the journal holds. After a crash, or a
stop cut short, the journal has moved on from the saved fleet (the later run's
``run_started`` at least), and the start takes a new fleet, saying why. The bidding
policy may change between runs: the bidders bid with the new one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from market.config import FleetCfg
from market.journal import journal_files, journal_head, sync_dir

logger = logging.getLogger("bidhive.serve")

__all__ = ["FleetOrigin", "carry_fleet", "fleet_fingerprint", "journal_extent", "save_fleet", "saved_fleet_path"]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_SNAPSHOT_FILES = ("*.snap", "*.log")


@dataclass(frozen=True)
class FleetOrigin:
    """Where a fleet's state came from, for the log and ``/healthz``.

    Attributes:
        carried: the bidders resumed the state saved at the last stop.
        why: one line saying which, and why not when not.
    """

    carried: bool
    why: str

    def facts(self) -> dict[str, Any]:
        return {"from": "last_stop" if self.carried else "new", "why": self.why}


def saved_fleet_path(journal: Path) -> Path:
    """Where a journal's saved fleet lives: beside its first file."""
    return journal.with_name(journal.name + ".fleet")


def fleet_fingerprint(fleet: FleetCfg, seed: int) -> str:
    """What a saved fleet must match: the resources as configured and the seed they were built with."""
    blob = json.dumps({"fleet": fleet.model_dump(mode="json"), "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def journal_extent(journal: Path) -> dict[str, Any] | None:
    """The journal as it stands: its first record's frame header, its files and their bytes
    (None without a journal). Any record appended changes it."""
    if not journal.exists():
        return None
    files = journal_files(journal)
    return {"head": journal_head(journal).hex(), "files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def save_fleet(state_dir: str | Path, journal: Path, fingerprint: str) -> int:
    """Copies a stopped fleet's snapshots beside its (closed) journal, replacing an older save;
    returns how many bidders were saved.

    The copy is complete before it takes the place of the old one, so a crash part way
    leaves the old save (which the journal has moved on from) or none, never half of one.
    """
    source, target = Path(state_dir), saved_fleet_path(journal)
    staging = target.with_name(target.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    files = [f for pattern in _SNAPSHOT_FILES for f in source.glob(pattern)]
    for file in files:
        shutil.copy2(file, staging / file.name)
    manifest = {"version": MANIFEST_VERSION, "fingerprint": fingerprint, "journal": journal_extent(journal),
                "saved_unix": time.time()}
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


def carry_fleet(journal: Path, fingerprint: str, state_dir: str | Path) -> FleetOrigin:
    """Copies the fleet saved at the last stop into a new fleet's state dir, marked carried,
    when it is the state the journal ends with; else leaves the dir empty. Says which."""
    saved = saved_fleet_path(journal)
    why_not = _mismatch(saved, journal, fingerprint)
    if why_not is not None:
        return FleetOrigin(False, why_not)
    agents, target = _agent_ids(saved), Path(state_dir)
    try:
        for pattern in _SNAPSHOT_FILES:
            for file in saved.glob(pattern):
                shutil.copy2(file, target / file.name)
        for agent_id in agents:
            (target / f"{agent_id}.carried").touch()
    except OSError as err:  # a half copy must not be taken up either
        for file in target.glob("*"):
            file.unlink(missing_ok=True)
        return FleetOrigin(False, f"the saved fleet could not be copied ({err})")
    return FleetOrigin(True, f"the state saved at the last stop ({len(agents)} bidders had one; a bidder "
                             "that had committed nothing yet starts new, as it was)")


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
        return "the fleet or its seed changed since it was saved"
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
