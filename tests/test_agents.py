"""Agents: holds, capacity dynamics and the quoting rules of each resource kind."""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.fleet import build_fleet
from agents.holds import HoldBook, HoldError
from market.config import load_fleet
from market.round import Round, build_round
from market.types import AwardLine, Category, Item, Kind, LegQuote, Order, Quote, Tier
from policies.base import BidDecision, CostPricing

FLEET_CFG = load_fleet("default")


def fleet():  # type: ignore[no-untyped-def]
    return build_fleet(FLEET_CFG, seed=3)


def order_at(i: int, x: float, y: float, *, sku: str = "sku-00000", qty: int = 1, locker_ok: bool = True,
             category: Category = Category.AMBIENT, tier: Tier = Tier.REGULAR) -> Order:
    lat, lon = fleet_grid().to_latlon(x, y)
    return Order(f"o{i}", 0.0, "c", tier, "app", (Item(sku, qty),), float(lat), float(lon), 7200.0, 50.0,
                 category, locker_ok, 100.0)


def fleet_grid():  # type: ignore[no-untyped-def]
    return build_fleet(FLEET_CFG).env.grid


def round_of(f, orders, rid=1, now=0.0):  # type: ignore[no-untyped-def]
    return build_round(rid, now, orders, f.sources, f.env.grid, f.env.catalogue.index)


def test_holdbook_refuses_commits_it_does_not_cover() -> None:
    book = HoldBook()
    book.place(1, 2, now=0.0, ttl_s=5.0)
    with pytest.raises(HoldError):
        book.take(1, 3, now=1.0)  # more than held: refused, the hold stays for the release
    assert book.units == 2
    book.release(1)
    book.place(2, 1, now=0.0, ttl_s=5.0)
    with pytest.raises(HoldError):
        book.take(2, 1, now=6.0)  # expired: refused and dropped
    with pytest.raises(HoldError):
        book.take(99, 1, now=0.0)  # unknown
    assert book.units == 0
    book.place(3, 2, now=0.0, ttl_s=5.0)
    assert book.take(3, 2, now=4.0).units == 2 and book.units == 0


def test_expired_holds_free_capacity() -> None:
    f = fleet()
    riders = next(a for a in f.agents if a.agent_id == "riders-c")
    rnd = round_of(f, [order_at(0, 1.0, -1.0)])
    before = riders.available()
    quote = riders.quote(rnd, 0.0, CostPricing(), hold_ttl_s=5.0)
    assert quote is not None and riders.available() == before - quote.capacity
    riders.advance(6.0)
    assert riders.available() == before and riders.holds_expired == 1


def test_warehouse_never_sells_the_same_unit_twice_in_a_round() -> None:
    f = fleet()
    wh = next(a for a in f.agents if a.agent_id == "wh-front-c")
    sku_i = int(np.nonzero(wh.stock)[0][0])
    sku = f.env.catalogue.sku_ids[sku_i]
    wh.stock[sku_i] = 3
    rnd = round_of(f, [order_at(i, 1.0, -1.0, sku=sku, qty=2) for i in range(3)])
    quote = wh.quote(rnd, 0.0, CostPricing(), 5.0)
    assert quote is not None and quote.order_idx.tolist() == [0]  # 2 of 3 units; the next order would oversell
    second = wh.quote(round_of(f, [order_at(9, 1.0, -1.0, sku=sku, qty=2)], rid=2), 0.0, CostPricing(), 5.0)
    assert second is None  # one unit left free while round 1 holds two


def test_a_round_quoted_twice_is_refused_and_holds_no_more_stock() -> None:
    """The second quote of a round raises before pricing: the stock it would hold has no
    hold to give it back, so it would stay held forever."""
    f = fleet()
    wh = next(a for a in f.agents if a.agent_id == "wh-front-c")
    sku = f.env.catalogue.sku_ids[int(np.nonzero(wh.stock)[0][0])]
    rnd = round_of(f, [order_at(0, 1.0, -1.0, sku=sku, qty=2)])
    assert wh.quote(rnd, 0.0, CostPricing(), 5.0) is not None
    held = int(wh.held_stock.sum())
    with pytest.raises(HoldError, match="already holds"):
        wh.quote(rnd, 0.0, CostPricing(), 5.0)
    assert int(wh.held_stock.sum()) == held == 2
    wh.release(rnd.round_id, 0.0)
    assert int(wh.held_stock.sum()) == 0 and len(wh.holds) == 0


def test_rider_pool_only_quotes_inside_its_radius() -> None:
    f = fleet()
    riders = next(a for a in f.agents if a.agent_id == "riders-c")
    near, far = order_at(0, 1.5, -1.0), order_at(1, 9.0, 9.0)
    quote = riders.quote(round_of(f, [near, far]), 0.0, CostPricing(), 5.0)
    assert quote is not None and set(quote.order_idx.tolist()) == {0}


