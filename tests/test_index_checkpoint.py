"""The order index's checkpoint: a restart from it and the journal files after it gives the
index a restart from the whole journal gives, and any checkpoint that does not fit is
ignored, never trusted."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market.journal import journal_files, read_journal
from serve import index_checkpoint
from serve.config import BatchCfg, ServeCfg
from serve.desk import OrderDesk, ended_kept_live
from serve.index_checkpoint import Cut, checkpoint_path, read_checkpoint, rebuild_index, write_checkpoint
from serve.order_index import OrderIndex
from tests.factories import place_all

N_ORDERS = 150


def _cfg(journal: Path) -> ServeCfg:
    return ServeCfg(fleet="district", bidders="local", journal=str(journal), journal_rotate_mb=0.03,
                    batch=BatchCfg(window_ms=2, retry_after_ms=5, max_attempts=2))


def _place_all(desk: OrderDesk, ids: range) -> list[dict[str, Any]]:
    return place_all(desk, ids, batch=6)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """A service journal in several files, with the checkpoint its last rotation left."""
    journal = tmp_path_factory.mktemp("checkpoint") / "j.bhj"
    desk = OrderDesk(_cfg(journal))
    try:
        answers = _place_all(desk, range(N_ORDERS))
        desk.set_profile("time_first")
    finally:
        desk.close()
    assert desk.checkpoints.written >= 2 and len(journal_files(journal)) >= 3
    return journal, answers


def _same(a: OrderIndex, b: OrderIndex, order_ids: list[str]) -> None:
    """Two indexes answer alike: every order, key and count a client or a restart sees."""
    assert (len(a), a.forgotten, a.segments, a.rounds, a.profile) == (len(b), b.forgotten, b.segments, b.rounds,
                                                                      b.profile)
    assert a.keys == b.keys and [v.order_id for v in a.unfinished()] == [v.order_id for v in b.unfinished()]
    for oid in order_ids:
        assert json.dumps(a.detail(oid)) == json.dumps(b.detail(oid)), oid
    for key in a.keys:
        assert a.by_key(key) == b.by_key(key)


@settings(max_examples=20, deadline=None)
@given(cut=st.floats(0.0, 1.0), retain=st.integers(1, N_ORDERS + 4), hot=st.integers(12, 20))
def test_a_checkpoint_and_the_records_after_it_make_the_whole_index(
        served: tuple[Path, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory, cut: float,
        retain: int, hot: int) -> None:
    """Taken at any record, kept apart from the records applied after it was taken (they
    go on mutating the live index before the checkpoint is written), and read back."""
    journal, answers = served
    records = list(read_journal(journal))
    at = int(cut * len(records))
    live = OrderIndex(retain, hot)
    for rec in records[:at]:
        live.apply(rec)
    state = live.state()
    for rec in records[at:]:
        live.apply(rec)  # what the service goes on doing while the checkpoint is written
    path = tmp_path_factory.mktemp("cp") / "j.bhj.index"
    write_checkpoint(path, Cut(b"head", 0, at, 0), state)
    header, read_back = read_checkpoint(path)
    assert (header["next_seq"], bytes(header["head"])) == (at, b"head")
    restored = OrderIndex.restored(read_back)
    for rec in records[at:]:
        restored.apply(rec)
    _same(restored, live, [a["order_id"] for a in answers])


def test_a_restart_after_a_stop_reads_the_checkpoint_and_no_record(
        served: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    """Stopping started a new file and checkpointed at it; a crash would leave the last
    rotation's checkpoint, which the property test above covers with the records after it."""
    journal, answers = served
    header, _ = read_checkpoint(checkpoint_path(journal))
    files = journal_files(journal)
    total = sum(1 for _ in read_journal(journal))
    assert (header["first_file"], header["next_seq"]) == (len(files) - 1, total)
    rebuilt = rebuild_index(journal, 1_000_000, ended_kept_live(_cfg(journal).batch))
    assert rebuilt.source == "checkpoint" and rebuilt.records == 0
    full = OrderIndex(1_000_000, ended_kept_live(_cfg(journal).batch))
    for rec in read_journal(journal):
        full.apply(rec)
    _same(rebuilt.index, full, [a["order_id"] for a in answers])
    copy = tmp_path / "j.bhj"  # the service itself, restarted on (a copy of) the journal
    for f in [*files, checkpoint_path(journal)]:
        shutil.copy(f, tmp_path / f.name)
    desk = OrderDesk(_cfg(copy))
    try:
        assert desk.health()[1]["index"]["from"] == "checkpoint" and desk.index.profile == "time_first"
        first_keyed = answers[1]
        repeat = _place_all(desk, range(1, 2))[0]  # k-1 again: the first answer, from the first file
        assert repeat == first_keyed
        more = _place_all(desk, range(N_ORDERS, N_ORDERS + 6))
    finally:
        desk.close()
    again = rebuild_index(copy, 1_000_000, ended_kept_live(_cfg(copy).batch))  # the stop checkpointed again
    assert again.source == "checkpoint" and again.records == 0
    full = OrderIndex(1_000_000, ended_kept_live(_cfg(copy).batch))
    for rec in read_journal(copy):
        full.apply(rec)
    _same(again.index, full, [a["order_id"] for a in answers + more])


