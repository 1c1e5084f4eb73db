"""The bidder fleet's state across a stop (`serve.fleet_state`): saved beside the journal, taken
up only where the journal ends with it. No Ray: the bidders are `BidderHost`s on state dirs."""
from __future__ import annotations

from pathlib import Path

import pytest

from agents.actor import BidderHost, fleet_specs
from market.config import load_fleet
from market.journal import JournalWriter, TornTailWarning
from runtime.owner import write_owner
from serve import fleet_state
from serve.fleet_state import (
    FleetSaveError, carry_fleet, claim_state_dir, fleet_fingerprint, rescue_dead_fleets, save_fleet,
    saved_fleet_path,
)
from tests.factories import dead_owner
from tests.test_ray_runtime import FLEET, RIDERS_W, SEED, commit_first, quote_round

FINGERPRINT = fleet_fingerprint(FLEET, SEED)


def _stopped_run(tmp_path: Path) -> tuple[Path, Path, BidderHost]:
    """A journal with a record, and a run dir whose rider pool committed one order and holds a round."""
    journal = tmp_path / "j.bhj"
    with JournalWriter(journal) as writer:
        writer.append("run_started", shell="test")
    run = tmp_path / "run-1"
    run.mkdir()
    host = BidderHost(RIDERS_W, str(run))
    rnd, q = quote_round(host, 1)
    commit_first(host, rnd, q)
    return journal, run, host


def test_a_clean_stop_is_taken_up_by_the_next_start(tmp_path: Path) -> None:
    journal, run, host = _stopped_run(tmp_path)
    assert save_fleet(run, journal, FINGERPRINT) == 1
    new_run = tmp_path / "run-2"
    new_run.mkdir()
    origin = carry_fleet(journal, FINGERPRINT, new_run)
    assert origin.carried and origin.facts()["from"] == "last_stop", origin
    resumed = BidderHost(RIDERS_W, str(new_run))
    assert resumed.carried and resumed.agent.committed_units == 1
    assert resumed.agent.capacity_free() == host.agent.capacity_free()  # the rider is still out
    assert not (new_run / "riders-w.carried").exists()
    (tmp_path / "run-3").mkdir()
    assert carry_fleet(journal, FINGERPRINT, tmp_path / "run-3").carried  # nothing written since
    assert not carry_fleet(journal, FINGERPRINT, tmp_path / "no-such-dir").carried  # cannot copy: a new fleet