def test_locker_needs_consent_and_walking_distance() -> None:
    f = fleet()
    locker = next(a for a in f.agents if a.agent_id == "locker-7")
    ok, refuses, far = order_at(0, 2.5, -3.0), order_at(1, 2.5, -3.0, locker_ok=False), order_at(2, -8, 8)
    quote = locker.quote(round_of(f, [ok, refuses, far]), 0.0, CostPricing(), 5.0)
    assert quote is not None and set(quote.order_idx.tolist()) == {0}


def test_categories_are_respected() -> None:
    f = fleet()
    crowd_beta = next(a for a in f.agents if a.agent_id == "crowd-beta")  # ambient and bulky only
    frozen = order_at(0, 0, 0, category=Category.FROZEN)
    assert crowd_beta.quote(round_of(f, [frozen]), 0.0, CostPricing(), 5.0) is None


def test_rider_capacity_follows_commits_and_completions() -> None:
    f = fleet()
    riders = next(a for a in f.agents if a.agent_id == "riders-c")
    rnd = round_of(f, [order_at(0, 1.5, -1.0)])
    lines = _lines_for(riders.quote(rnd, 0.0, CostPricing(), 5.0), rnd, done_s=1000.0)
    free = riders.capacity_free()
    riders.commit(1, lines, 0.0)
    assert riders.capacity_free() == free - 1
    riders.advance(999.0)
    assert riders.capacity_free() == free - 1
    riders.advance(1000.0)
    assert riders.capacity_free() == free


def _lines_for(quote: Quote, rnd: Round, done_s: float = 1000.0) -> list[AwardLine]:
    """Award lines for every order a quote offers (one line per order, as clearing awards)."""
    leg = isinstance(quote, LegQuote)
    lines = []
    for o in sorted(set(quote.order_idx.tolist())):
        lines.append(AwardLine(rnd.round_id, rnd.orders[o].order_id, o, "wh-front-c" if leg else quote.agent_id,
                               quote.agent_id if leg else "riders-c", 3.0, 3.0, 240.0, 100.0, 900.0, 1.0, -1.0,
                               float(rnd.x[o]), float(rnd.y[o]), 1, done_s=done_s, on_time=bool(o % 2)))
    return lines


@pytest.mark.parametrize("agent_id", ["wh-front-c", "riders-c", "crowd-alpha", "locker-7"])
def test_a_cancelled_commit_leaves_the_agent_as_a_release_would(agent_id: str) -> None:
    """When an order's other side refuses, the side that committed cancels: its capacity,
    stock and riders are as if it had only released, its job never completes, and a
    second cancel changes nothing."""
    f = fleet()
    agent = next(a for a in f.agents if a.agent_id == agent_id)
    near = (2.5, -3.0) if agent_id == "locker-7" else (1.5, -1.0)
    rnd = round_of(f, [order_at(i, *near) for i in range(3)])
    agent.advance(0.0)
    twin = copy.deepcopy(agent)
    quote, twin_quote = agent.quote(rnd, 0.0, CostPricing(), 5.0), twin.quote(rnd, 0.0, CostPricing(), 5.0)
    assert quote is not None and twin_quote is not None
    lines = _lines_for(quote, rnd)
    assert len(lines) >= 2
    agent.commit(rnd.round_id, lines, 1.0)
    twin.release(rnd.round_id, 1.0)
    assert agent.capacity_free() == twin.capacity_free() - len(lines)
    assert agent.cancel(rnd.round_id, [lines[0].order_idx], 1.0) == 1  # one order's partner refused
    assert agent.capacity_free() == twin.capacity_free() - (len(lines) - 1) and agent.committed_units == len(lines) - 1
    assert agent.cancel(rnd.round_id, [ln.order_idx for ln in lines], 1.0) == len(lines) - 1
    assert agent.cancel(rnd.round_id, [ln.order_idx for ln in lines], 1.0) == 0  # sent twice: nothing more
    for at in (1.0, 2000.0):  # and after the jobs would have ended: no phantom completion
        agent.advance(at)
        twin.advance(at)
        assert (agent.capacity_free(), agent.available(), agent.committed_units) == (twin.capacity_free(), twin.available(), 0)
        assert agent.reliability == twin.reliability and not agent._completions
    for name in ("stock", "held_stock", "busy"):
        if hasattr(agent, name):
            assert np.array_equal(getattr(agent, name), getattr(twin, name)), name


