"""Re-clearing one-order rounds as columns gives, to the bit, what the per-round path gives.

Replay clears a journal's one-order rounds a chunk at a time (`market.replay_columns`,
`market.book.one_order_book`, `market.clearing.one_order_allocations`). These tests
draw stacks of one-order rounds whose prices, times and reliabilities come from a few
values (so scores tie often), with capacities of 0, bidders without the order's
category, rounds without any combination and quotes journaled legs first, write them
through the real `JournalRecorder`, and compare the columns with the per-round path:
combination by combination, award by award, and report by report.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import market.replay as replay_mod
from market.book import CategoryTable, OneOrderQuotes, build_book, one_order_book
from market.clearing import ScoringAuction, clear_round, one_order_allocation, one_order_allocations
from market.config import ProfileCfg, load_profile
from market.journal import JournalReader, JournalWriter
from market.journal_recorder import JournalRecorder, award_arrays
from market.replay import JournalReplay, Mismatch, ReadStep, clear, replay, verify
from market.replay_columns import OneOrderCheck, OneOrderColumns
from market.round import Round, SourceSites, build_round
from market.types import CATEGORY_CODES, Kind, LegQuote, Quote, SourceQuote
from tests.factories import GRID, make_order, random_quotes, untimed
from tests.test_clearing_fastpath import tied_quotes

PROFILES = [load_profile(p) for p in ("balanced", "cost_first", "time_first", "vip_guard")]
N_SITES = 3
SOURCES = tuple(f"wh-{s}" for s in range(N_SITES))
LEGS = tuple(f"leg-{j}" for j in range(4))
BIDDERS = SOURCES + LEGS
KINDS = {**{s: Kind.WAREHOUSE for s in SOURCES}, **{leg: (Kind.RIDER_POOL, Kind.CROWD, Kind.LOCKER)[j % 3]
                                                     for j, leg in enumerate(LEGS)}}


def sites(seed: int) -> SourceSites:
    rng = np.random.default_rng(seed)
    return SourceSites(SOURCES, rng.uniform(-5, 5, N_SITES), rng.uniform(-5, 5, N_SITES),
                       np.ones((N_SITES, len(CATEGORY_CODES)), dtype=bool))


def legs_first(quotes: list[Quote]) -> list[Quote]:
    """The same quotes with every leg quote first, as a shell that journals quotes as they come may."""
    return [q for q in quotes if isinstance(q, LegQuote)] + [q for q in quotes if isinstance(q, SourceQuote)]


Drawn = tuple[list[tuple[Round, list[Quote]]], ProfileCfg, np.ndarray]


@st.composite
def one_order_rounds(draw: st.DrawFn, max_rounds: int = 24) -> Drawn:
    """Rounds of one order each over the same sites, and the run's profile and category masks."""
    base = draw(st.integers(0, 2**31 - 1))
    where = sites(base)
    rounds = []
    for i in range(draw(st.integers(1, max_rounds))):
        seed = draw(st.integers(0, 2**31 - 1))
        order = make_order(i, np.random.default_rng(seed), now=60.0 * i)
        rnd = build_round(i + 1, 60.0 * i + draw(st.sampled_from([0.0, 30.0, 0.5])), [order], where, GRID,
                          {"sku-00001": 1})
        quotes, _ = tied_quotes(rnd, seed, draw(st.integers(0, 4)), draw(st.integers(1, 3)))
        rounds.append((rnd, legs_first(quotes) if draw(st.booleans()) else quotes))
    masks = np.ones((len(BIDDERS), len(CATEGORY_CODES)), dtype=bool)
    if draw(st.booleans()):  # some bidders have not declared ambient, every order's category here
        masks[:, CATEGORY_CODES[rounds[0][0].orders[0].category]] = draw(
            st.lists(st.booleans(), min_size=len(BIDDERS), max_size=len(BIDDERS)))
    return rounds, draw(st.sampled_from(PROFILES)), masks


def categories_of(masks: np.ndarray) -> CategoryTable:
    return CategoryTable.from_masks({b: masks[i] for i, b in enumerate(BIDDERS)})


