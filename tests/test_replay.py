"""The auction journal end to end: record a run, re-clear it, verify, what-if, explain, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agents.fleet import build_fleet
from market.config import load_fleet, load_profile, load_scenario
from market.engine import LocalBidders, MarketEngine
from market.journal import JournalWriter, TornTailWarning, journal_files, read_journal
from market.journal_recorder import JournalRecorder
from market.replay import JournalReplay, bidders_by_order, clear, explain, make_mechanism, replay, verify
from market.simulator import SimSetup, Simulator
from policies.registry import make_policy
from tests.factories import REPO, cli_env, refuse_commits, untimed

CLI = [sys.executable, "-m", "bidhive_cli.main"]


def bidhive(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, cwd=REPO, env=cli_env())


def record(path: Path, policy: str = "heuristic", n_orders: int = 300, seed: int = 21, payment: str = "first_score",
           **recorder_kw: Any) -> dict[str, Any]:
    """Simulates a weekday into a journal and returns the simulator's KPIs."""
    setup = SimSetup.build(load_scenario("weekday"), make_policy(policy, payment), seed=seed,  # type: ignore[arg-type]
                           n_orders=n_orders, recorder=JournalRecorder(path, **recorder_kw))
    return Simulator(setup).run()


def rewrite(src: Path, dst: Path, edit: Any) -> None:
    """Copies a journal record by record through the writer, letting `edit` change records."""
    with JournalWriter(dst, fsync="never") as writer:
        for rec in read_journal(src):
            rec = edit(rec) or rec
            writer.append(rec["type"], **{k: v for k, v in rec.items() if k not in ("seq", "type")})


@pytest.fixture(scope="module")
def heuristic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    path = tmp_path_factory.mktemp("journal") / "heuristic.bhj"
    return path, record(path)


# --------------------------------------------------------------------------- the record


def test_journal_holds_every_record_type_in_causal_order(heuristic: tuple[Path, dict[str, Any]]) -> None:
    path, kpis = heuristic
    records = list(read_journal(path))
    first = records[0]
    assert first["type"] == "run_started"
    assert {"bidhive", "numpy", "msgpack"} <= set(first["versions"])
    assert first["mechanism"] == "auction/greedy/first_score" and first["profile_name"] == "balanced"
    assert len(first["bidders"]["ids"]) == first["bidders"]["category_ok"].shape[0]
    types = {r["type"] for r in records}
    assert {"order_received", "round_opened", "round_cleared", "hold_committed", "hold_released"} <= types
    received, opened = set(), set()
    for r in records:
        if r["type"] == "order_received":
            received.add(r["order_id"])
        elif r["type"] == "round_opened":
            assert set(r["orders"]) <= received  # an order is journaled before any bidder is asked
            opened.add(r["round_id"])
        elif r["type"] == "round_cleared":
            assert r["round_id"] in opened
    assert sum(r["type"] == "round_cleared" for r in records) == kpis["rounds"]


def test_simulated_journal_verifies_and_logged_kpis_match_the_run(heuristic: tuple[Path, dict[str, Any]]) -> None:
    path, kpis = heuristic
    report = replay(path)
    assert report.ok, report.first_mismatch
    assert report.rounds == report.verified_rounds == kpis["rounds"]
    logged = report.logged.report()
    assert logged["orders"] == kpis["orders"]
    assert logged["fulfilled_rate"] == kpis["fulfilled_rate"]
    assert logged["cost_per_order"] == kpis["cost_per_order"]  # same sums in the same order: equal bits
    assert report.replayed is not None
    timing = ("p50_clear_ms", "p99_clear_ms")
    strip = lambda d: {k: v for k, v in d.items() if k not in timing}  # noqa: E731
    assert strip(report.replayed.report()) == strip(logged)


class RefusingBidders(LocalBidders):
    """In-process bidders whose winners refuse the commits of every `every`-th round with
    awards, as a bidder that crashed or lied about capacity does in the Ray runtime."""

    def __init__(self, agents: Any, strategy: Any, every: int) -> None:
        super().__init__(agents, strategy)
        self.every, self.award_rounds = every, 0

    def settle(self, round_id: int, awards: dict[str, Any], quoted: list[str], now: float) -> set[int] | None:
        self.award_rounds += bool(awards)
        if not awards or self.award_rounds % self.every:
            return super().settle(round_id, awards, quoted, now)
        return refuse_commits(self, round_id, awards, quoted, now)