@pytest.mark.parametrize("change, why", [
    ("journal", "the journal has moved on"),
    ("fleet", "the fleet, its seed or the agents' code changed"),
    ("code", "the fleet, its seed or the agents' code changed"),
    ("manifest", "manifest is unreadable"),
    ("none_saved", "no fleet saved"),
])
def test_a_saved_fleet_the_journal_has_moved_on_from_is_not_taken_up(tmp_path: Path, change: str, why: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """After a crash the journal holds records the saved fleet never saw (the later run's
    `run_started` at least); another fleet or seed is another world: a new fleet, saying why."""
    journal, run, _ = _stopped_run(tmp_path)
    save_fleet(run, journal, FINGERPRINT)
    fingerprint = FINGERPRINT
    if change == "journal":
        with JournalWriter(journal) as writer:
            writer.append("run_started", shell="test")
    elif change == "fleet":
        fingerprint = fleet_fingerprint(load_fleet("district"), SEED)
        assert fleet_fingerprint(FLEET, SEED + 1) != FINGERPRINT
    elif change == "code":  # an upgrade: the snapshots would unpickle into other classes
        monkeypatch.setattr(fleet_state, "agents_code", lambda: "other code")
        fingerprint = fleet_fingerprint(FLEET, SEED)
    elif change == "manifest":
        (saved_fleet_path(journal) / "manifest.json").write_text("{")
    else:
        saved_fleet_path(journal).rename(tmp_path / "elsewhere")
    new_run = tmp_path / "run-2"
    new_run.mkdir()
    origin = carry_fleet(journal, fingerprint, new_run)
    assert not origin.carried and why in origin.why, origin
    assert not any(new_run.iterdir())
    assert not BidderHost(RIDERS_W, str(new_run)).restored


def test_a_save_replaces_the_last_one_whole(tmp_path: Path) -> None:
    """A bidder that was in the last save and is not in this one is not carried."""
    journal, run, _ = _stopped_run(tmp_path)
    other = tmp_path / "run-0"
    other.mkdir()
    warehouse = fleet_specs(FLEET, SEED, "heuristic")[0]
    BidderHost(warehouse, str(other))._snapshot()
    assert save_fleet(other, journal, FINGERPRINT) == 1
    assert save_fleet(run, journal, FINGERPRINT) == 1
    saved = saved_fleet_path(journal)
    assert sorted(p.name.split(".")[0] for p in saved.glob("*.snap")) == ["riders-w"]
    assert not saved.with_name(saved.name + ".new").exists() and not saved.with_name(saved.name + ".old").exists()


def test_a_copy_that_does_not_load_is_not_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bidder still writing while the stop copies (its newest slot names a log the copy
    missed): the copy is taken again, and given up if it never loads; the last save stays."""
    journal, run, host = _stopped_run(tmp_path)
    save_fleet(run, journal, FINGERPRINT)
    manifest = (saved_fleet_path(journal) / "manifest.json").read_text()
    for log in run.glob("*.log"):
        log.unlink()  # as if the copy listed the files before the bidder started a new log
    monkeypatch.setattr(fleet_state, "COPY_RETRY_S", 0.0)
    with pytest.raises(FleetSaveError, match="riders-w"):
        save_fleet(run, journal, FINGERPRINT)
    assert (saved_fleet_path(journal) / "manifest.json").read_text() == manifest
    assert not saved_fleet_path(journal).with_name("j.bhj.fleet.new").exists()


def test_a_snapshot_this_code_cannot_unpickle_starts_the_bidder_new(tmp_path: Path) -> None:
    """A snapshot from other code (here: a spec that no longer unpickles) is one warning and
    a new agent, not an actor that fails to start at every try."""
    host = BidderHost(RIDERS_W, str(tmp_path))
    host._spec_blob = b"not a pickle"
    host._snapshot()
    again = BidderHost(RIDERS_W, str(tmp_path))
    assert not again.restored and again.agent.committed_units == 0


def test_a_fleet_left_by_a_killed_replica_is_saved_by_the_runner(tmp_path: Path) -> None:
    """Serve killed the replica under load before it saved: `bidhive serve` saves the run's
    snapshot dir once Ray is down, so the next start resumes it; where the replica's own
    save got through, that save stands."""
    from serve.config import ServeCfg
    from serve.runner import _save_left_fleet

    journal, run, _ = _stopped_run(tmp_path)
    cfg = ServeCfg(fleet="default", bidders="ray", journal=str(journal), seed=SEED)
    fingerprint = fleet_fingerprint(load_fleet("default"), SEED)
    _save_left_fleet(run, cfg)
    assert not saved_fleet_path(journal).exists()  # a dir no fleet claimed: not saved
    claim_state_dir(run, fingerprint, None, journal)  # as `spawn_fleet` does at the start
    _save_left_fleet(run, cfg)
    (tmp_path / "next").mkdir()
    assert carry_fleet(journal, fingerprint, tmp_path / "next").agents == ("riders-w",)
    saved_at = (saved_fleet_path(journal) / "manifest.json").read_text()
    assert not fleet_state.save_after_kill(run, journal)  # it matches the journal already
    assert (saved_fleet_path(journal) / "manifest.json").read_text() == saved_at


def test_a_new_fleet_takes_up_the_dir_a_dead_replica_left(tmp_path: Path) -> None:
    """A replica that Serve restarted left its fleet's dir: the next fleet of the same
    `bidhive serve` run saves it beside the journal, carries it, and removes it, so the dir
    found at the stop is the last fleet's; other runs' dirs stay."""
    journal, run, _ = _stopped_run(tmp_path)
    root = tmp_path / "shm"
    dead, new, other = root / "bidhive-serve-aa-old", root / "bidhive-serve-aa-new", root / "bidhive-serve-bb-x"
    for folder in (new, other):
        folder.mkdir(parents=True)
    run.rename(dead)
    claim_state_dir(dead, FINGERPRINT, None, journal)  # as the dead replica's fleet did at its start
    claim_state_dir(new, FINGERPRINT, "bidhive-serve-aa-", journal)
    assert sorted(p.name for p in root.iterdir()) == ["bidhive-serve-aa-new", "bidhive-serve-bb-x"]
    assert (new / "fleet.json").exists()
    assert carry_fleet(journal, FINGERPRINT, new).agents == ("riders-w",)
    assert BidderHost(RIDERS_W, str(new)).agent.committed_units == 1


def _killed_service(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A journal ending in a torn record, and the snapshot dir in `root` its killed service's
    bidders left (its owner a process that is gone)."""
    journal, run, _ = _stopped_run(tmp_path)
    root = tmp_path / "shm"
    root.mkdir()
    dead = root / "bidhive-serve-aa-x"
    run.rename(dead)
    dead_owner(dead, "fleet.json", fingerprint=FINGERPRINT, journal=str(journal.resolve()), service=True)
    with journal.open("ab") as file:
        file.write(b"\x40\x00\x00\x00torn")  # the killed writer's half record
    return journal, root, dead


def test_a_killed_services_fleet_is_saved_and_taken_up_by_the_next_start(tmp_path: Path) -> None:
    """Killed outright, the service saved nothing and left its bidders' dir: the next start
    on that journal cuts its torn record (as its writer would), saves the dir beside the
    journal, removes it, and takes the fleet up."""
    journal, root, dead = _killed_service(tmp_path)
    whole = journal.stat().st_size - 8
    with pytest.warns(TornTailWarning):
        assert rescue_dead_fleets(root) == [dead.name]
    assert journal.stat().st_size == whole and not any(root.iterdir())
    new_run = tmp_path / "run-2"
    new_run.mkdir()
    origin = carry_fleet(journal, FINGERPRINT, new_run)
    assert origin.carried and "when the service was killed" in origin.why, origin
    assert BidderHost(RIDERS_W, str(new_run)).agent.committed_units == 1


def test_a_killed_services_fleet_is_left_while_a_live_service_holds_the_journal(tmp_path: Path) -> None:
    """The journal's lock comes before the claim: while another process holds it (that
    journal's own restart, under way), the dir is not touched, so that start can save and
    resume it; once nobody holds it, a start saves it."""
    journal, root, dead = _killed_service(tmp_path)
    with pytest.warns(TornTailWarning), JournalWriter(journal):
        assert rescue_dead_fleets(root) == []
        assert not saved_fleet_path(journal).exists() and [p.name for p in root.iterdir()] == [dead.name]
    assert rescue_dead_fleets(root) == [dead.name] and not any(root.iterdir())


def test_dead_fleets_of_other_journals_are_saved_beside_theirs(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A start saves a killed service's fleet beside that service's journal whatever journal
    it starts on, so that memory is not held until a start on that journal; one whose
    journal is certainly gone (deleted from a folder that is there) is removed; one whose
    journal's folder is not there (an unmounted volume comes back), one that names no
    journal, and a live service's, stay, the dead ones each named in a warning that says
    what they hold and how to free it."""
    journal, root, dead = _killed_service(tmp_path)
    unknown = root / "bidhive-serve-cc-x"
    unknown.mkdir()
    dead_owner(unknown, "fleet.json", fingerprint=FINGERPRINT)
    for gone, named in (("bb-x", tmp_path / "deleted.bhj"), ("bb-y", tmp_path / "unmounted" / "j.bhj")):
        (root / f"bidhive-serve-{gone}").mkdir()
        dead_owner(root / f"bidhive-serve-{gone}", "fleet.json", fingerprint=FINGERPRINT, journal=str(named))
    live = root / "bidhive-serve-dd-x"
    live.mkdir()
    write_owner(live, "fleet.json", fingerprint=FINGERPRINT, journal=str(journal.resolve()))  # this live process's
    left = sorted((live.name, unknown.name, "bidhive-serve-bb-y"))
    (root / "bidhive-serve-bb-y" / "riders-w.snap").write_bytes(b"x" * 250_000)
    with pytest.warns(TornTailWarning), caplog.at_level("WARNING", logger=fleet_state.logger.name):
        assert rescue_dead_fleets(root) == [dead.name]
    assert sorted(p.name for p in root.iterdir()) == left
    kept = [r.getMessage() for r in caplog.records if "remove it to free the memory" in r.getMessage()]
    assert len(kept) == 2, kept
    assert any("bidhive-serve-bb-y (0.3 MB" in m and str(tmp_path / "unmounted" / "j.bhj") in m for m in kept), kept
    assert any(unknown.name in m and "names no journal, so no start will resume it" in m for m in kept), kept
    new_run = tmp_path / "run-2"
    new_run.mkdir()
    origin = carry_fleet(journal, FINGERPRINT, new_run)
    assert origin.carried and "when the service was killed" in origin.why, origin
    assert rescue_dead_fleets(root) == [] and sorted(p.name for p in root.iterdir()) == left


def test_a_dir_without_snapshots_is_not_saved(tmp_path: Path) -> None:
    """A dir gone (another start took it) or never written to would save an empty fleet
    the next start would resume as if it were the state."""
    journal, _, _ = _stopped_run(tmp_path)
    (tmp_path / "empty").mkdir()
    for source in (tmp_path / "empty", tmp_path / "gone"):
        with pytest.raises(FleetSaveError, match="no bidder snapshot"):
            save_fleet(source, journal, FINGERPRINT)
    assert not saved_fleet_path(journal).exists()