def write_journal(path: Path, drawn: Drawn) -> None:
    """Journals the rounds as the engine does: each cleared by the engine's own clearing step."""
    rounds, profile, masks = drawn
    where = rounds[0][0].sources
    recorder = JournalRecorder(path, fsync="never", timing=False)
    recorder.run_started({
        "seed": 0, "policy": "test", "mechanism": "auction/greedy/first_score", "profile": profile,
        "bidders": {"ids": list(BIDDERS), "kinds": [KINDS[b].value for b in BIDDERS], "category_ok": masks,
                    "categories": [c.value for c in CATEGORY_CODES]},
        "sources": {"ids": list(where.ids), "x": where.x, "y": where.y, "category_ok": where.category_ok},
        "grid": {"origin_lat": GRID.origin_lat, "origin_lon": GRID.origin_lon},
    })
    categories = categories_of(masks)
    for rnd, quotes in rounds:
        recorder.order_received(rnd.orders[0], rnd.opened_s)
        recorder.round_opened(rnd, [1])
        book, alloc = clear_round(rnd, quotes, KINDS, profile, categories, ScoringAuction())
        recorder.round_cleared(rnd, quotes, book, alloc, {})
    recorder.close()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def per_round_only(chunk: list[Any], columns: OneOrderColumns) -> tuple[list[bool], float]:
    """`market.replay.by_columns` with the columns switched off: every round takes the per-round path."""
    return [False] * len(chunk), 0.0


# --------------------------------------------------------------------------- the book


def stacked(rounds: list[tuple[Round, list[Quote]]], rows: dict[str, int]) -> OneOrderQuotes:
    """The rounds' quotes as `OneOrderQuotes`, stacked by plain loops (the test's own reading of its layout)."""
    quote_round, bidder, capacity, reliability = [], [], [], []
    src: list[tuple[int, int, int, float, float]] = []
    leg: list[tuple[int, int, int, float, float, float]] = []
    for r, (rnd, quotes) in enumerate(rounds):
        for q in quotes:
            k = len(quote_round)
            quote_round.append(r)
            bidder.append(rows[q.agent_id])
            capacity.append(q.capacity)
            reliability.append(q.reliability)
            if isinstance(q, SourceQuote):
                src.append((r, SOURCES.index(q.agent_id), k, float(q.price[0]), float(q.ready_s[0])))
        for q, k in zip(quotes, range(len(quote_round) - len(quotes), len(quote_round))):
            if isinstance(q, LegQuote):
                leg += [(r, int(s), k, float(p), float(t), float(v))
                        for s, p, t, v in zip(q.source_idx, q.price, q.pickup_s, q.travel_s)]
    s, lg = np.array(src, dtype=object).reshape(-1, 5), np.array(leg, dtype=object).reshape(-1, 6)
    return OneOrderQuotes(
        opened_s=np.array([rnd.opened_s for rnd, _ in rounds]),
        promise_s=np.concatenate([rnd.promise_s for rnd, _ in rounds]),
        reserve=np.concatenate([rnd.reserve for rnd, _ in rounds]), vip=np.concatenate([rnd.vip for rnd, _ in rounds]),
        category=np.concatenate([rnd.category for rnd, _ in rounds]), sites=N_SITES,
        bidder=np.array(bidder, dtype=np.int64), capacity=np.array(capacity, dtype=np.int64),
        reliability=np.array(reliability, dtype=np.float64),
        src_round=s[:, 0].astype(np.int64), src_site=s[:, 1].astype(np.int64), src_quote=s[:, 2].astype(np.int64),
        src_values=s[:, 3:5].T.astype(np.float64), leg_round=lg[:, 0].astype(np.int64),
        leg_site=lg[:, 1].astype(np.int64), leg_quote=lg[:, 2].astype(np.int64),
        leg_values=lg[:, 3:5].T.astype(np.float64), travel_s=lg[:, 5].astype(np.float64),
    )


@settings(max_examples=300, deadline=None)
@given(one_order_rounds())
def test_the_stack_has_each_rounds_combinations_to_the_bit(drawn: Drawn) -> None:
    """Every combination of every round, in `build_book`'s order: the same bidders, scores and verdicts."""
    rounds, profile, masks = drawn
    categories = categories_of(masks)
    ids = [q.agent_id for _, quotes in rounds for q in quotes]
    stack = one_order_book(stacked(rounds, categories.index), profile, categories)
    c = stack.combos
    for r, (rnd, quotes) in enumerate(rounds):
        book = build_book(rnd, quotes, KINDS, profile, categories)
        mine = c.order == r
        assert same_bits(stack.penalty[r:r + 1], book.penalty)
        assert [ids[k] for k in c.src[mine]] == [book.bidder_ids[b] for b in book.combos.src]
        assert [ids[k] for k in c.leg[mine]] == [book.bidder_ids[b] for b in book.combos.leg]
        for name in ("src_price", "leg_price", "ready_s", "pickup_s", "delivery_s", "reliability", "score",
                     "admissible", "feasible"):
            assert same_bits(getattr(c, name)[mine], getattr(book.combos, name)), name