@pytest.mark.parametrize("max_attempts", [1, 2])
def test_refused_commits_are_journaled_and_replay_counts_them_as_the_run_did(tmp_path: Path,
                                                                             max_attempts: int) -> None:
    """A refused award is unserved (`commit_refused`) in the run: the journal says so, never
    lists it as committed, and replay's KPIs are the run's (no award counted twice on retry)."""
    path = tmp_path / "refused.bhj"
    scenario = load_scenario("weekday")
    scenario = scenario.model_copy(update={"round": scenario.round.model_copy(update={"max_attempts": max_attempts})})
    setup = SimSetup.build(scenario, make_policy("heuristic"), seed=3, n_orders=300,
                           recorder=JournalRecorder(path, timing=False))
    kpis = Simulator(setup, bidders=lambda fleet, pol: RefusingBidders(fleet.agents, pol.strategy, every=5)).run()
    assert kpis["unfulfilled"].get("commit_refused", 0) > 0 or max_attempts > 1
    committed: dict[int, set[str]] = {}
    refused: dict[int, list[str]] = {}
    for rec in read_journal(path):
        if rec["type"] == "hold_committed":
            committed[rec["round_id"]] = {oid for oids in rec["orders"] for oid in oids}
        elif rec["type"] == "hold_released" and "refused" in rec:
            refused[rec["round_id"]] = rec["refused"]
    assert len(refused) >= 10
    for round_id, oids in refused.items():
        assert not committed.get(round_id, set()) & set(oids)
    report = replay(path)
    assert report.ok, report.first_mismatch
    logged = report.logged.report()
    assert logged["fulfilled_rate"] == kpis["fulfilled_rate"]
    assert logged["unfulfilled"] == kpis["unfulfilled"]
    assert logged["duplicate_awards"] == 0
    assert logged["cost_per_order"] == pytest.approx(kpis["cost_per_order"], rel=1e-12)
    assert replay(path, workers=2).logged.report() == logged
    what_if = replay(path, profile=load_profile("time_first"), profile_name="time_first").what_if
    assert what_if is not None and what_if.report()["duplicate_awards"] == 0
    round_id, oids = next(iter(refused.items()))
    told = explain(path, oids[0])
    refused_round = next(r for r in told["rounds"] if r["round_id"] == round_id)
    assert refused_round["commit_refused"] and "refused" in refused_round["verdict"]
    if max_attempts == 1:  # no retry: the refused round was its last
        assert told["rounds"][-1] is refused_round and told["outcome"] == "unserved (commit_refused)"