def _damage(journal: Path, how: str) -> None:
    cp = checkpoint_path(journal)
    data = bytearray(cp.read_bytes())
    if how == "flipped byte":
        data[len(data) // 2] ^= 0xFF
    elif how == "cut short":
        del data[len(data) * 2 // 3:]
    elif how == "not a checkpoint":
        data[:8] = b"GARBAGE!"
    if how in ("flipped byte", "cut short", "not a checkpoint"):
        cp.write_bytes(bytes(data))
    else:  # the same index, cut elsewhere
        header, state = read_checkpoint(cp)
        head, first, seq, prev = bytes(header["head"]), header["first_file"], header["next_seq"], header["prev_bytes"]
        files = journal_files(journal)
        cuts = {
            "another journal": Cut(b"\0" * 8, first, seq, prev),
            "a seq the journal does not have there": Cut(head, first - 1, seq, files[first - 2].stat().st_size),
            "a file the journal does not have": Cut(head, 99, seq, prev),
            "a finished file that changed": Cut(head, first, seq, prev + 1),
        }
        if how in cuts:
            write_checkpoint(cp, cuts[how], state)


@pytest.mark.parametrize("how, says", [
    ("flipped byte", "damaged frame"), ("cut short", "cut short"), ("not a checkpoint", "not a bidhive index"),
    ("another journal", "another journal"), ("a seq the journal does not have there", "does not continue"),
    ("a file the journal does not have", "does not continue"), ("a finished file that changed", "is not the"),
    ("other settings", "retain_orders"),
])
def test_a_checkpoint_that_does_not_fit_is_ignored_and_the_whole_journal_read(
        served: tuple[Path, list[dict[str, Any]]], tmp_path: Path, how: str, says: str) -> None:
    journal, answers = served
    copy = tmp_path / "j.bhj"
    for f in [*journal_files(journal), checkpoint_path(journal)]:
        shutil.copy(f, tmp_path / f.name)
    _damage(copy, how)
    retain = 500_000 if how == "other settings" else 1_000_000
    hot = ended_kept_live(_cfg(copy).batch)
    rebuilt = rebuild_index(copy, retain, hot)
    assert rebuilt.source == "journal" and says in rebuilt.why_not, rebuilt.why_not
    full = OrderIndex(retain, hot)
    for rec in read_journal(copy):
        full.apply(rec)
    _same(rebuilt.index, full, [a["order_id"] for a in answers])


def test_a_checkpoint_that_fails_leaves_the_journal_and_the_answers_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The checkpoint is taken inside the journal's append: a failure there must not fail
    the append (a failed journal writer refuses every later record)."""
    def broken(self: OrderIndex) -> Any:
        raise MemoryError("no room for a copy")

    monkeypatch.setattr(OrderIndex, "state", broken)
    journal = tmp_path / "j.bhj"
    desk = OrderDesk(_cfg(journal))
    try:
        answers = _place_all(desk, range(60))
        assert desk.checkpoints.written == 0 and not checkpoint_path(journal).exists()
    finally:
        desk.close()
    assert len(journal_files(journal)) >= 2 and "checkpoint at journal file 1 skipped" in caplog.text
    assert {a["status"] for a in answers} <= {"awarded", "unfulfilled"} and len(answers) == 60
    assert rebuild_index(journal, 1_000_000, ended_kept_live(_cfg(journal).batch)).source == "journal"


def test_the_restart_bench_measures_what_it_says() -> None:
    from bench.restart_bench import run

    out = run(quick=True)
    rebuilt = {arm: runs[0] for arm, runs in out["rebuild"].items()}
    assert out["same_answers"] and out["journal_files"] > 2
    assert [r["from"] for r in rebuilt.values()] == ["journal", "checkpoint", "checkpoint"]
    crash, stop = out["checkpoints"]["last_rotation"], out["checkpoints"]["clean_stop"]
    assert 0 < rebuilt["last_rotation"]["records"] == rebuilt["journal"]["records"] - crash["next_seq"]
    assert rebuilt["clean_stop"]["records"] == 0 and stop["next_seq"] == rebuilt["journal"]["records"]
    assert out["checkpoint_cost"]["state_under_lock_ms"]["median"] > 0


def test_a_checkpoint_from_code_whose_views_have_other_fields_is_not_read(
        served: tuple[Path, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal, _ = served
    copy = tmp_path / "j.bhj"
    for f in [*journal_files(journal), checkpoint_path(journal)]:
        shutil.copy(f, tmp_path / f.name)
    header, state = read_checkpoint(checkpoint_path(copy))
    with monkeypatch.context() as patched:  # as an older bidhive would have written it
        patched.setattr(index_checkpoint, "_layout", lambda: ["order_id", "status"])
        write_checkpoint(checkpoint_path(copy), Cut(bytes(header["head"]), header["first_file"], header["next_seq"],
                                                    header["prev_bytes"]), state)
    rebuilt = rebuild_index(copy, 1_000_000, ended_kept_live(_cfg(copy).batch))
    assert rebuilt.source == "journal" and "other fields" in rebuilt.why_not