@settings(max_examples=300, deadline=None)
@given(one_order_rounds())
def test_allocations_are_each_rounds_to_the_bit_or_left_to_the_sort(drawn: Drawn) -> None:
    """Winner, payments, reason and total cost: `one_order_allocation`'s, undecided exactly where it defers."""
    rounds, profile, masks = drawn
    categories = categories_of(masks)
    stack = one_order_book(stacked(rounds, categories.index), profile, categories)
    got = one_order_allocations(stack)
    for r, (rnd, quotes) in enumerate(rounds):
        fast = one_order_allocation(build_book(rnd, quotes, KINDS, profile, categories))
        assert bool(got.decided[r]) == (fast is not None)
        if fast is None:
            continue
        assert int(got.winner[r]) == int(fast.winner[0])
        assert same_bits(got.src_payment[r:r + 1], fast.src_payment)
        assert same_bits(got.leg_payment[r:r + 1], fast.leg_payment)
        assert got.reason[r] == fast.reason[0]
        assert got.total_cost[r:r + 1].tobytes() == np.float64(fast.total_cost).tobytes()


# --------------------------------------------------------------------------- the journal


def checked(journal: JournalReplay) -> tuple[list[ReadStep], OneOrderCheck]:
    """Every round of a one-run, one-profile journal, and what the columns make of them all as one chunk."""
    steps = [s for s in journal.steps() if s.round is not None]
    rounds = [s.round for s in steps]
    first, header = steps[0], steps[0].header
    assert header is not None and first.head is not None and all(r is not None for r in rounds)
    return steps, OneOrderColumns().check(
        [s.rec for s in steps], [r.orders[0] for r in rounds], [r.opened_s for r in rounds],  # type: ignore[union-attr]
        [r.logged.reason for r in rounds], rounds[0].profile, first.head["sources_obj"],  # type: ignore[union-attr]
        header.bidder_rows, header.categories)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(one_order_rounds())
def test_journaled_rounds_recleared_as_columns_are_the_per_round_awards(tmp_path: Path, drawn: Drawn) -> None:
    """Read back from a real journal: each round's awards as `award_arrays` lays them out, bit for bit."""
    path = tmp_path / "columns.bhj"
    path.unlink(missing_ok=True)
    write_journal(path, drawn)
    journal = JournalReplay(path)
    steps, check = checked(journal)
    header = steps[0].header
    assert header is not None
    for k, step in enumerate(steps):
        rr = journal.rebuilt(step)
        book, alloc = clear(header, rr.rnd, rr.quotes, rr.profile, header.clearing)
        award_i, award_f = award_arrays(book, alloc, header.index)
        assert bool(check.decided[k]) == (one_order_allocation(book) is not None)
        if not check.decided[k]:
            continue
        assert check.award_i[:, k].tolist() == award_i[:, 0].tolist()
        assert same_bits(check.award_f[:, k].copy(), award_f[:, 0].copy())
        assert (check.reason[k],) == alloc.reason
        assert check.total_cost[k:k + 1].tobytes() == np.float64(alloc.total_cost).tobytes()
        assert check.same[k]  # and so it matches the log the engine wrote


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(one_order_rounds(max_rounds=40))
def test_replay_reports_what_the_per_round_pass_reports(tmp_path: Path, drawn: Drawn) -> None:
    """Verify, KPIs and JSON: the same report with the columns and without them."""
    path = tmp_path / "report.bhj"
    path.unlink(missing_ok=True)
    write_journal(path, drawn)
    with_columns = untimed(replay(path))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(replay_mod, "by_columns", per_round_only)
        assert untimed(replay(path)) == with_columns
    assert with_columns["verify"]["ok"]


def test_a_sweep_of_journaled_rounds_meets_every_branch(tmp_path: Path) -> None:
    """The properties' deterministic companion: awarded, no feasible quote, no quote, and left to the sort."""
    seen: dict[str, int] = {"awarded": 0, "no_feasible_quote": 0, "no_quote": 0, "undecided": 0}
    for seed in range(8):
        drawn = deterministic_rounds(seed, 40)
        path = tmp_path / f"sweep-{seed}.bhj"
        write_journal(path, drawn)
        steps, check = checked(JournalReplay(path))
        assert (check.same | ~check.decided).all()
        for k in range(len(steps)):
            seen["undecided" if not check.decided[k] else check.reason[k] or "awarded"] += 1
    assert min(seen.values()) >= 5, seen


