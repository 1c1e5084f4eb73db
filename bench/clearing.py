"""Clearing latency and in-process throughput.

Rounds are real: a synthetic fleet of N agents quotes B orders drawn from the peak
scenario. `clear` times build_book + greedy allocate on those quotes (what the
auctioneer does per round); `round` times quoting, clearing and settling together.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from agents.fleet import build_fleet
from bench.fleets import synthetic_fleet
from bench.stats import machine, percentiles_ms
from market.book import CategoryTable, build_book
from market.clearing import ScoringAuction
from market.config import load_profile, load_scenario
from market.demand import generate_orders
from market.engine import LocalBidders, MarketEngine
from market.round import build_round
from policies.heuristic import LoadMarkup
from policies.registry import make_policy

BIDDERS = (10, 100, 1000)
BATCHES = (1, 32, 256)


def _orders(fleet_cfg, catalogue, n: int, seed: int):  # type: ignore[no-untyped-def]
    return generate_orders(load_scenario("peak"), fleet_cfg, catalogue, n, seed)


def clear_case(n_bidders: int, batch: int, rounds: int) -> dict[str, Any]:
    """Times clearing alone on `rounds` distinct rounds of `batch` orders."""
    fleet_cfg = synthetic_fleet(n_bidders)
    fleet = build_fleet(fleet_cfg, seed=1)
    profile = load_profile("balanced")
    orders = _orders(fleet_cfg, fleet.env.catalogue, batch * rounds, seed=3)
    kinds, cats = fleet.kinds, CategoryTable.from_masks({a.agent_id: a.category_ok for a in fleet.agents})
    mech, strategy, idx = ScoringAuction(), LoadMarkup(), fleet.env.catalogue.index
    samples, combos = [], 0
    for r in range(rounds):
        now = orders[(r + 1) * batch - 1].created_s
        rnd = build_round(r, now, orders[r * batch:(r + 1) * batch], fleet.sources, fleet.env.grid, idx)
        quotes = [q for a in fleet.agents if (q := a.quote(rnd, now, strategy, 5.0)) is not None]
        t0 = time.perf_counter()
        book = build_book(rnd, quotes, kinds, profile, cats)
        mech.allocate(book)
        samples.append(time.perf_counter() - t0)
        combos += len(book.combos)
        for a in fleet.agents:
            a.release(r, now)
    stats = percentiles_ms(samples)
    return {"bidders": n_bidders, "batch": batch, "rounds": rounds, **stats,
            "combos_per_round": round(combos / rounds, 1),
            "orders_per_s": round(batch * rounds / sum(samples), 1)}


def round_case(n_bidders: int, batch: int, rounds: int) -> dict[str, Any]:
    """Times whole in-process rounds (quote + clear + realise + commit)."""
    fleet_cfg = synthetic_fleet(n_bidders)
    fleet = build_fleet(fleet_cfg, seed=1)
    policy = make_policy("heuristic")
    engine = MarketEngine(fleet, policy, load_profile("balanced"), LocalBidders(fleet.agents, policy.strategy), seed=1)
    orders = _orders(fleet_cfg, fleet.env.catalogue, batch * rounds, seed=4)
    samples = []
    for r in range(rounds):
        chunk = orders[r * batch:(r + 1) * batch]
        t0 = time.perf_counter()
        engine.run_round(chunk, chunk[-1].created_s, [0] * len(chunk))
        samples.append(time.perf_counter() - t0)
    return {"bidders": n_bidders, "batch": batch, "rounds": rounds, **percentiles_ms(samples),
            "orders_per_s": round(batch * rounds / sum(samples), 1)}


def run(quick: bool = False) -> dict[str, Any]:
    """The whole grid; `quick` uses fewer rounds for smoke tests."""
    reps = {1: 400, 32: 100, 256: 20} if not quick else {1: 20, 32: 5, 256: 2}
    grid = [clear_case(n, b, max(2, reps[b] // (4 if n == 1000 else 1))) for n in BIDDERS for b in BATCHES]
    fifty = clear_case(50, 64, 100 if not quick else 3)
    whole = [round_case(50, b, reps.get(b, 50) if not quick else 3) for b in (1, 64)] if not quick else [round_case(50, 64, 3)]
    target = next(g for g in grid if g["bidders"] == 100 and g["batch"] == 1)
    return {
        "benchmark": "clearing",
        "machine": machine(),
        "clear": grid,
        "clear_50_bidders_batch_64": fifty,
        "round_in_process": whole,
        "targets": {
            "p99_ms_100_bidders_batch_1": {"measured": target["p99_ms"], "target": 1.0},
            "clear_orders_per_s_50_bidders_batch_64": {"measured": fifty["orders_per_s"], "target": 20000},
            "whole_round_orders_per_s_50_bidders_batch_64": {
                "measured": next(w["orders_per_s"] for w in whole if w["batch"] == 64), "target": None},
        },
    }