CANCEL_OPS = st.lists(st.one_of(
    st.tuples(st.just("commit"), st.integers(1, 4), st.floats(5.0, 300.0)),  # orders in the round, job length
    st.tuples(st.just("cancel"), st.integers(0, 30)),  # which earlier round (modulo), all of its lines
    st.tuples(st.just("advance"), st.floats(0.0, 120.0)),
), max_size=40)


@settings(max_examples=40, deadline=None)
@given(ops=CANCEL_OPS)
def test_commits_and_cancels_never_lose_or_invent_capacity(ops: list[tuple[Any, ...]]) -> None:
    """Whatever the order of commits, cancels and time: every rider is busy for exactly one
    pending job, and every warehouse unit is in stock, in a pending pick, or picked."""
    f = fleet()
    wh = next(a for a in f.agents if a.agent_id == "wh-front-c")
    riders = next(a for a in f.agents if a.agent_id == "riders-c")
    sku_i = int(np.nonzero(wh.stock)[0][0])
    sku, start_stock = f.env.catalogue.sku_ids[sku_i], int(wh.stock[sku_i])
    now, rid, committed = 0.0, 0, []  # at most 40 x 120 s: before the 3-hourly restock
    for op in ops:
        if op[0] == "commit":
            rid += 1
            rnd = round_of(f, [order_at(i, 1.5, -1.0, sku=sku) for i in range(op[1])], rid=rid, now=now)
            quotes = [a.quote(rnd, now, CostPricing(), 5.0) for a in (wh, riders)]
            for agent, q in zip((wh, riders), quotes):
                if q is not None and all(quotes):
                    agent.commit(rid, _lines_for(q, rnd, done_s=now + op[2]), now)
                elif q is not None:
                    agent.release(rid, now)
            if all(quotes):
                committed.append(rid)
        elif op[0] == "cancel" and committed:
            gone = committed.pop(op[1] % len(committed))
            for agent in (wh, riders):
                agent.cancel(gone, range(4), now)
        elif op[0] == "advance":
            now += op[1]
            wh.advance(now)
            riders.advance(now)
        pending_picks = sum(sum(q for s, q in zip(job[2][1], job[2][2]) if s == sku_i) for job in wh._completions)
        picked = wh.committed_units - len(wh._completions)  # one unit of the SKU per order
        assert int(wh.stock[sku_i]) + pending_picks + picked == start_stock
        assert int(riders.busy.sum()) == len(riders._completions) == int(riders.in_use.level)
        assert riders.capacity_free() == riders.cfg.riders - len(riders._completions)


def test_a_cancel_after_the_job_ended_undoes_nothing() -> None:
    f = fleet()
    riders = next(a for a in f.agents if a.agent_id == "riders-c")
    rnd = round_of(f, [order_at(0, 1.5, -1.0)])
    quote = riders.quote(rnd, 0.0, CostPricing(), 5.0)
    riders.commit(1, _lines_for(quote, rnd, done_s=50.0), 0.0)
    free = riders.capacity_free()
    assert riders.cancel(1, [0], 60.0) == 0  # the job ended first: capacity came back by itself
    assert riders.capacity_free() == free + 1 and riders.committed_units == 1


def test_holdback_keeps_the_last_capacity_for_vips() -> None:
    class KeepForVip:
        name = "vip"

        def decide(self, ctx):  # type: ignore[no-untyped-def]
            return BidDecision(markup=1.0, holdback=0.99)

    f = fleet()
    riders = next(a for a in f.agents if a.agent_id == "riders-c")
    regular, vip = order_at(0, 1.5, -1.0), order_at(1, 1.5, -1.0, tier=Tier.VIP)
    quote = riders.quote(round_of(f, [regular, vip]), 0.0, KeepForVip(), 5.0)
    assert quote is not None and set(quote.order_idx.tolist()) == {0, 1}  # plenty free: both quoted
    riders.release(1, 0.0)
    riders.busy[: int(0.95 * riders.cfg.riders)] = True  # only the VIP reserve (holdback clips to 0.9) is left
    quote = riders.quote(round_of(f, [regular, vip], rid=2), 0.0, KeepForVip(), 5.0)
    assert quote is not None and set(quote.order_idx.tolist()) == {1}


def test_every_kind_is_in_the_default_fleet() -> None:
    kinds = {a.kind for a in fleet().agents}
    assert kinds == set(Kind)


def test_occupancy_integrates_level_over_time() -> None:
    from agents.occupancy import Occupancy

    occ = Occupancy()
    occ.touch(100.0)  # the clock starts here, not at 0
    occ.add(110.0, 2)  # 2 busy from 110
    occ.add(130.0, -1)  # 1 busy from 130
    assert occ.area(150.0) == 2 * 20 + 1 * 20
    assert occ.share(150.0, capacity=4) == 60 / (50 * 4)