def deterministic_rounds(seed: int, n: int, tied_every: int = 1) -> Drawn:
    """``n`` one-order rounds from one seed: every ``tied_every``-th from a few values (ties), the rest from many."""
    rng = np.random.default_rng(seed)
    where = sites(seed)
    rounds = []
    for i in range(n):
        order = make_order(i, rng, now=60.0 * i)
        rnd = build_round(i + 1, 60.0 * i, [order], where, GRID, {"sku-00001": 1})
        if i % tied_every == 0:
            quotes, _ = tied_quotes(rnd, seed * 1000 + i, i % 5, 1 + i % 3)
        else:
            quotes, _ = random_quotes(rnd, seed * 1000 + i, 1 + i % 4)
        rounds.append((rnd, legs_first(quotes) if i % 4 == 3 else quotes))
    masks = np.ones((len(BIDDERS), len(CATEGORY_CODES)), dtype=bool)
    masks[seed % len(BIDDERS), :] = seed % 2 == 0  # one bidder without any category, in odd seeds
    return rounds, PROFILES[seed % 4], masks


# --------------------------------------------------------------------------- a tampered record


def tamper(src: Path, dst: Path, k: int, field: str) -> None:
    """Copies a journal, changing one field of the k-th round_cleared record."""
    n = 0
    with JournalWriter(dst, fsync="never") as writer:
        for rec in JournalReader(src):
            if rec["type"] == "round_cleared":
                if n == k:
                    ai, af = rec["award_i"].copy(), rec["award_f"].copy()
                    if field == "winner":
                        ai[0, 0] += 1
                    elif field == "source":
                        ai[1, 0] = (ai[1, 0] + 1) % N_SITES
                    elif field == "leg":
                        ai[2, 0] = N_SITES + (ai[2, 0] - N_SITES + 1) % len(LEGS)
                    elif field in ("src_payment", "leg_payment", "score", "delivery_s"):
                        row = ("src_payment", "leg_payment", "score", "delivery_s").index(field)
                        af[row, 0] = np.nextafter(af[row, 0], np.inf)  # one ulp
                    elif field == "reason":
                        rec["reason"] = ["no_capacity"]
                    elif field == "total_cost":
                        rec["total_cost"] = float(np.nextafter(rec["total_cost"], -np.inf))
                    rec["award_i"], rec["award_f"] = ai, af
                n += 1
            writer.append(rec["type"], **{key: v for key, v in rec.items() if key not in ("seq", "type")})


@pytest.fixture(scope="module")
def quiet_journal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """A journal of 300 one-order rounds (several chunks) and which of its rounds were awarded."""
    path = tmp_path_factory.mktemp("columns") / "quiet.bhj"
    drawn = deterministic_rounds(11, 300, tied_every=10)
    write_journal(path, drawn)
    awarded = [k for k, rec in enumerate(r for r in JournalReader(path) if r["type"] == "round_cleared")
               if rec["award_i"][0, 0] >= 0]
    return path, awarded


NAMED = {"winner": "winner (combination)", "source": "source bidder", "leg": "leg bidder", "src_payment": "src_payment",
         "leg_payment": "leg_payment", "score": "score", "delivery_s": "delivery_s", "reason": "reason",
         "total_cost": "total_cost"}


@pytest.mark.parametrize("field", ["winner", "source", "leg", "src_payment", "leg_payment", "score", "delivery_s",
                                   "reason", "total_cost"])
@pytest.mark.parametrize("nth", [0, 150, -1])
def test_a_tampered_record_gives_the_per_round_mismatch(quiet_journal: tuple[Path, list[int]], tmp_path: Path,
                                                        field: str, nth: int) -> None:
    """The chunk holding it goes through the per-round path: the same first difference, the same report."""
    path, awarded = quiet_journal
    bad = tmp_path / "tampered.bhj"
    tamper(path, bad, awarded[nth], field)
    got: dict[bool, tuple[Mismatch | None, dict[str, Any], dict[str, Any]]] = {}
    for columns in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if not columns:
                mp.setattr(replay_mod, "by_columns", per_round_only)
            got[columns] = (verify(bad), untimed(replay(bad, stop_at_first=True)), untimed(replay(bad)))
    mismatch = got[True][0]
    assert mismatch is not None and mismatch.field == NAMED[field]
    assert got[True] == got[False]
    assert got[True][1]["verify"]["stopped_early"] and got[True][2]["verify"]["mismatched_rounds"] == 1