def test_tampered_award_fails_verify_naming_it(heuristic: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path, _ = heuristic
    target: dict[str, Any] = {}

    def tamper(rec: dict[str, Any]) -> None:
        if rec["type"] == "round_opened":
            target.setdefault("orders", {})[rec["round_id"]] = rec["orders"]
        if rec["type"] == "round_cleared" and "round_id" not in target and rec["round_id"] > 20:
            won = np.flatnonzero(rec["award_i"][0] >= 0)
            if len(won):
                o = int(won[0])
                rec["award_i"][0, o] += 1  # another combination won
                target.update(round_id=rec["round_id"], order_id=target["orders"][rec["round_id"]][o])

    bad = tmp_path / "tampered.bhj"
    rewrite(path, bad, tamper)
    mismatch = verify(bad)
    assert mismatch is not None
    assert (mismatch.round_id, mismatch.order_id) == (target["round_id"], target["order_id"])
    assert mismatch.field.startswith("winner")
    out = bidhive("replay", str(bad), "--verify")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert f"round {target['round_id']}" in line and target["order_id"] in line and "winner" in line


def test_tampered_payment_is_named(heuristic: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path, _ = heuristic
    done: list[int] = []

    def tamper(rec: dict[str, Any]) -> None:
        if rec["type"] == "round_cleared" and not done and (rec["award_i"][0] >= 0).any():
            o = int(np.flatnonzero(rec["award_i"][0] >= 0)[0])
            rec["award_f"][1, o] = np.nextafter(rec["award_f"][1, o], np.inf)  # one ulp
            done.append(rec["round_id"])

    bad = tmp_path / "payment.bhj"
    rewrite(path, bad, tamper)
    mismatch = verify(bad)
    assert mismatch is not None and mismatch.round_id == done[0] and mismatch.field == "leg_payment"


def legs_first(rec: dict[str, Any]) -> None:
    """Lays a round's flat quotes out legs first, sources after, each kind in its order.

    A shell that journals quotes as they arrive may interleave them so.
    """
    if rec["type"] != "round_cleared" or "q_counts" not in rec:
        return
    n_q, n_rows, _ = rec["q_counts"]
    qi, qf = rec["quotes_i"], rec["quotes_f"]
    meta = qi[:4 * n_q].reshape(n_q, 4)
    ends = np.cumsum(meta[:, 1])
    rows = [slice(e - r, e) for e, r in zip(ends, meta[:, 1])]
    leg_ends = np.cumsum(meta[:, 1] * meta[:, 3])
    legs = [slice(e - r, e) for e, r in zip(leg_ends, meta[:, 1] * meta[:, 3])]
    order = [k for k in range(n_q) if meta[k, 3]] + [k for k in range(n_q) if not meta[k, 3]]
    idx, values = qi[4 * n_q:].reshape(2, n_rows), qf[n_q:n_q + 2 * n_rows].reshape(2, n_rows)
    travel = qf[n_q + 2 * n_rows:]
    rec["quotes_i"] = np.concatenate([meta[order].ravel(), *(idx[i, rows[k]] for i in (0, 1) for k in order)])
    rec["quotes_f"] = np.concatenate([qf[:n_q][order], *(values[i, rows[k]] for i in (0, 1) for k in order),
                                      *(travel[legs[k]] for k in order if meta[k, 3])])


def test_quotes_journaled_legs_first_clear_the_same(heuristic: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path, _ = heuristic
    moved = tmp_path / "legs_first.bhj"
    rewrite(path, moved, legs_first)
    mixed = [r for r in read_journal(moved) if r["type"] == "round_cleared" and r["q_counts"][2]
             and r["q_counts"][2] < r["q_counts"][1]]
    assert mixed and all(r["quotes_i"][3] == 1 for r in mixed)  # the first quote is now a leg
    report = replay(moved)
    assert report.ok, report.first_mismatch
    assert report.verified_rounds == replay(path).verified_rounds


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_report_what_one_process_does(heuristic: tuple[Path, dict[str, Any]], tmp_path: Path,
                                              workers: int) -> None:
    path, _ = heuristic
    one, shared = replay(path), replay(path, workers=workers)
    assert untimed(shared) == untimed(one)
    assert shared.replayed is not None and len(shared.replayed.clear_ms) == shared.rounds == shared.verified_rounds
    two_runs = tmp_path / "two.bhj"
    record(two_runs, n_orders=40, seed=1)
    record(two_runs, policy="static", n_orders=40, seed=2)
    assert untimed(replay(two_runs, workers=workers)) == untimed(replay(two_runs))
    bad = tmp_path / "bad.bhj"
    rewrite(path, bad, lambda rec: rec.update(total_cost=rec["total_cost"] + 1.0) if rec.get("round_id") == 7
            and rec["type"] == "round_cleared" else None)
    for stop in (False, True):  # a difference sends the journal through one process: the same report
        one, shared = replay(bad, stop_at_first=stop), replay(bad, stop_at_first=stop, workers=workers)
        assert not shared.ok and untimed(shared) == untimed(one)


# --------------------------------------------------------------------------- what-if


def test_what_if_profile_changes_awards(heuristic: tuple[Path, dict[str, Any]]) -> None:
    path, _ = heuristic
    journal = JournalReplay(path)
    mech = None
    differ = 0
    cost_first, time_first = load_profile("cost_first"), load_profile("time_first")
    for rr in journal.rounds():
        assert journal.header is not None
        mech = mech or make_mechanism(journal.header.mechanism)
        _, a = clear(journal.header, rr.rnd, rr.quotes, cost_first, mech)
        _, b = clear(journal.header, rr.rnd, rr.quotes, time_first, mech)
        differ += int(not np.array_equal(a.winner, b.winner))
    assert differ > 0
    cheap = replay(path, profile=cost_first, profile_name="cost_first")
    fast = replay(path, profile=time_first, profile_name="time_first")
    assert cheap.what_if is not None and fast.what_if is not None
    c, f = cheap.what_if.report(), fast.what_if.report()
    assert c["award_share"] != f["award_share"] or c["cost_per_order"] != f["cost_per_order"]
    assert c["duplicate_awards"] == f["duplicate_awards"] == 0  # an order served early is not served again
    assert cheap.kpi_diff() and "p50_clear_ms" not in cheap.kpi_diff()


def test_what_if_payment_rule_raises_payments(heuristic: tuple[Path, dict[str, Any]]) -> None:
    path, _ = heuristic
    report = replay(path, payment="second_score", verify=False)
    assert report.what_if is not None and report.replayed is None
    assert report.what_if.report()["cost_per_order"] >= report.logged.report()["cost_per_order"]


# --------------------------------------------------------------------------- other journals


def test_static_and_second_score_journals_verify(tmp_path: Path) -> None:
    static = tmp_path / "static.bhj"
    record(static, policy="static", n_orders=150, seed=3)
    assert replay(static).ok
    vcg = tmp_path / "vcg.bhj"
    record(vcg, n_orders=120, seed=4, payment="second_score")
    report = replay(vcg, stop_at_first=True)
    assert report.ok, report.first_mismatch
    assert report.header.mechanism == "auction/greedy/second_score"


def test_journals_before_the_reserve_cap_re_clear_by_their_own_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A schema-3 VCG journal paid winners without the reserve cap: it still verifies, and
    the same records read as schema 4 do not, so the schema is what picks the rule."""
    import market.journal_recorder as recorder_module
    from market.clearing import ScoringAuction
    from policies.heuristic import LoadMarkup
    from policies.registry import NetworkPolicy

    old = tmp_path / "old.bhj"
    monkeypatch.setattr(recorder_module, "JOURNAL_SCHEMA", 3)
    uncapped = NetworkPolicy("heuristic", LoadMarkup(), ScoringAuction(payment="second_score", reserve_cap=False))
    Simulator(SimSetup.build(load_scenario("weekday"), uncapped, seed=4, n_orders=120,
                             recorder=JournalRecorder(old))).run()
    monkeypatch.undo()
    assert next(iter(read_journal(old)))["schema"] == 3
    report = replay(old, stop_at_first=True)
    assert report.ok, report.first_mismatch
    relabelled = tmp_path / "relabelled.bhj"
    rewrite(old, relabelled, lambda rec: rec.update(schema=4) if rec["type"] == "run_started" else None)
    mismatch = replay(relabelled, stop_at_first=True).first_mismatch
    assert mismatch is not None and mismatch.field in ("src_payment", "leg_payment")


def engine_shell(path: Path, seed: int, n_orders: int, bidders: type[LocalBidders] = LocalBidders,
                 **recorder_kw: Any) -> tuple[MarketEngine, JournalRecorder, list[Any]]:
    """A shell that drives MarketEngine itself, as the Ray runtime does: engine, journal, orders."""
    from market.demand import generate_orders

    sc = load_scenario("weekday")
    fleet = build_fleet(load_fleet(sc.fleet), seed=seed)
    policy = make_policy("heuristic")
    recorder = JournalRecorder(path, fleet=fleet, **recorder_kw)
    engine = MarketEngine(fleet, policy, load_profile("balanced"), bidders(fleet.agents, policy.strategy),
                          seed=seed, recorder=recorder)
    recorder.run_started({"policy": policy.name, "mechanism": policy.mechanism.name, "seed": seed,
                          "profile": engine.profile, "profile_name": "balanced"})
    return engine, recorder, generate_orders(sc, fleet.cfg, fleet.env.catalogue, n_orders, seed=seed)


def trade_in_batches(engine: MarketEngine, recorder: JournalRecorder, orders: list[Any], size: int,
                     before: Any = None) -> None:
    """Journals and trades the orders a batch per round (``before(k, now)`` ahead of each), then closes."""
    for k in range(0, len(orders), size):
        batch = orders[k:k + size]
        now = batch[-1].created_s
        if before is not None:
            before(k, now)
        for o in batch:
            recorder.order_received(o, now)
        engine.run_round(batch, now, [0] * len(batch))
    recorder.close()


def test_any_engine_shell_with_a_live_profile_switch_verifies(tmp_path: Path) -> None:
    """No simulator: a shell drives MarketEngine itself, as the Ray runtime will."""
    path = tmp_path / "shell.bhj"
    engine, recorder, orders = engine_shell(path, 9, 120, fsync="always", rotate_bytes=64_000)

    def switch_at_64(k: int, now: float) -> None:
        if k == 64:
            engine.profile = load_profile("vip_guard")
            recorder.profile_changed("vip_guard", now)

    trade_in_batches(engine, recorder, orders, 8, switch_at_64)
    assert len(journal_files(path)) > 1  # rotated
    report = replay(path)
    assert report.ok, report.first_mismatch
    assert report.rounds == 15
    assert any(r["type"] == "profile_changed" and r["name"] == "vip_guard" for r in read_journal(path))


class _HugeCapacity(LocalBidders):
    """In-process bidders whose first quote of every other round claims a capacity int32 cannot hold."""

    def quote_all(self, rnd: Any, now: float, hold_ttl_s: float) -> list[Any]:
        quotes = super().quote_all(rnd, now, hold_ttl_s)
        if quotes and rnd.round_id % 2:
            quotes[0].capacity = 2**40
        return quotes


def test_quotes_int32_cannot_hold_are_journaled_per_quote_and_verify(tmp_path: Path) -> None:
    """The columns go to disk as int32; a round they would not fit is written quote by quote, exactly."""
    path = tmp_path / "huge.bhj"
    engine, recorder, orders = engine_shell(path, 5, 40, _HugeCapacity)
    trade_in_batches(engine, recorder, orders, 4)
    cleared = [r for r in read_journal(path) if r["type"] == "round_cleared"]
    per_quote = [r for r in cleared if "quotes" in r]
    assert per_quote and len(per_quote) < len(cleared)  # only the rounds that need it
    assert all(any(q["capacity"] == 2**40 for q in r["quotes"]) for r in per_quote)
    report = replay(path)
    assert report.ok, report.first_mismatch
    assert report.verified_rounds == len(cleared)


def test_a_continued_journal_replays_run_after_run(tmp_path: Path) -> None:
    """A restarted shell reopens its journal: a second run_started starts a new segment."""
    path = tmp_path / "two.bhj"
    first = record(path, n_orders=60, seed=1)
    second = record(path, policy="static", n_orders=60, seed=2)
    report = replay(path)
    assert report.ok, report.first_mismatch
    assert report.segments == 2 and report.rounds == first["rounds"] + second["rounds"]


def test_seeded_journal_is_byte_identical_without_timing(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bhj", tmp_path / "b.bhj"
    record(a, n_orders=80, seed=6, timing=False)
    record(b, n_orders=80, seed=6, timing=False)
    assert a.read_bytes() == b.read_bytes()


def test_torn_tail_still_replays_with_a_warning(heuristic: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path, _ = heuristic
    torn = tmp_path / "torn.bhj"
    data = path.read_bytes()
    torn.write_bytes(data[:-5])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = replay(torn)
    assert report.ok and any(issubclass(w.category, TornTailWarning) for w in caught)


# --------------------------------------------------------------------------- explain


def test_explain_names_the_winner(heuristic: tuple[Path, dict[str, Any]]) -> None:
    path, _ = heuristic
    rounds = [rr for rr in JournalReplay(path).rounds() if (rr.logged.award_i[0] >= 0).any()]
    rr = rounds[len(rounds) // 2]
    o = int(np.flatnonzero(rr.logged.award_i[0] >= 0)[0])
    order_id = rr.rnd.orders[o].order_id
    result = explain(path, order_id)
    last = result["rounds"][-1]
    assert result["outcome"] == "awarded" and last["matches_log"] is True
    win = last["winner"]
    assert win["source"] in result["verdict"] and win["leg"] in result["verdict"]
    winners = [c for c in last["combinations"] if c["winner"]]
    assert len(winners) == 1 and winners[0]["feasible"] and winners[0]["source"] == win["source"]
    assert all(c["why_not"] or c["rank"] > winners[0]["rank"] for c in last["combinations"] if not c["winner"])
    out = bidhive("replay", str(path), "--order", order_id)
    assert out.returncode == 0, out.stderr
    assert "WINNER" in out.stdout and win["leg"] in out.stdout


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "no journal at"),
        ("not_a_journal", "is not a bidhive journal"),
        ("corrupt", "byte offset"),
        ("unknown_profile", "unknown profile 'fastest'"),
        ("unknown_order", "is not in the journal"),
        ("bad_payment", "unknown payment rule"),
        ("bad_refused", "'refused' must be a list of order ids"),
        ("bad_refused_by", "'refused_by' a map of bidder to order ids"),
        ("short_reasons", "the round has 1 orders"),
        ("short_masks", "lacks what replay needs"),
    ],
)
def test_replay_bad_input_is_one_readable_line(case: str, expected: str, heuristic: tuple[Path, dict[str, Any]],
                                               tmp_path: Path) -> None:
    path, _ = heuristic
    args = [str(path)]
    if case == "missing":
        args = [str(tmp_path / "nope.bhj")]
    elif case == "not_a_journal":
        (tmp_path / "x.txt").write_text("hello, I am not a journal\n")
        args = [str(tmp_path / "x.txt")]
    elif case == "corrupt":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # a damaged record with good ones after it
        (tmp_path / "corrupt.bhj").write_bytes(bytes(data))
        args = [str(tmp_path / "corrupt.bhj"), "--verify"]
    elif case == "unknown_profile":
        args += ["--profile", "fastest"]
    elif case == "unknown_order":
        args += ["--order", "o-nope"]
    elif case == "bad_payment":
        args += ["--payment", "vcg"]
    elif case == "bad_refused":  # a well-framed record whose refused awards are not order ids
        def edit(rec: dict[str, Any]) -> None:
            if rec["type"] == "hold_released" and rec["round_id"] == 5:
                rec["refused"] = [17]
        rewrite(path, tmp_path / "bad.bhj", edit)
        args = [str(tmp_path / "bad.bhj")]
    elif case == "bad_refused_by":  # who refused, but not as order ids
        def edit_by(rec: dict[str, Any]) -> None:
            if rec["type"] == "hold_released" and rec["round_id"] == 5:
                rec["refused"], rec["refused_by"] = ["o-x"], {"crowd": [["o-x"]]}
        rewrite(path, tmp_path / "bad.bhj", edit_by)
        args = [str(tmp_path / "bad.bhj")]
    elif case in ("short_reasons", "short_masks"):  # well framed, but a part shorter than the rest
        def cut(rec: dict[str, Any]) -> None:
            if case == "short_reasons" and rec["type"] == "round_cleared" and rec["round_id"] == 5:
                rec["reason"] = []
            if case == "short_masks" and rec["type"] == "run_started":
                rec["bidders"]["category_ok"] = rec["bidders"]["category_ok"][:-1]
        rewrite(path, tmp_path / "bad.bhj", cut)
        args = [str(tmp_path / "bad.bhj"), "--verify"]
    out = bidhive("replay", *args)
    assert out.returncode not in (0, 1) or case == "corrupt" and out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr


def test_a_journal_cut_inside_its_first_record_says_where_it_was_cut(heuristic: tuple[Path, dict[str, Any]],
                                                                    tmp_path: Path) -> None:
    path, _ = heuristic
    cut = tmp_path / "cut.bhj"
    cut.write_bytes(path.read_bytes()[:3000])  # inside run_started, a few kB long
    out = bidhive("replay", str(cut))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(lines) == 2 and "torn last record at byte offset 8" in lines[0] and "no run_started" in lines[1]


def test_who_refused_is_turned_around_per_order_and_malformed_entries_add_nothing() -> None:
    """The service's order index reads `refused_by` / `cancelled` this way, and must not stop on a bad entry."""
    assert bidders_by_order({"crowd": ["o-1", "o-2"], "riders-a": ["o-2"]}) == {"o-1": ["crowd"], "o-2": ["crowd", "riders-a"]}
    assert bidders_by_order({"crowd": [["o-1"]], "riders-a": "o-2", "wh": ["o-3"]}) == {"o-3": ["wh"]}
    assert bidders_by_order(None) == bidders_by_order(["o-1"]) == {}


def test_simulate_journal_then_replay_verify_json_and_plot(tmp_path: Path) -> None:
    path = tmp_path / "cli.bhj"
    sim = bidhive("simulate", "--scenario", "weekday", "--orders", "150", "--seed", "8", "--journal", str(path), "--json")
    assert sim.returncode == 0, sim.stderr
    kpis = json.loads(sim.stdout)
    out = bidhive("replay", str(path), "--verify")
    assert out.returncode == 0, out.stderr
    assert "verified" in out.stdout
    png = tmp_path / "kpis.png"
    out = bidhive("replay", str(path), "--profile", "time_first", "--json", "--plot", str(png))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["kpis"]["logged"]["cost_per_order"] == kpis["cost_per_order"]
    assert result["what_if"] == {"profile": "time_first", "payment": "first_score"} and "diff" in result
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = bidhive("simulate", "--scenario", "weekday", "--orders", "10", "--journal", str(path))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_a_reader_that_stops_early_is_not_a_verify_failure(heuristic: tuple[Path, dict[str, Any]]) -> None:
    """`bidhive replay J --verify | head -1`: exit 141, as a process killed by SIGPIPE, not
    the 1 that means "the journal differs", and no traceback."""
    path, _ = heuristic
    proc = subprocess.Popen([*CLI, "replay", str(path), "--verify"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=REPO, env=cli_env())
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"journal ")
    proc.stdout.close()  # the reader goes away; the report is still to come
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""