def test_columns_clear_most_rounds_of_a_quiet_journal(quiet_journal: tuple[Path, list[int]]) -> None:
    """The columns are what replay uses: only ties and blocked winners are left to the per-round path."""
    path, _ = quiet_journal
    used: list[int] = []
    real = replay_mod.by_columns

    def counting(chunk: list[Any], columns: OneOrderColumns) -> tuple[list[bool], float]:
        ok, ms = real(chunk, columns)
        used.append(sum(ok))
        return ok, ms

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(replay_mod, "by_columns", counting)
        report = replay(path)
    assert report.ok and report.verified_rounds == 300
    assert sum(used) >= 250, used


def test_whole_chunks_report_what_the_per_round_pass_reports(tmp_path: Path) -> None:
    """Chunks the columns verify whole are settled and counted at once: the same report, retries included."""
    rounds, profile, masks = deterministic_rounds(5, 3 * replay_mod.CHUNK_ROUNDS + 17, tied_every=10**9)
    again = [(replace_round(rnd, i), quotes) for i, (rnd, quotes) in enumerate(rounds[:40])]  # the same orders, retried
    path = tmp_path / "whole.bhj"
    write_journal(path, (rounds + again, profile, masks))
    turns: list[bool] = []
    real = replay_mod._turns

    def watching(*args: Any) -> Any:
        for turn in real(*args):
            turns.append(turn.whole)
            yield turn

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(replay_mod, "_turns", watching)
        with_columns = untimed(replay(path))
    assert sum(turns) >= 2  # whole chunks were taken
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(replay_mod, "by_columns", per_round_only)
        assert untimed(replay(path)) == with_columns
    assert with_columns["verify"]["ok"] and with_columns["verify"]["rounds_checked"] == len(rounds) + len(again)


def replace_round(rnd: Round, i: int) -> Round:
    """A later round of the same order (a retry), opened later."""
    return build_round(10_000 + i, rnd.opened_s + 120.0, list(rnd.orders), rnd.sources, GRID, {"sku-00001": 1})


@st.composite
def logged_rounds(draw: st.DrawFn) -> list[Any]:
    """One-order rounds as logged: orders from a small pool (retries, duplicate awards), awarded or not."""
    orders = [make_order(i, np.random.default_rng(i)) for i in range(6)]
    out = []
    for seq in range(draw(st.integers(0, 40))):
        order = draw(st.sampled_from(orders))
        won = draw(st.booleans())
        leg = draw(st.integers(-1, len(BIDDERS)))
        award_i = np.array([[draw(st.integers(0, 3)) if won else -1], [0 if won else -1], [leg if won else -1]],
                           dtype=np.int32)
        values = [draw(st.floats(0, 50, allow_nan=False)) for _ in range(2)]
        award_f = np.array([[values[0]], [values[1]], [draw(st.floats(0, 90))], [draw(st.floats(0, 9000))]])
        if not won:
            award_f[:, 0] = [0.0, 0.0, np.nan, np.nan]
        logged = replay_mod.LoggedResult(award_i, award_f, ("" if won else "no_quote",), 1.0)
        out.append(replay_mod.LoggedRound(seq, seq, draw(st.floats(0, 7200)), (order,), [1], PROFILES[0], "balanced",
                                          logged, {}))
    return out


@settings(max_examples=300, deadline=None)
@given(logged_rounds(), st.integers(1, 12))
def test_kpis_of_a_chunk_are_its_rounds_added_one_by_one(rounds: list[Any], size: int) -> None:
    """`add_one_order_rounds` is `add_round` round by round, to the last float and counter."""
    header = replay_mod._header({
        "seq": 0, "mechanism": "auction/greedy/first_score", "profile": None,
        "bidders": {"ids": list(BIDDERS[:-1]), "kinds": [KINDS[b].value for b in BIDDERS[:-2]],
                    "category_ok": np.ones((len(BIDDERS) - 1, 4), dtype=bool)},
        "sources": {"ids": list(SOURCES), "x": np.zeros(3), "y": np.zeros(3), "category_ok": np.ones((3, 4), bool)},
        "grid": {"origin_lat": GRID.origin_lat, "origin_lon": GRID.origin_lon}})
    one, many = replay_mod.OutcomeKpis(), replay_mod.OutcomeKpis()
    for rr in rounds:
        one.add_round(rr.round_id, rr.orders, rr.opened_s, rr.logged, header)
    for start in range(0, len(rounds), size):
        many.add_one_order_rounds(rounds[start:start + size], header)
    assert json.dumps(vars_of(one)) == json.dumps(vars_of(many))


def vars_of(k: Any) -> dict[str, Any]:
    """Every tally of an `OutcomeKpis`, JSON-ready and ordered (floats by their repr)."""
    return {name: repr(sorted(v.items()) if isinstance(v, dict) else sorted(v) if isinstance(v, set) else v)
            for name, v in vars(k).items()}
